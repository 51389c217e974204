"""The privacy evaluation of a study: RMIA with one reference model and the attack on people
(SPEC.md 5.5; ``config.mia.rmia``).

The reference builds its reference ("shadow") models by hand: it copies the retrained checkpoint
under another name and runs the method again with ``--seed 1``. Here the study does it itself,
after its stages, for every target in ``config.stages`` but ``retrain``:

* target ``pretrain``: the reference model is the retrained model of the same split;
* target method M: the reference model is M applied to the retrained model, with the split of
  this study (``config.split_seed``, default ``config.seed``) and every other draw from
  ``config.seed + 1``. It is an ordinary method stage in its own run folder
  (``<M>_<N>_<seed+1>_split<seed>``), so it is reused, resumed and fingerprinted like any other.

Signals: ``config.mia.passes`` (the reference: 8) passes with the training augmentation
(``pipeline.augmented_pass``: in index order, batch ``config.mia.batch_size``, per-pass seeds)
over z = train ∪ val (every TRAIN identity, the forget identities included), the forget images
and the validation images: per-sample losses of the target and of its reference model, each
image scored once per pass. ``config.mia.subsample`` reproduces the reference's CelebA
subsampling of z and val (Q6: ``"per_pass"``) or its fix (``"once"``); see ``plan``. Signals are
cached in each model's run folder (``mia_signals/``), so a second run, another variant or a
report never computes them again. ``oneshui_jax.mia.rmia.score_grid`` scores them with the
reference's formula and ``rmia.best`` keeps its (γ, a). The scores of that point then feed
``mia.per_person``: forget identities (members) against validation identities (non-members), by
each person's mean and max.

``config.mia.rmia_variant = "canonical"`` (a named option; the default ``"reference"`` is what the
paper reports, Q5) runs canonical offline RMIA (``rmia.score_grid_canonical``) on the
probability of each image's true label, read off the same losses: ``exp(-loss)`` for a class
(cross-entropy), ``exp(-C · loss)`` for C independent labels (the joint Bernoulli likelihood of
the label vector; the loss is the mean BCE over labels).

Each target's record gains ``mia.rmia`` (``auc``, ``tpr_at_1e-4`` and ``tpr_at_1pct`` in %,
``gamma``, ``a``, the whole ``grid``, ``roc``) and ``mia.per_person`` (``mean`` / ``max``:
``auc`` and TPR at 1% and 10% FPR in %, ``roc``), and ``mia.reference_run_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from absl import logging

from oneshui_jax import checkpoints, files, interrupts, sharding
from oneshui_jax.data import pipeline
from oneshui_jax.mia import rmia
from oneshui_jax.study.context import Context, seeded_context


def probabilities(losses: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """The probability of the true label(s) from per-sample losses (module docstring)."""
    scale = num_classes if task == "multilabel" else 1
    return np.exp(-scale * np.asarray(losses, np.float64))


def wants_rmia(config) -> bool:
    """``config.mia.rmia`` (absent: False)."""
    return bool((config.get("mia") or {}).get("rmia", False))


def wants_held_out(config) -> bool:
    """RMIA's held-out selection: ``config.mia.rmia`` and ``config.mia.rmia_held_out``."""
    return wants_rmia(config) and bool(config.mia.get("rmia_held_out", False))


_HELD_OUT_STREAM = 7  # the random stream of the held-out request, after the seed
CALIBRATION = "rmia_calibration"  # the stage of the calibration model (not a row of the table)


def held_out(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """``(identities, images)`` of the held-out simulated request that RMIA's grid point is
    selected on (``Evaluation.calibrate``): ``config.num_identities`` TRAIN identities outside
    the forget set, drawn from ``[config.seed, 7]``, and their training images. The people being
    forgotten and the test people never take part."""
    forget = set(int(i) for i in ctx.splits.forget)
    candidates = np.array(sorted(int(i) for i in ctx.splits.train if int(i) not in forget))
    n = min(int(ctx.config.num_identities), len(candidates))
    rng = np.random.default_rng([ctx.config.seed, _HELD_OUT_STREAM])
    identities = np.sort(rng.choice(candidates, size=n, replace=False))
    retain = np.asarray(ctx.images["retain"])
    owners = np.asarray(ctx.dataset.annotations.identities)[retain]
    return identities, retain[np.isin(owners, identities)]


def calibration_settings(ctx: Context, identities: np.ndarray | None = None) -> dict[str, Any]:
    """The calibration model's settings (its fingerprint): ``config.train`` and the held-out
    identities it is trained without (``held_out``'s, unless given)."""
    identities = held_out(ctx)[0] if identities is None else identities
    return {**ctx.config.train.to_dict(), "held_out_identities": [int(i) for i in identities]}


def reference_context(ctx: Context) -> Context:
    """The context of a target's reference model: the same data and split, ``seed + 1`` for
    every other draw (``config.split_seed`` keeps the split)."""
    other = seeded_context(ctx, ctx.config.seed + 1)
    if "mia" in other.config:  # the reference model's own loss attack is never reported
        other.config.mia.loss_rf = False
    return other


_SUBSAMPLE_STREAM = 5  # the random stream of the subsample draws, after the seed
CACHE_DIR = "mia_signals"  # in the run folder of the model the signals belong to


def plan(ctx: Context) -> dict[str, np.ndarray]:
    """Which images every pass scores: ``{"z", "forget", "val"}`` -> [passes, n] image indices.

    z = train ∪ val (SPEC.md 5.5). ``config.mia.subsample`` (Q6): ``"none"`` keeps all of them;
    ``"per_pass"`` (the reference on CelebA) draws, in every pass, ``config.mia.subsample_z`` of z
    and ``config.mia.subsample_val`` of val afresh, so val rows are misaligned across the passes
    of the vote; ``"once"`` (the fix) draws once for all passes. Sizes above what there is keep
    everything, as ``torch.randperm(n)[:k]`` does. The draws follow ``config.seed``."""
    mia = ctx.config.mia
    passes = int(mia.get("passes", 8))
    z = np.concatenate([ctx.images["train"], ctx.images["val"]])
    out = {"z": z, "forget": ctx.images["forget"], "val": ctx.images["val"]}
    if wants_held_out(ctx.config):  # images of z already: no extra image to score
        out["held_out"] = held_out(ctx)[1]
    out = {k: np.broadcast_to(np.asarray(v, np.int64), (passes, len(v))) for k, v in out.items()}
    mode = mia.get("subsample", "none")
    if mode == "none":
        return out
    rng = np.random.default_rng([ctx.config.seed, _SUBSAMPLE_STREAM])
    iz, iv = rmia.draw_indices(len(z), len(ctx.images["val"]), passes=passes, rng=rng,
                               n_z=min(int(mia.subsample_z), len(z)),
                               n_val=min(int(mia.subsample_val), len(ctx.images["val"])),
                               per_pass=mode == "per_pass")
    out["z"] = np.take_along_axis(out["z"], iz, 1)
    out["val"] = np.take_along_axis(out["val"], iv, 1)
    return out


def _cache_key(ctx: Context, params_hash: str, rows: dict[str, np.ndarray],
               batch_size: int) -> str:
    """What the signals depend on: the parameters, the images of every pass, the augmentation
    and its seeds, the numerics."""
    digest = hashlib.sha256()
    for name in sorted(rows):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(rows[name]).tobytes())
    t, d = ctx.config.train, ctx.config.data
    parts = {"params": params_hash, "rows": digest.hexdigest(), "seed": ctx.config.seed,
             "image_size": d.image_size, "crop_scale": list(d.crop_scale),
             "batch_size": batch_size, "dtype": t.compute_dtype, "attention": t.attention,
             "data": ctx.dataset.fingerprint}
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Passes:
    """The augmented batches of every pass (``plan``'s images, each once, in index order; crops
    of pass ``k`` from the seed ``[config.seed, k]``), made once per study and handed to every
    model: a target and its reference model see the same crops, and the images are not cropped
    again for each of the study's models. A pass is kept in memory while the kept passes stay
    within ``budget_mb`` (``config.mia.cache_mb``); a pass beyond it is made again for every
    model (same seeds, same crops)."""

    def __init__(self, ctx: Context, rows: dict[str, np.ndarray], batch_size: int,
                 budget_mb: float = 0.0):
        self.ctx, self.rows, self.batch_size = ctx, rows, batch_size
        self.cfg = ctx.pipeline_config(batch_size, crop_scale=tuple(ctx.config.data.crop_scale))
        self.count = next(iter(rows.values())).shape[0]
        self.images = [np.unique(np.concatenate([v[k] for v in rows.values()]))
                       for k in range(self.count)]
        self._left = float(budget_mb) * 2**20
        self._kept: dict[int, list] = {}

    def batches(self, k: int):
        """Pass ``k``'s batches (dicts with ``image``, ``label``, ``mask``)."""
        if k in self._kept:
            return self._kept[k]
        stream = pipeline.to_iterator(
            pipeline.augmented_pass(self.ctx.dataset.source, self.images[k], self.cfg, k),
            self.cfg)
        size = (self.images[k].size * self.cfg.image_size ** 2 * 3 * 4)  # float32 images
        if size > self._left:
            return stream
        self._left -= size
        self._kept[k] = [{n: np.asarray(batch[n]) for n in ("image", "label", "mask")}
                         for batch in stream]
        return self._kept[k]


def signals(ctx: Context, params, passes: Passes,
            run_dir: str | None = None) -> dict[str, np.ndarray]:
    """``{name: [passes, n]}`` per-sample losses of ``params`` on the images of ``passes.rows``
    (``plan``) under the training augmentation.

    Pass ``k`` scores the images any row ``k`` names once each (in index order, crops from the
    seed ``[config.seed, k]``: the same crops for a target and its reference model, shared
    between calls through ``passes``) and hands every row its losses. With ``run_dir`` (the model's
    run folder, whose metadata holds its ``params_hash``) the result is cached there under
    ``mia_signals/`` and reused when nothing it depends on changed. Evaluation's own losses are
    not reused: they come from the eval transform, the signals from the training augmentation."""
    rows = passes.rows
    path = None
    params_hash = checkpoints.read_metadata(run_dir).get("params_hash") if run_dir else None
    if params_hash:
        key = _cache_key(ctx, params_hash, rows, passes.batch_size)
        path = os.path.join(run_dir, CACHE_DIR, f"{key}.npz")
        if os.path.isfile(path):
            with np.load(path) as cached:
                if set(cached.files) == set(rows):
                    logging.info("mia: reusing the signals in %s", path)
                    return {k: cached[k] for k in rows}
    step = ctx.eval_step
    out = {k: np.empty(v.shape, np.float32) for k, v in rows.items()}
    for k in range(passes.count):
        losses = []
        for batch in passes.batches(k):
            interrupts.check()
            placed = sharding.shard_batch((batch["image"], batch["label"]))
            _, batch_losses = step(params, *placed)
            losses.append(np.asarray(batch_losses)[np.asarray(batch["mask"])])
        losses = np.concatenate(losses)
        for name, v in rows.items():
            out[name][k] = losses[np.searchsorted(passes.images[k], v[k])]
    if path:
        with files.atomic_open(path, "wb") as f:
            np.savez(f, **out)
    return out


def _grid(ctx: Context, variant: str, target: dict[str, np.ndarray],
          reference: dict[str, np.ndarray], members: str) -> list[dict]:
    """RMIA's grid (``rmia.score_grid``, or on probabilities ``score_grid_canonical`` for the
    ``canonical`` variant) of the ``members`` rows against the val rows; reads the ``z``,
    ``members`` and ``val`` rows only."""
    rows = ("z", members, "val")
    if variant == "canonical":
        convert = lambda x: probabilities(x, ctx.dataset.task, ctx.dataset.num_classes)  # noqa: E731
        target = {k: convert(target[k]) for k in rows}
        reference = {k: convert(reference[k]) for k in rows}
    score = rmia.score_grid_canonical if variant == "canonical" else rmia.score_grid
    return score(target["z"], reference["z"], target[members], reference[members],
                 target["val"], reference["val"])


def attack(ctx: Context, target: dict[str, np.ndarray], reference: dict[str, np.ndarray],
           variant: str = "reference", rows: dict[str, np.ndarray] | None = None,
           selected: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"rmia": ..., "per_person": ...}`` from the loss signals (``signals``) of a target and
    its reference model (module docstring), in %. ``rows`` is the ``plan`` the signals follow
    (default: ``plan(ctx)``); the attack on people needs the val rows to hold the same image in
    every pass, so with ``subsample="per_pass"`` it is left out (``per_person.skipped``)."""
    from oneshui_jax.mia import per_person, roc

    rows = plan(ctx) if rows is None else rows
    grid = _grid(ctx, variant, target, reference, "forget")
    fixed = fixed_point(ctx.config, grid) if ctx is not None else {}  # None: the grid alone
    if selected is not None:  # the point chosen on the held-out request (Evaluation.calibrate)
        fixed["rmia_held_out"] = _at_point_entry(grid, selected["gamma"], selected["a"])
    best = rmia.best(grid)
    entry = {"variant": variant, "selected": best is not None,
             "members": int(rows["forget"].shape[1]), "nonmembers": int(rows["val"].shape[1]),
             "grid": [{"gamma": g["gamma"], "a": g["a"], "auc": 100.0 * g["auc"],
                       "tpr_at_1e-4": 100.0 * g[rmia.TPR_KEY]} for g in grid]}
    if best is None:
        # No (γ, a) has TPR > 0 at 1e-4 FPR: the reference keeps its starting values and
        # reports AUC 0 and TPR 0 with no curve; every column that needs a selected point is
        # left empty (the grid above still holds each point's AUC).
        entry.update({"auc": 0.0, "tpr_at_1e-4": 0.0, "tpr_at_1pct": None, "gamma": None,
                      "a": None, "roc": None})
        return {"rmia": entry, **fixed, "per_person": {
            "skipped": "no (gamma, a) of the grid has a TPR above 0 at 1e-4 FPR, so the "
                       "reference selects none (it reports AUC 0 and TPR 0): no scores"}}
    entry.update({"auc": 100.0 * best["auc"], "tpr_at_1e-4": 100.0 * best[rmia.TPR_KEY],
                  # 1e-4 is below the ROC's resolution unless there are > 10,000 val images
                  "tpr_at_1pct": 100.0 * float(np.interp(0.01, best["fpr"], best["tpr"])),
                  "gamma": best["gamma"], "a": best["a"],
                  "roc": roc.compact(best["fpr"], best["tpr"])})
    aligned = all((v == v[0]).all() for v in (rows["forget"], rows["val"]))
    if not aligned:
        return {"rmia": entry, **fixed, "per_person": {
            "skipped": "config.mia.subsample='per_pass' gives each pass other val images, so a "
                       "score belongs to no one person; use 'once' for the attack on people"}}
    ids = ctx.dataset.annotations.identities
    images = np.concatenate([rows["forget"][0], rows["val"][0]])
    people = per_person.attack(best["scores"], ids[images], ctx.splits.forget, ctx.splits.val)
    persons = {}
    for how in ("mean", "max"):
        p = people[how]
        persons[how] = {"auc": 100.0 * p["auc"],
                        "tpr_at_fpr_1pct": 100.0 * p["tpr_at_fpr_1pct"],
                        "tpr_at_fpr_10pct": 100.0 * p["tpr_at_fpr_10pct"],
                        "roc": {"fpr": list(map(float, p["fpr"])),
                                "tpr": list(map(float, p["tpr"]))}}
    persons["members"], persons["nonmembers"] = people["n_members"], people["n_nonmembers"]
    return {"rmia": entry, **fixed, "per_person": persons}


def fixed_point(config, grid: list[dict]) -> dict[str, Any]:
    """``{"rmia_fixed": ...}``: the attack at ``config.mia.rmia_point`` (γ, a), a point stated
    before the study (``rmia.at_point``), in %; ``{}`` when the config names none."""
    point = config.mia.get("rmia_point")
    if not point:
        return {}
    return {"rmia_fixed": _at_point_entry(grid, *point)}


def _at_point_entry(grid: list[dict], gamma, a) -> dict[str, Any]:
    """``rmia.at_point`` as a record's entry, in %."""
    from oneshui_jax.mia import roc

    entry = rmia.at_point(grid, gamma, a)
    return {"gamma": entry["gamma"], "a": entry["a"], "auc": 100.0 * entry["auc"],
            "tpr_at_1pct": 100.0 * entry["tpr_at_1pct"],
            "roc": roc.compact(entry["fpr"], entry["tpr"])}


def select_on_held_out(ctx: Context, target: dict[str, np.ndarray],
                       reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """RMIA's grid point chosen without the evaluation's labels: the calibration attack has the
    retrained model as target (it trained on the held-out people, ``held_out``) and the
    calibration model as reference (it did not), the held-out people's images as members and
    the validation images as non-members; the point with the highest AUC wins (the first of
    equal ones, in the grid's order): with about a hundred members and a thousand
    non-members, a TPR at 1% FPR rests on ten non-members and is too noisy to choose by. Reads
    the ``z``, ``held_out`` and ``val`` rows only: never a forget or test image."""
    grid = _grid(ctx, ctx.config.mia.get("rmia_variant", "reference"), target, reference,
                 "held_out")
    chosen = grid[0]
    for entry in grid[1:]:
        if entry["auc"] > chosen["auc"]:
            chosen = entry
    return {"gamma": chosen["gamma"], "a": chosen["a"], "auc": 100.0 * chosen["auc"],
            "tpr_at_1pct": 100.0 * float(np.interp(0.01, chosen["fpr"], chosen["tpr"])),
            "members": int(target["held_out"].shape[1]),
            "nonmembers": int(target["val"].shape[1])}


class Evaluation:
    """RMIA and the attack on people for every target of one study (module docstring): the
    images of every pass (``plan``) and their augmented batches (``Passes``) are made once and
    shared by every target and reference model. ``study.run`` builds each target's reference
    model and hands both to :meth:`attack`."""

    def __init__(self, ctx: Context):
        mia = ctx.config.mia
        self.ctx = ctx
        self.rows = plan(ctx)
        self.passes = Passes(ctx, self.rows, int(mia.get("batch_size", 32)),
                             mia.get("cache_mb", 0))
        self.selected: dict[str, Any] | None = None  # calibrate's point

    def calibrate(self, retrain_params: Any, retrain_dir: str, calibration_params: Any,
                  calibration_dir: str) -> dict[str, Any]:
        """Selects the grid point on the held-out request (``select_on_held_out``) from the
        signals of the retrained model and of the calibration model; every later
        :meth:`attack` also reports the attack at that point (``mia.rmia_held_out``)."""
        target = signals(self.ctx, retrain_params, self.passes, retrain_dir)
        reference = signals(self.ctx, calibration_params, self.passes, calibration_dir)
        self.selected = select_on_held_out(self.ctx, target, reference)
        return self.selected

    def attack(self, record: dict, params: Any, reference_params: Any,
               reference_dir: str) -> None:
        """Adds ``mia.rmia``, ``mia.per_person`` and ``mia.reference_run_dir`` to ``record``
        (the target ``params``; its reference model ``reference_params``, whose run folder
        ``reference_dir`` caches its signals)."""
        ctx = self.ctx
        reference = signals(ctx, reference_params, self.passes, reference_dir)
        target = signals(ctx, params, self.passes, ctx.run_dir(record["method"]))
        record.setdefault("mia", {}).update(attack(
            ctx, target, reference, ctx.config.mia.get("rmia_variant", "reference"), self.rows,
            self.selected))
        if self.selected is not None:
            record["mia"]["rmia_held_out"]["selected_on"] = self.selected
        record["mia"]["reference_run_dir"] = reference_dir
