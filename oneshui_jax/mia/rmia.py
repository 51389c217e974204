"""RMIA as the reference runs it for the paper's MIA numbers (SPEC.md 5.5, quirks Q5 and Q6).

Inputs are per-sample **losses** (not probabilities, Q5) from ``passes`` train-transform passes
(the reference uses 8), of the target model (``*_in``) and of its single OUT reference model
(``*_avg``), on z = train ∪ val (concatenated by the caller), the forget set and the validation set.
For each ``γ`` in (1, 2, 4, 8) and ``a`` in (0.2, 0.3, 0.5, 1), in every pass::

    s(u)         = ((1 + a) / 2) * u_avg + (1 - a) / 2
    z_ratio      = 1 / (z_in / z_avg) / s(z)        # the reference's operation order
    forget_ratio = (f_in / f_avg) / s(f)
    val_ratio    = (v_in / v_avg) / s(v)
    votes        = outer(x_ratio, z_ratio) > γ      # x = forget then val, [n_x, n_z]

then ``torch.mode`` over the passes takes a majority vote per (x, z), the vote is averaged over z
and ``score = -fraction``. The attack separates forget (label 1) from val (label 0); it reports
``roc_auc_score`` and ``np.interp(1e-4, fpr, tpr)`` on ``sklearn.metrics.roc_curve``. ``best``
picks (γ, a) by that TPR on the evaluation labels themselves (oracle tuning, Q5).

**Tie rule of the vote.** ``torch.mode`` on CPU (``mode_kernel_impl`` in PyTorch's
``aten/src/ATen/native/cpu/TensorCompareKernel.cpp``, dispatched for ``bool``) sorts the slice in
ascending order and walks the runs of equal values, replacing the current mode only when a run is
*strictly* longer (``if (temp_freq > max_freq)``). Of equally frequent values the smallest wins: a
4-4 tie of False/True gives **False**. So the vote is True iff more than half of the passes vote
True. **Verified on CUDA** (``tools/check_torch_mode_ties.py``, the reference's own call
``torch.mode(torch.stack(votes), 0).values * 1.0`` under bf16 autocast, torch 2.11.0+cu130 on an
NVIDIA H200, 2026-12-04, ``bench/results/h200_2026-12-04_fidelity/torch_mode_ties.json``): with
8 passes, the paper's, all 70 arrangements of a 4-4 tie give False on CUDA as on CPU, in small
blocks and in [8, 256, 30000] blocks of the CelebA attack's size; so do ties of 2, 4 and 16
passes. With **6** passes CUDA gives **True** for every 3-3 tie (CPU: False): CUDA's rule depends
on the slice length, so ``config.mia.passes`` other than 8 (and 2, 4, 16) follows the CPU rule,
which the reference on a GPU would not.

**Q6 (CelebA).** The reference draws, in every pass, its own 30,000-sample subset of z and
7,000-sample subset of val, and votes per row index, so val rows are misaligned across passes.
``subsample`` reproduces that (``per_pass=True``) or the fix (one draw for all passes);
``score_grid`` takes the already subsampled arrays.

``score_grid_canonical`` is the named alternative: the canonical offline RMIA on probabilities.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

GAMMAS = (1, 2, 4, 8)  # outer loop of the reference's grid
AS = (0.2, 0.3, 0.5, 1)  # inner loop
TARGET_FPR = 1e-4  # "TPR@0.01%FPR"
TPR_KEY = "tpr_at_1e-4"
MAX_ELEMENTS = 1 << 22  # [rows, n_z] elements of one chunk's likelihood-ratio block


def chunk_rows(n_z: int, max_elements: int = MAX_ELEMENTS) -> int:
    """Rows of x per chunk so that a [rows, n_z] block has at most ``max_elements`` elements
    (at least one row)."""
    return max(1, int(max_elements) // max(1, int(n_z)))


def _passes(arrays: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """Checks the [passes, n] shapes (same passes everywhere, same n within a pair)."""
    out = {k: np.asarray(v, dtype=dtype) for k, v in arrays.items()}
    for k, v in out.items():
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"{k} must be a non-empty [passes, n] array, got shape {v.shape}")
    passes = {v.shape[0] for v in out.values()}
    if len(passes) != 1:
        raise ValueError("all arrays need the same number of passes, got "
                         + ", ".join(f"{k}: {v.shape[0]}" for k, v in out.items()))
    if next(iter(passes)) > 255:
        raise ValueError("at most 255 passes (votes are counted in uint8)")
    keys = list(out)
    for k_in, k_avg in zip(keys[::2], keys[1::2], strict=True):
        if out[k_in].shape != out[k_avg].shape:
            raise ValueError(f"{k_in} {out[k_in].shape} and {k_avg} {out[k_avg].shape} differ")
    return out


def _vote_fractions(x_ratio: np.ndarray, z_ratio: np.ndarray, gammas, rows: int) -> np.ndarray:
    """[len(gammas), n_x]: fraction of z whose majority vote over passes of
    ``x_ratio[p, i] * z_ratio[p, j] > γ`` is True (ties -> False, torch.mode on CPU).

    Works on blocks of ``rows`` x rows: memory is O(rows · n_z), never [passes, n_x, n_z]."""
    passes, n_x = x_ratio.shape
    n_z = z_ratio.shape[1]
    rows = max(1, min(rows, n_x))
    lr = np.empty((rows, n_z), dtype=np.result_type(x_ratio, z_ratio))
    hit = np.empty((rows, n_z), dtype=bool)
    counts = np.empty((len(gammas), rows, n_z), dtype=np.uint8)
    fractions = np.empty((len(gammas), n_x), dtype=np.float64)
    gammas = [lr.dtype.type(g) for g in gammas]
    for start in range(0, n_x, rows):
        stop = min(start + rows, n_x)
        m = stop - start
        block, h, c = lr[:m], hit[:m], counts[:, :m]
        c.fill(0)
        for p in range(passes):
            np.multiply(x_ratio[p, start:stop, None], z_ratio[p, None, :], out=block)
            for g, gamma in enumerate(gammas):
                np.greater(block, gamma, out=h)
                np.add(c[g], h, out=c[g])
        for g in range(len(gammas)):
            # True wins only with strictly more than half of the votes (4-4 -> False).
            fractions[g, start:stop] = np.count_nonzero(c[g] > passes // 2, axis=1) / n_z
    return fractions


def _entry(gamma, a, scores: np.ndarray, labels: np.ndarray) -> dict:
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"gamma": gamma, "a": a, "auc": float(roc_auc_score(labels, scores)),
            TPR_KEY: float(np.interp(TARGET_FPR, fpr, tpr)),
            "fpr": fpr, "tpr": tpr, "scores": scores}


def _grid(ratios, labels: np.ndarray, gammas, alphas, rows: int, sign: float) -> list[dict]:
    """Shared engine: ``ratios(a) -> (x_ratio, z_ratio)``; entries in γ-outer, a-inner order."""
    by_a = {}
    for a in alphas:
        x_ratio, z_ratio = ratios(a)
        by_a[a] = sign * _vote_fractions(x_ratio, z_ratio, gammas, rows)
    return [_entry(g, a, by_a[a][i], labels) for i, g in enumerate(gammas) for a in alphas]


def score_grid(z_in, z_avg, forget_in, forget_avg, val_in, val_avg, *, gammas=GAMMAS, alphas=AS,
               rows: int | None = None, max_elements: int = MAX_ELEMENTS,
               dtype=np.float32) -> list[dict]:
    """The reference's RMIA grid on losses (SPEC.md 5.5, ``low_cost_mia.py``; Q5 kept).

    Every argument is a [passes, n] array of per-sample losses; ``*_in`` of the target model,
    ``*_avg`` of the reference model; ``z`` is train ∪ val as the caller concatenates it. Returns
    one dict per (γ, a), γ in ``gammas`` outer, a in ``alphas`` inner, with

    * ``gamma``, ``a``;
    * ``auc``: ``roc_auc_score`` as a **fraction** in [0, 1] (the reference prints it × 100);
    * ``tpr_at_1e-4``: ``np.interp(1e-4, fpr, tpr)`` on ``roc_curve`` (a fraction);
    * ``fpr``, ``tpr``: that ROC curve; ``scores``: the per-sample scores ``-fraction`` of the
      forget rows then the val rows (higher = member; labels forget 1, val 0).

    Arithmetic is in ``dtype`` (float32 like the reference's loss tensors). ``rows`` (default from
    ``max_elements``) is the number of x rows per chunk; results do not depend on it.
    """
    arr = _passes({"z_in": z_in, "z_avg": z_avg, "forget_in": forget_in,
                   "forget_avg": forget_avg, "val_in": val_in, "val_avg": val_avg}, dtype)
    x_in = np.concatenate([arr["forget_in"], arr["val_in"]], axis=1)
    x_avg = np.concatenate([arr["forget_avg"], arr["val_avg"]], axis=1)
    labels = np.r_[np.ones(arr["forget_in"].shape[1]), np.zeros(arr["val_in"].shape[1])]
    t = np.dtype(dtype).type

    def ratios(a):
        def s(u):
            return t((1 + a) / 2) * u + t((1 - a) / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            z_ratio = t(1) / (arr["z_in"] / arr["z_avg"]) / s(arr["z_avg"])
            x_ratio = (x_in / x_avg) / s(x_avg)
        return x_ratio, z_ratio

    rows = chunk_rows(arr["z_in"].shape[1], max_elements) if rows is None else int(rows)
    with np.errstate(invalid="ignore"):
        return _grid(ratios, labels, gammas, alphas, rows, sign=-1.0)


def score_grid_canonical(z_in, z_ref, forget_in, forget_ref, val_in, val_ref, *, gammas=GAMMAS,
                         alphas=AS, scale_z: bool = False, rows: int | None = None,
                         max_elements: int = MAX_ELEMENTS, dtype=np.float64) -> list[dict]:
    """Canonical offline RMIA on **probabilities** (the formula at the end of SPEC.md 5.5); an
    optional extra (Q5), not what the paper reports.

    ``score(x) = Pr_z[(p(x|θ) / p̄(x)) / (p(z|θ) / p(z)) > γ]`` with
    ``p̄(x) = ((1 + a) / 2) · p_OUT(x) + (1 − a) / 2``; ``p(z)`` is the reference model's
    probability of z as the formula writes it, or the same offline scaling when ``scale_z``.
    Arguments are [passes, n] probabilities of the true label (target ``*_in``, OUT reference
    ``*_ref``). Passes are combined by the same majority vote as ``score_grid`` (ties -> False);
    the score is the fraction itself (higher = member). Same output as ``score_grid``.
    """
    arr = _passes({"z_in": z_in, "z_ref": z_ref, "forget_in": forget_in,
                   "forget_ref": forget_ref, "val_in": val_in, "val_ref": val_ref}, dtype)
    x_in = np.concatenate([arr["forget_in"], arr["val_in"]], axis=1)
    x_ref = np.concatenate([arr["forget_ref"], arr["val_ref"]], axis=1)
    labels = np.r_[np.ones(arr["forget_in"].shape[1]), np.zeros(arr["val_in"].shape[1])]

    def ratios(a):
        def p_bar(u):
            return (1 + a) / 2 * u + (1 - a) / 2
        p_z = p_bar(arr["z_ref"]) if scale_z else arr["z_ref"]
        with np.errstate(divide="ignore", invalid="ignore"):
            return x_in / p_bar(x_ref), p_z / arr["z_in"]

    rows = chunk_rows(arr["z_in"].shape[1], max_elements) if rows is None else int(rows)
    with np.errstate(invalid="ignore"):
        return _grid(ratios, labels, gammas, alphas, rows, sign=1.0)


def best(grid: list[dict]) -> dict | None:
    """The reference's choice of (γ, a) (SPEC.md 5.5): the entry with the highest
    ``tpr_at_1e-4``, searching from a best TPR of 0 with strict ``>``. So the first of equal TPRs
    wins, and **``None`` is returned when no entry has a TPR above 0**: the reference then
    keeps its starting values and reports AUC 0 and TPR 0 (``study.privacy.attack`` does the
    same)."""
    chosen, best_tpr = None, 0.0
    for entry in grid:
        if entry[TPR_KEY] > best_tpr:
            chosen, best_tpr = entry, entry[TPR_KEY]
    return chosen


def at_point(grid: list[dict], gamma: float, a: float) -> dict:
    """The grid entry of (``gamma``, ``a``) with its AUC and its TPR at 1% FPR (fractions):
    the attack at a point fixed before any study, which no label chose (the robust column of
    the report, beside ``best``'s oracle-tuned one). ValueError naming the grid when the point
    is not on it."""
    for entry in grid:
        if (entry["gamma"], entry["a"]) == (gamma, a):
            return {**entry, "tpr_at_1pct": float(np.interp(0.01, entry["fpr"], entry["tpr"]))}
    points = sorted({(e["gamma"], e["a"]) for e in grid})
    raise ValueError(f"(gamma, a) = ({gamma}, {a}) is not a point of the RMIA grid {points}")


def draw_indices(n_z_total: int, n_val_total: int, *, n_z: int, n_val: int, passes: int,
                 rng: np.random.Generator, per_pass: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The positions ``subsample`` keeps: ``([passes, n_z], [passes, n_val])`` into z and val,
    without replacement within a pass; one fresh draw per pass (``per_pass``, the reference) or
    one draw for all passes (the fix). ValueError when more are asked for than there are."""
    if n_z > n_z_total or n_val > n_val_total:
        raise ValueError(f"cannot draw {n_z} of {n_z_total} z or {n_val} of {n_val_total} val "
                         "samples")

    def draws(n, k):
        if per_pass:
            return np.stack([rng.permutation(n)[:k] for _ in range(passes)])
        return np.broadcast_to(rng.permutation(n)[:k], (passes, k))

    return draws(n_z_total, n_z), draws(n_val_total, n_val)


def subsample(z_in, z_avg, val_in, val_avg, *, n_z: int, n_val: int,
              rng: np.random.Generator, per_pass: bool = True):
    """CelebA's subsampling in ``compute_mia_metric`` (Q6): z to ``n_z`` (30,000) and val to
    ``n_val`` (7,000) samples, the same indices for ``*_in`` and ``*_avg``.

    ``per_pass=True`` is the reference: a fresh random draw in every pass (its ``torch.randperm``
    stream cannot be replayed here), so val rows are misaligned across passes in the vote.
    ``per_pass=False`` is the fix: one draw used by every pass. Returns
    ``(z_in, z_avg, val_in, val_avg)`` as [passes, n] arrays."""
    z_in, z_avg, val_in, val_avg = (np.asarray(v) for v in (z_in, z_avg, val_in, val_avg))
    iz, iv = draw_indices(z_in.shape[1], val_in.shape[1], n_z=n_z, n_val=n_val,
                          passes=z_in.shape[0], rng=rng, per_pass=per_pass)
    take = np.take_along_axis
    return (take(z_in, iz, 1), take(z_avg, iz, 1), take(val_in, iv, 1), take(val_avg, iv, 1))
