"""ROC curves of the membership attacks (SPEC.md 5.5: the reference saves ``roc_low_cost.pdf``).

One panel per attack, one curve per method, the FPR axis on a log scale (FPRs clipped at
``FPR_FLOOR`` so that a curve starting at FPR 0 stays visible), the chance diagonal, and each
method's AUC in the legend. Uses ``matplotlib.figure.Figure`` on an Agg canvas, no ``pyplot``
global state (the reference's ``SciencePlots`` style is not used); saving is the caller's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FPR_FLOOR = 1e-5
CHANCE_LABEL = "chance"
# FPRs at which a stored or averaged ROC curve is kept: 0, then 200 log-spaced points to 1.
GRID = np.concatenate([[0.0], np.geomspace(FPR_FLOOR, 1.0, 200)])


def compact(fpr: Sequence[float], tpr: Sequence[float]) -> dict[str, list[float]]:
    """A ROC curve as ``{"fpr", "tpr"}`` lists at the FPRs of ``GRID`` (``np.interp``), so a
    record stores 201 points whatever the size of the evaluated sets."""
    return {"fpr": GRID.tolist(),
            "tpr": np.interp(GRID, np.asarray(fpr, np.float64),
                             np.asarray(tpr, np.float64)).tolist()}


def auc_label(method: str, auc: float, percent: bool = False) -> str:
    """The legend entry of one curve: ``auc`` (a fraction) as given, or in % as the tables show
    it (``percent``)."""
    return f"{method} (AUC {100 * auc:.1f}%)" if percent else f"{method} (AUC {auc:.3f})"


def roc_figure(curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], float]]],
               *, panel_size: float = 4.0, colors: Mapping[str, str] | None = None,
               percent: bool = False) -> Figure:
    """``curves[method][attack] = (fpr, tpr, auc)`` -> a Figure with one panel per attack (in order
    of first appearance); each panel has one line per method that has that attack, plus the
    chance diagonal (the last line). ``colors[method]``: the method's colour in every panel
    (default: matplotlib's cycle, which gives a method another colour in a panel where an
    earlier method has no curve); ``percent``: AUCs in % in the legends."""
    attacks = list(dict.fromkeys(a for per_method in curves.values() for a in per_method))
    if not attacks:
        raise ValueError("no ROC curve to draw")
    fig = Figure(figsize=(panel_size * len(attacks), panel_size), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(attacks), squeeze=False)[0]
    chance = np.geomspace(FPR_FLOOR, 1.0, 200)  # exact end points
    for ax, attack in zip(axes, attacks, strict=True):
        for method, per_method in curves.items():
            if attack not in per_method:
                continue
            fpr, tpr, auc = per_method[attack]
            fpr = np.clip(np.asarray(fpr, dtype=np.float64), FPR_FLOOR, 1.0)
            ax.plot(fpr, np.asarray(tpr, dtype=np.float64), label=auc_label(method, auc, percent),
                    color=None if colors is None else colors.get(method))
        ax.plot(chance, chance, linestyle="--", color="grey", linewidth=1, label=CHANCE_LABEL)
        ax.set_xscale("log")
        ax.set_xlim(FPR_FLOOR, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(attack)
        ax.legend(loc="lower right", fontsize="small")
    return fig
