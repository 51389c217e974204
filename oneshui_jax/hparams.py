"""The reference's hyper-parameter table: ``method/configs/const.py:get_const`` (ViT models).

The reference picks its training values per (method, dataset, N) in ``get_const`` and hands them
to ``parser.py`` as defaults (SPEC.md 4.2, 6.6, 7 and 8). This module holds that table as data:

* ``DEFAULTS``: the fields of ``Const()``, the value of everything no branch overrides;
* ``_METHOD_BASE``: what each method's block sets for every dataset and N;
* ``_BRANCHES``: the per-(dataset, N) branches; the first whose condition on N holds applies. When
  none holds the reference silently keeps the values above (SPEC Q24); ``reference`` then says
  ``tuned=False`` and ``warn_if_untuned`` logs it (the reference does not warn);
* ``_PARSER``: per-method ``parser.py`` defaults that ``get_const`` does not touch (SCRUB's
  alpha / gamma / temperature, the meta-loss shape, ...).

``reference(method, dataset, N)`` resolves them for a ViT (``"vit" in model``), as
``get_const`` + ``parser.parse_args`` would, keeping only the fields the method reads.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

from absl import logging

from oneshui_jax.data import catalog
from oneshui_jax.errors import ConfigError

METHODS = ("pretrain", "retrain", "meta_unlearn", "scrub", "bad_teacher", "ssd", "lipschitz",
           "pgu")

SAME_AS_N = "N"  # a value resolved to the request size N

# ``Const()``: every field keeps this value unless a branch below sets it. Parser types applied
# (``forgetting_epochs`` is the float 0.0 in const.py but an int argument; ``t_max`` is inf there
# and ``parse_args`` clamps it to ``epochs``: see ``reference``).
DEFAULTS: dict[str, Any] = dict(
    batch_size=32,
    epochs=8,
    lr=0.1,
    clip_grad=0.0,
    momentum=0.0,
    weight_decay=0.0,
    optimizer="sgd",
    amsgrad=False,
    scheduler="const",
    t_max=float("inf"),
    step_size=5,
    milestones=(7,),
    gamma=0.2,
    warmup_epochs=0,
    evaluate_every=1,
    meta_lr=0.1,
    lipschitz_weighting=0.0,
    forgetting_epochs=0,
    use_train_aug=True,
    scale_size_forget=1,
    scale_size_retain=1,
    ssd_dampening_constant=0.1,
    ssd_selection_weighting=0.1,
    pgu_gamma=0.9,
    num_identities_simulation=0,
)

_PRETRAIN = dict(epochs=30, lr=1e-3, clip_grad=0.0, momentum=0.9, scheduler="cosine",
                 warmup_epochs=2)

# What each method's block of const.py sets whatever the dataset and N (ViT).
_METHOD_BASE: dict[str, dict[str, Any]] = {
    "pretrain": _PRETRAIN,
    "retrain": _PRETRAIN,
    "ssd": dict(batch_size=128),
    "lipschitz": dict(batch_size=128, lr=0.01, lipschitz_weighting=30.0),  # σ: 0.01 for ResNet
    "pgu": dict(batch_size=128, epochs=5, lr=0.1, pgu_gamma=0.8),
    "meta_unlearn": dict(batch_size=64, optimizer="adamw", scheduler="cosine", warmup_epochs=0,
                         num_identities_simulation=SAME_AS_N),
    "scrub": dict(epochs=10, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                  scheduler="cosine"),
    "bad_teacher": dict(epochs=5, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                        scheduler="cosine", use_train_aug=False),
}


@dataclasses.dataclass(frozen=True)
class _When:
    """A condition on N as const.py writes it."""

    text: str
    holds: Callable[[int], bool]


def _any() -> _When:
    return _When("any N", lambda n: True)


def _is(*ns: int) -> _When:
    text = f"N={ns[0]}" if len(ns) == 1 else "N in {" + ", ".join(map(str, ns)) + "}"
    return _When(text, lambda n: n in ns)


def _at_most(k: int) -> _When:
    return _When(f"N<={k}", lambda n: n <= k)


# method -> dataset -> ((condition on N, values), ...), tried in order, the first that holds
# applies. A (method, dataset) pair missing here has no per-dataset values at all.
_BRANCHES: dict[str, dict[str, tuple[tuple[_When, dict[str, Any]], ...]]] = {
    "pretrain": {
        "celebahq": ((_any(), dict(weight_decay=1e-3)),),
        "celeba": ((_any(), dict(weight_decay=1e-4)),),
        "mufac": ((_any(), dict(weight_decay=1e-4)),),
    },
    "retrain": {},  # filled below: the same branch as pretrain
    "ssd": {
        "celebahq": (
            (_at_most(20), dict(ssd_dampening_constant=0.1, ssd_selection_weighting=50.0)),
            (_is(50), dict(ssd_dampening_constant=0.5, ssd_selection_weighting=10.0)),
            (_is(200), dict(ssd_dampening_constant=0.5, ssd_selection_weighting=10.0)),
        ),
        "celeba": (
            (_at_most(20), dict(ssd_dampening_constant=2.0, ssd_selection_weighting=50.0)),
            (_is(50), dict(ssd_dampening_constant=2.0, ssd_selection_weighting=50.0)),
            (_is(200), dict(ssd_dampening_constant=2.0, ssd_selection_weighting=50.0)),
        ),
        "mufac": (
            (_is(5), dict(ssd_dampening_constant=0.1, ssd_selection_weighting=50.0)),
            (_is(10), dict(ssd_dampening_constant=0.1, ssd_selection_weighting=1.0)),
        ),
    },
    "pgu": {
        # celeba's branch is a copy of celebahq's (SPEC Q24).
        **{ds: (
            (_at_most(20), dict(lr=0.1, epochs=5, pgu_gamma=0.9, use_train_aug=False)),
            (_is(50), dict(lr=0.1, epochs=5, pgu_gamma=0.9, use_train_aug=False)),
            (_is(200), dict(lr=0.01, epochs=10, pgu_gamma=0.75, use_train_aug=False)),
        ) for ds in ("celebahq", "celeba")},
        "mufac": (
            (_is(5), dict(lr=0.01, epochs=5, pgu_gamma=0.9, use_train_aug=False)),
            (_is(10), dict(lr=0.1, epochs=10, pgu_gamma=0.75, use_train_aug=False)),
        ),
    },
    "meta_unlearn": {
        "celeba": ((_any(), dict(epochs=3, lr=1e-4, meta_lr=0.1)),),
        "celebahq": ((_any(), dict(epochs=3, lr=1e-4, meta_lr=0.1)),),
        "mufac": (
            (_is(5), dict(epochs=10, lr=1e-2, meta_lr=1e-3)),
            (_is(10), dict(epochs=3, lr=1e-3, meta_lr=1e-3)),
        ),
    },
    "scrub": {
        "celeba": (
            (_is(1, 5, 10), dict(lr=5e-3, use_train_aug=False, forgetting_epochs=5)),
            (_is(200), dict(lr=1e-3, use_train_aug=False, forgetting_epochs=7)),
            (_is(500), dict(lr=1e-3, use_train_aug=False, forgetting_epochs=3)),
        ),
        "celebahq": (
            (_is(1, 20, 50), dict(lr=1e-2, forgetting_epochs=5)),
            (_is(200), dict(lr=1e-3, forgetting_epochs=5)),
            (_is(500), dict(lr=5e-4, forgetting_epochs=7)),
        ),
        "mufac": (
            (_is(5), dict(lr=1e-3, use_train_aug=False, forgetting_epochs=7)),
            (_is(10), dict(lr=1e-3, use_train_aug=True, forgetting_epochs=5)),
        ),
    },
    "bad_teacher": {
        "celeba": (
            (_is(1, 5, 10), dict(lr=1e-4)),
            (_is(200), dict(batch_size=256, lr=1e-4)),
            (_is(500), dict(batch_size=256, lr=1e-4)),
        ),
        "celebahq": (
            (_is(1, 20, 50), dict(lr=1e-4)),
            (_is(200), dict(batch_size=256, lr=1e-4)),
            (_is(500), dict(batch_size=256, lr=1e-5)),
        ),
        "mufac": (
            (_is(5), dict(lr=1e-3, use_train_aug=True)),
            (_is(10), dict(lr=1e-3, use_train_aug=True)),
        ),
    },
}

_BRANCHES["retrain"] = _BRANCHES["pretrain"]

# Applied after the branches, whatever matched: MetaUnlearn's single-identity request simulates
# larger requests (const.py, ``num_identities == 1``). This does not make a pair tuned: MUFAC
# N=1 still has no epochs / meta_lr of its own (SPEC Q24).
_AFTER: dict[str, dict[str, tuple[tuple[_When, dict[str, Any]], ...]]] = {
    "meta_unlearn": {
        "celebahq": ((_is(1), dict(num_identities_simulation=50, lr=1e-4)),),
        "celeba": ((_is(1), dict(num_identities_simulation=10, lr=1e-3)),),
        "mufac": ((_is(1), dict(num_identities_simulation=10, lr=1e-3)),),
    },
}

# parser.py defaults (not in const.py) that the method reads; the reference's argument names.
_PARSER: dict[str, dict[str, Any]] = {
    "meta_unlearn": dict(hidden_size=512, num_layers=0, prob_dropout=0.5, use_retain=False,
                         forget_epochs=1, forget_loss="smooth_l1", loss_type="full",
                         use_accs=True, use_feats=True, use_ids=True, use_targets=True),
    "scrub": dict(alpha_scrub=0.001, gamma_scrub=0.99, temperature_scrub=4.0,
                  batch_size_retain=32),
    "lipschitz": dict(lipschitz_n_samples=25),
}

# The resolved fields each method reads (SPEC.md 4.2, 6.6, 7).
_SGD_TRAIN = ("batch_size", "epochs", "lr", "momentum", "weight_decay", "optimizer",
              "scheduler", "t_max")
_KEYS: dict[str, tuple[str, ...]] = {
    "pretrain": _SGD_TRAIN + ("warmup_epochs", "clip_grad", "evaluate_every"),
    "retrain": _SGD_TRAIN + ("warmup_epochs", "clip_grad", "evaluate_every"),
    "meta_unlearn": ("batch_size", "epochs", "lr", "weight_decay", "optimizer", "amsgrad",
                     "scheduler", "t_max", "warmup_epochs", "meta_lr",
                     "num_identities_simulation", "use_train_aug"),
    "scrub": _SGD_TRAIN + ("forgetting_epochs", "use_train_aug"),
    "bad_teacher": _SGD_TRAIN + ("use_train_aug",),
    "ssd": ("batch_size", "ssd_dampening_constant", "ssd_selection_weighting"),
    "lipschitz": ("batch_size", "lr", "lipschitz_weighting"),
    "pgu": ("batch_size", "epochs", "lr", "pgu_gamma", "use_train_aug"),
}

# What the code does where it ignores the resolved value: MetaUnlearn's meta-loss optimisers are
# ``AdamW(..., amsgrad=True)`` in ``meta_unlearn.py:train_loss`` although const leaves False.
_EFFECTIVE: dict[str, dict[str, Any]] = {"meta_unlearn": dict(amsgrad=True)}


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The reference's values for one (method, dataset, N).

    ``values`` holds every field the method reads, under the reference's argument names.
    ``tuned`` is False where const.py has no branch for (dataset, N) and silently keeps its
    generic values; ``note`` says in words where the values come from.
    """

    method: str
    dataset: str
    num_identities: int
    values: dict[str, Any]
    tuned: bool
    note: str


def _check(method: str, dataset: str, num_identities: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    covered = catalog.names(reference_table=True)
    if dataset not in covered:
        raise ConfigError(f"unknown dataset {dataset!r}; the reference's table covers "
                          f"{', '.join(covered)}")
    if isinstance(num_identities, bool) or not isinstance(num_identities, numbers.Integral):
        raise ConfigError(f"N (num_identities) must be an int, got {num_identities!r}")
    if num_identities < 1:
        raise ConfigError(f"N (num_identities) must be >= 1, got {num_identities}")


def _first(rules, n: int) -> tuple[_When, dict[str, Any]] | None:
    return next(((when, vals) for when, vals in rules if when.holds(n)), None)


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in values.items())


def reference(method: str, dataset: str, num_identities: int) -> Hyperparameters:
    """``get_const`` (+ ``parse_args``) of the reference for a ViT; see the module docstring.

    Raises ``ConfigError`` for an unknown method or dataset or N < 1.
    """
    _check(method, dataset, num_identities)
    n = int(num_identities)
    resolved = {**DEFAULTS, **_METHOD_BASE[method]}
    rules = _BRANCHES.get(method, {}).get(dataset, ())
    hit = _first(rules, n)
    if hit is not None:
        resolved.update(hit[1])
    after = _first(_AFTER.get(method, {}).get(dataset, ()), n)
    if after is not None:
        resolved.update(after[1])
    resolved = {k: (n if v is SAME_AS_N else v) for k, v in resolved.items()}
    resolved["t_max"] = min(resolved["t_max"], resolved["epochs"])  # parse_args' clamp
    resolved["t_max"] = int(resolved["t_max"])
    resolved.update(_EFFECTIVE.get(method, {}))
    values = {k: resolved[k] for k in _KEYS[method]}
    values.update(_PARSER.get(method, {}))

    tuned = hit is not None or not rules
    later = after[1] if after is not None else {}
    if not rules:
        note = f"const.py: {method} (the same for every dataset and N)"
    elif method in ("pretrain", "retrain"):
        note = f"const.py: {method}, {dataset} (ViT; the same for every N)"
    elif hit is not None:
        note = f"const.py: {method}, {dataset}, {hit[0].text}"
        if later:
            note += f", then its N={n} rule ({_fmt(later)})"
    else:
        # The fields the branches would have set, minus those a later rule sets anyway.
        branch_keys = dict.fromkeys(k for _, vals in rules for k in vals)
        fallback = {k: values[k] for k in branch_keys if k not in later}
        configured = "; ".join(when.text for when, _ in rules)
        note = (f"no tuned {method} values for {dataset} N={n} (const.py configures only "
                f"{configured}): the reference falls back to its generic defaults "
                f"{_fmt(fallback)}")
        if later:
            note += f" ({_fmt(later)} come from its N={n} rule)"
    return Hyperparameters(method, dataset, n, values, tuned, note)


def warn_if_untuned(h: Hyperparameters) -> None:
    """One logged warning for a pair the reference never tuned (the reference is silent)."""
    if not h.tuned:
        logging.warning("%s: %s", h.method, h.note)
