"""Reuse and resume keyed by one fingerprint of everything that shapes a stage.

A stage's fingerprint has these parts (``fingerprint``):

* ``dataset`` and ``data.fingerprint``: the dataset and its content (images, identities and
  labels of the build, after ``dedup``), so changed labels make a new fingerprint;
* ``model``: the architecture (``ViTConfig``, the image size included);
* ``splits`` (their hash) and ``seed`` (data order, initialisation), and ``split_seed`` when
  the split comes from another seed;
* the stage's settings: ``train`` for pretrain and retrain, the method's validated ``Config`` for
  a method; plus ``data.crop_scale`` (the training augmentation) for every stage that reads
  TRAIN images (pretrain, retrain and ``stats`` / ``full`` methods, e.g. PGU's covariances);
* ``parent``: the hash of the parameters the stage starts from (the initial parameters for
  pretrain / retrain, the pretrained model for a method).

Settings that change how a stage computes but not what (``NOT_FINGERPRINTED``: ``remat``, the
per-block ``jax.checkpoint`` of ``config.train`` and ``config.meta_unlearn``) are left out, so a
run with them reuses or resumes one without them and the other way round; so is
``train.ap_scores`` where the compute dtype is float32 (both choices score alike there).

A stage that computes in bfloat16 also carries ``bf16`` (:data:`BF16_NUMERICS`): the mixed
precision follows autocast since it was added (float32 residual stream and LayerNorms), so a
bf16 run made before, with the whole stream in bf16, is not reused for one made now.

``check(ctx, run_dir, fingerprint)`` decides what happens to an existing run directory:

* finished with an equal fingerprint: reused; with another: refused, listing the differences;
* unfinished with resumable state (``train_state/``) and an equal fingerprint: resumed; with
  another: refused (never resumed), listing the differences and how to start over;
* anything else: the stage runs from the start.

Checkpoints written before fingerprints existed keep working where they match: the parts that
can be rebuilt from their metadata (dataset, model, splits, seed, stage settings, data settings
and the parent hash where recorded) are compared, and only those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from oneshui_jax import checkpoints, files
from oneshui_jax.errors import CheckpointError
from oneshui_jax.train import HALF_DTYPES

FINGERPRINT_VERSION = 1
LEGACY_DATA_DEFAULTS = {"data.dedup": "none"}  # what an old checkpoint without the key meant

REUSE, RESUME, FRESH = "reuse", "resume", "fresh"

NOT_FINGERPRINTED = ("remat",)
"""Stage settings that change memory and speed, never results: not part of a fingerprint."""

BF16_NUMERICS = "autocast: float32 residual stream and LayerNorms"
"""The ``bf16`` part of a stage computing in bfloat16 (module docstring)."""


def _settings_part(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's settings without ``NOT_FINGERPRINTED`` keys, and without ``ap_scores`` where
    the compute dtype is not half precision (it changes nothing there)."""
    out = {k: v for k, v in settings.items() if k not in NOT_FINGERPRINTED}
    if settings.get("compute_dtype") not in HALF_DTYPES:
        out.pop("ap_scores", None)
    return out


def fingerprint(ctx, stage: str, settings_name: str, settings: Mapping[str, Any],
                parent_hash: str | None, augmented: bool) -> dict[str, Any]:
    """``{"version", "hash", "parts"}`` of a stage (module docstring); ``augmented``: the stage
    reads TRAIN images, so the training augmentation is part of its fingerprint."""
    config = ctx.config
    parts: dict[str, Any] = {
        "stage": stage,
        "dataset": config.dataset,
        "data.fingerprint": ctx.dataset.fingerprint,
        "data.dedup": config.data.get("dedup", "none"),
        "model": dataclasses.asdict(ctx.model_cfg),
        "splits": checkpoints.splits_hash(ctx.splits.to_dict()),
        "seed": config.seed,
        settings_name: _settings_part(settings),
        "parent": parent_hash,
    }
    if augmented:
        parts["data.crop_scale"] = list(config.data.crop_scale)
    if settings.get("compute_dtype") in HALF_DTYPES:
        parts["bf16"] = BF16_NUMERICS
    if config.get("split_seed") is not None and config.split_seed != config.seed:
        parts["split_seed"] = config.split_seed  # only when it differs: old hashes stay valid
    parts = files.to_json(parts)
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return {"version": FINGERPRINT_VERSION, "hash": hashlib.sha256(text.encode()).hexdigest(),
            "parts": parts}


def _flat(parts: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (the model config stays one value)."""
    out: dict[str, Any] = {}
    for key, value in parts.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "model":
            out.update(_flat(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], *,
                only_common: bool = False) -> list[str]:
    """``"key: stored -> wanted"`` for every part that differs (``only_common``: keys in both)."""
    s, w = _flat(stored), _flat(wanted)
    keys = set(s) & set(w) if only_common else set(s) | set(w)
    lines = {k: [f"{k}: {s.get(k, '(absent)')!r} -> {w.get(k, '(absent)')!r}"]
             for k in keys if s.get(k, "(absent)") != w.get(k, "(absent)")}
    if isinstance(s.get("model"), Mapping) and isinstance(w.get("model"), Mapping):
        lines["model"] = [f"model.{d}"  # field by field, as serving compares architectures
                          for d in checkpoints.model_config_differences(s["model"], w["model"])]
    return [line for k in sorted(lines) for line in lines[k]]


def legacy_parts(metadata: Mapping[str, Any], settings_name: str,
                 augmented: bool) -> dict[str, Any]:
    """The fingerprint parts an older checkpoint's metadata still tells (module docstring)."""
    config = metadata.get("config") or {}
    data = config.get("data") or {}
    parts: dict[str, Any] = {"dataset": config.get("dataset"), "seed": config.get("seed")}
    if metadata.get("model_config") is not None:
        parts["model"] = metadata["model_config"]
    if isinstance(metadata.get("splits"), Mapping):
        parts["splits"] = checkpoints.splits_hash(metadata["splits"])
    if config.get(settings_name) is not None:
        parts[settings_name] = _settings_part(config[settings_name])
    parts["data.dedup"] = data.get("dedup", LEGACY_DATA_DEFAULTS["data.dedup"])
    if augmented and "crop_scale" in data:
        parts["data.crop_scale"] = list(data["crop_scale"])
    if metadata.get("base_params_hash"):
        parts["parent"] = metadata["base_params_hash"]
    return files.to_json(parts)


def _has_train_state(run_dir: str) -> bool:
    state = os.path.join(run_dir, checkpoints.TRAIN_STATE_DIR)
    return os.path.isdir(state) and any(name.isdigit() for name in os.listdir(state))


def _changes(metadata: Mapping[str, Any], fp: Mapping[str, Any], settings_name: str,
             augmented: bool) -> list[str]:
    stored = metadata.get("fingerprint")
    if isinstance(stored, Mapping) and "parts" in stored:
        if stored.get("hash") == fp["hash"]:
            return []
        return differences(stored["parts"], fp["parts"]) or ["fingerprint version"]
    return differences(legacy_parts(metadata, settings_name, augmented), fp["parts"],
                       only_common=True)


def check(ctx, run_dir: str, fp: Mapping[str, Any], settings_name: str,
          augmented: bool) -> tuple[str, dict[str, Any] | None]:
    """``(REUSE | RESUME | FRESH, the run's metadata or None)`` for ``run_dir``; CheckpointError
    when it holds other work (module docstring)."""
    if not os.path.isfile(os.path.join(run_dir, checkpoints.METADATA_FILE)):
        return FRESH, None
    metadata = checkpoints.read_metadata(run_dir)
    finished = checkpoints.is_finished(run_dir)
    resumable = not finished and _has_train_state(run_dir)
    if not finished and not resumable:
        return FRESH, metadata
    config = ctx.config
    checkpoints.check_compatible(metadata, dataset=config.dataset, model=config.model.name,
                                 splits=ctx.splits.to_dict())
    changes = _changes(metadata, fp, settings_name, augmented)
    if not changes:
        return (REUSE if finished else RESUME), metadata
    listed = "; ".join(changes)
    if finished:
        raise CheckpointError(
            f"checkpoint {run_dir} was made with other settings ({listed}); delete it or point "
            "config.checkpoint_dir elsewhere to run the stage again")
    raise CheckpointError(
        f"{run_dir} holds an unfinished run made with other settings ({listed}); it is not "
        f"resumed. To start the stage over, delete it (rm -r {run_dir}), or run again with the "
        "settings it was started with")
