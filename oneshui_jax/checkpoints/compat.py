"""Whether a checkpoint fits a request, and how two checkpoints differ.

A study reusing a run, a served request or ``inspect --diff`` compares what a run recorded
(``metadata.json``: dataset, model, N, seed, splits, model config) or holds (its leaves and
their shapes) with what is wanted; every difference is named in one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oneshui_jax.checkpoints.layout import short_list
from oneshui_jax.checkpoints.metadata import _as_json, run_identity, splits_hash
from oneshui_jax.errors import CheckpointError


def _split_difference(name: str, stored: Any, wanted: Any) -> str:
    """How one split list of the checkpoint differs from the requested one."""
    if stored is None:
        return f"{name}: not recorded in the checkpoint"
    if not isinstance(stored, list) or not isinstance(wanted, list):
        return f"{name}: {stored!r} vs {wanted!r}"
    only_stored = [x for x in stored if x not in set(wanted)]
    only_wanted = [x for x in wanted if x not in set(stored)]
    if not only_stored and not only_wanted:
        return f"{name}: the same {len(stored)} entries in another order"
    return (f"{name}: {len(stored)} vs {len(wanted)} entries, {len(only_stored)} only in the "
            f"checkpoint [{short_list(only_stored)}], {len(only_wanted)} only in the request "
            f"[{short_list(only_wanted)}]")


def model_config_differences(stored: Mapping[str, Any] | None,
                             wanted: Mapping[str, Any] | None) -> list[str]:
    """``"width: 64 -> 48"`` for every field in which a checkpoint's model config (its recorded
    ``model_config``, a ``ViTConfig`` as a dict) differs from the requested one, by field name;
    ``[]`` when they are the same. A field one of them lacks reads ``(absent)``."""
    stored, wanted = stored or {}, wanted or {}
    a, b = ({k: config.get(k, "(absent)") for k in set(stored) | set(wanted)}
            for config in (stored, wanted))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k]]


def check_compatible(metadata: Mapping[str, Any], *, dataset: str, model: str,
                     splits: Mapping[str, Any] | None = None, num_identities: int | None = None,
                     seed: int | None = None) -> None:
    """CheckpointError listing every way the checkpoint differs from the request.

    ``splits``: the split lists named in it must equal the recorded ones, in order (compared by
    ``splits_hash``; the message says which lists differ and how).
    """
    recorded = run_identity(metadata)
    requested = {"dataset": dataset, "model": model, "num_identities": num_identities,
                 "seed": seed}
    problems = [f"{field} {recorded[field]!r} but the request is {wanted!r}"
                for field, wanted in requested.items()
                if wanted is not None and recorded[field] != wanted]
    if splits is not None:
        stored = metadata.get("splits") or {}
        wanted = _as_json(dict(splits), "the requested splits")
        stored_part = {name: stored.get(name) for name in wanted}
        if splits_hash(stored_part) != splits_hash(wanted):
            differences = [_split_difference(name, stored_part[name], wanted[name])
                           for name in sorted(wanted) if stored_part[name] != wanted[name]]
            problems.append(f"splits differ ({'; '.join(differences)})")
    if problems:
        where = metadata.get("run_dir", "(unknown path)")
        raise CheckpointError(f"checkpoint {where} was trained on " + "; ".join(problems))


def structure_differences(a: Mapping[str, tuple[int, ...]], b: Mapping[str, tuple[int, ...]],
                          name_a: str, name_b: str) -> list[str]:
    """How two trees given as ``{leaf name: shape}`` differ (empty list: same structure)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes = [f"{name} {tuple(a[name])} vs {tuple(b[name])}" for name in sorted(set(a) & set(b))
              if tuple(a[name]) != tuple(b[name])]
    parts = ((f"only in {name_a}", only_a), (f"only in {name_b}", only_b),
             ("shapes differ", shapes))
    return [f"{label}: {short_list(items)}" for label, items in parts if items]
