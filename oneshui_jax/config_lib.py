"""Building blocks of the config files under ``configs/``.

Config files are loaded by path (``--config=configs/mufac.py``) and cannot import each other, so
what they share lives here:

* ``base_config``: the blocks every study has, with their defaults (the paper's setting); a
  config file overrides what differs for its dataset;
* ``parse_arg``: the ``key=value,key=value`` argument after the colon of ``--config=file.py:arg``;
* ``study_stages``: the stages of ``method=`` (one method or a group of them);
* ``reference_methods`` / ``real_data_config``: every method block with the reference's values
  for (dataset, N) (its ``parser.py`` defaults and ``const.py`` values, ``oneshui_jax.hparams``;
  ``hparams_table`` lists them, ``configs/HPARAMS.md``);
* ``cpu_profile``: the same study shrunk to run on CPU (MUFAC, a small ViT from scratch);
* ``runlocal``: any config shrunk to seconds for smoke tests (``runlocal=True``).
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import ml_collections
from ml_collections import config_dict

from oneshui_jax import hparams
from oneshui_jax.metrics import SECOND_ORACLE
from oneshui_jax.unlearn import api, registry

# Methods a config file can name: the reference's table, then the API's methods it lacks.
METHODS = hparams.METHODS + tuple(m for m in registry.METHODS if m not in hparams.METHODS)
ONE_SHOT_BASELINES = ("ssd", "lipschitz", "pgu")  # on the method API; blocks always present
FULL_DATA_BASELINES = ("scrub", "bad_teacher")  # ACCESS full; blocks always present
# The servable methods (ACCESS support / stats), in table order; ``method=one_shot`` runs them all
# after one pretrain / retrain.
ONE_SHOT = ("meta_unlearn", "support_ascent") + ONE_SHOT_BASELINES
# Every method of the paper's comparison table (Tables 1-3), in table order.
ALL = ONE_SHOT + FULL_DATA_BASELINES
# What ``method=`` may name besides one method: several methods after one pretrain / retrain.
METHOD_GROUPS = {"one_shot": ONE_SHOT, "all": ALL}
METHOD_CHOICES = METHODS + tuple(METHOD_GROUPS)  # every value of a config's ``method=``
# The stages every study starts with: the model, the oracle and a second oracle (another
# training seed, the same data), whose ToW against the first is the noise floor of ToW.
TRAINING = ("pretrain", "retrain", SECOND_ORACLE)  # metrics.SECOND_ORACLE: the ToW noise floor

_TRUE = ("true", "t", "y", "yes", "1")
_FALSE = ("false", "f", "n", "no", "0")


def _convert(key: str, value: str, default: Any) -> Any:
    """``value`` as the type of ``default`` (str, int, float or bool)."""
    if isinstance(default, bool):
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"config argument {key}={value!r} is not a boolean (true / false)")
    if isinstance(default, int | float):
        try:
            return type(default)(value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r} is not "
                             f"{'an int' if isinstance(default, int) else 'a number'}") from None
    return value


def parse_arg(arg: str | None, allowed: dict[str, Any],
              choices: dict[str, tuple[Any, ...]] | None = None,
              runlocal_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parses ``"key=value,key=value"`` into ``allowed`` (key -> default value).

    A value takes the type of its default (``N=5`` is an int when the default is). ``choices``
    optionally lists the values a key accepts. A malformed item, an unknown key, a value of the
    wrong type or outside its choices raises one ``ValueError`` naming the key.
    ``runlocal_defaults``: other defaults where the argument says ``runlocal=True`` (a key the
    argument gives keeps its value).
    """
    out = dict(allowed)
    given = set()
    expected = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items())
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            example = ",".join(f"{k}={v}" for k, v in allowed.items())
            raise ValueError(f"config argument {item!r} is not key=value (e.g. {example!r}); "
                             f"keys: {expected}")
        if key not in allowed:
            raise ValueError(f"unknown config argument {key!r}; expected {expected}")
        out[key] = _convert(key, value, allowed[key])
        given.add(key)
        if choices and key in choices and out[key] not in choices[key]:
            raise ValueError(f"config argument {key}={value!r} must be one of "
                             f"{', '.join(map(str, choices[key]))}")
    if out.get("runlocal") and runlocal_defaults:
        out.update({k: v for k, v in runlocal_defaults.items() if k not in given})
    return out


def study_stages(method: str) -> tuple[str, ...]:
    """``config.stages`` for ``method=``: :data:`TRAINING`, then the method (none for a
    training stage) or every method of a group of :data:`METHOD_GROUPS`."""
    if method not in METHOD_CHOICES:
        raise ValueError(f"unknown method {method!r}; expected one of "
                         f"{', '.join(METHOD_CHOICES)}")
    if method in METHOD_GROUPS:
        return TRAINING + METHOD_GROUPS[method]
    return TRAINING if method in TRAINING else TRAINING + (method,)


def base_config(dataset: str, num_identities: int) -> ml_collections.ConfigDict:
    """The blocks every study has, with their defaults: the paper's setting (the reference's
    ``parser.py`` defaults and its pretrain / retrain recipe, SPEC.md 4.2), every row of its
    table as stages.

    A config file overrides what differs for its dataset (``configs/synthfaces.py``: the CPU
    demo's data, model and training; ``configs/<real>.py``: the weight decay, the method blocks
    of :func:`reference_methods`). Every method block is always present (its ``Config``'s
    defaults here), so ``--config.stages`` can add any method.
    """
    config = ml_collections.ConfigDict()
    config.dataset = dataset
    config.num_identities = num_identities  # N: identities in the deletion request
    config.seed = 0  # the reference's --seed: the split and every other draw
    # The split's seed when it must differ from config.seed (RMIA's reference models: the same
    # split, other randomness); None: config.seed. Part of the run folder's name when it differs.
    config.split_seed = config_dict.placeholder(int)
    config.workdir = f"workdir/{dataset}"  # results, tables, plots
    config.checkpoint_dir = "checkpoints"  # <dir>/<dataset>/<model>/<stage>_<N>_<seed>/
    # A killed stage resumes from its last save; saves at most every this many seconds (at epoch
    # or request boundaries; 0: every one). Changes no result.
    config.checkpoint_every_s = 60.0
    # A stage another process is running (same checkpoint_dir): wait for it and reuse its
    # result (True), or stop at once naming its pid and host (False).
    config.wait_for_lock = True
    config.stages = study_stages("all")  # in this order: every row of the paper's table
    # The per-person likelihood-ratio test (mia/ulira.py): this many members of pretrain and of
    # retrain (training seeds seed .. seed + size - 1, the same split), trained together
    # (oneshui_jax/ensemble.py); 0: none, else at least 3.
    config.ensemble = ml_collections.ConfigDict({"size": 0})

    config.data = data = ml_collections.ConfigDict()
    data.data_dir = "datasets/"  # the reference's --data_dir default; the original layout
    data.tfds_dir = "~/tensorflow_datasets"  # where the built records live
    data.image_size = 224  # the reference resizes every dataset to 224 (ViT-B/16)
    data.crop_scale = (0.08, 1.0)  # the reference's RandomResizedCrop area range
    data.num_threads = 8  # grain read threads (the reference's num_workers 8)
    # The reference evaluates at 32 and reports a split's loss as the mean of its batch means, so
    # the batch size changes the losses (most on the small forget set). Larger is faster (e.g.
    # 256), the same metrics and per-image losses, other split losses.
    data.eval_batch_size = 32
    # Read (and decode) every record once and hold them in memory: same results, less pipeline
    # work per epoch; for data that fits in memory (CelebA at full size does not).
    data.in_memory = False
    # "none" (the reference) | "merge": merge identities that share byte-identical images (MUFAC
    # has thousands of such images under different identities); a documented deviation.
    data.dedup = "none"
    data.synthfaces_config = "medium"  # the SynthFaces variant; unused for real data

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit_base_patch16_224"  # the reference's --model
    # Initial weights: a timm .safetensors, a Google ViT .npz or a converted run directory
    # (oneshui_jax.models.pretrained); empty: train from scratch. timm's ImageNet weights, as the
    # reference (--pretrained True); bring the file, see README "Pretrained weights".
    config.model.init = ("checkpoints/imagenet/"
                         "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors")
    # Fresh weights when config.model.init is empty (vit.INIT_SCHEMES): timm's distributions.
    config.model.init_scheme = "timm"

    # Pretrain / retrain (SPEC.md 4.2): SGD, linear warmup then per-epoch cosine (t_max = epochs),
    # no gradient clipping (clip_grad 0), bf16 autocast.
    config.train = t = ml_collections.ConfigDict()
    t.optimizer = "sgd"  # sgd | adamw
    t.epochs = 30
    t.batch_size = 32
    t.lr = 1e-3
    t.weight_decay = 1e-4
    t.momentum = 0.9  # SGD only
    t.warmup_epochs = 2
    t.compute_dtype = "bfloat16"  # the reference's autocast
    # The mAP's scores (validation and evaluation): "reference" = sigmoid rounded to bf16 under
    # bf16 compute, as the reference (ties, SPEC Q4); "float32" = no rounding of the scores.
    t.ap_scores = "reference"
    t.attention = "xla"  # "cudnn" on GPUs: fused attention, 1.31x faster (ViT-B/16)
    t.remat = False  # jax.checkpoint per block: less memory, more compute, same numbers

    # The methods on the method API (unlearn/registry.py): every setting of the method's Config
    # with its default (the reference's parser.py defaults), simulated requests of size N.
    for name in ALL:
        config[name] = api.default_block(registry.METHODS[name])
    config.meta_unlearn.num_identities_simulation = num_identities
    config.meta_unlearn.compute_dtype = "bfloat16"  # outer passes, the reference's autocast
    config.support_ascent.num_identities_simulation = num_identities
    # The variant meta_unlearn_reference: the reference's algorithm (meta_unlearn_blocks).
    meta_unlearn_blocks(config, {}, {})
    # python -m oneshui_jax.select: candidates for config.meta_unlearn, scored on held-out
    # simulated requests of TRAIN identities outside the request (README "MetaUnlearn").
    config.selection = ml_collections.ConfigDict()
    config.selection.meta_unlearn = SELECTION_CANDIDATES

    config.mia = mia_block(dataset)

    # Data parallelism (oneshui_jax/sharding.py): the devices the batch is split over; -1 all
    # of them, 1 one device. The global batch stays config.train.batch_size.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1

    config.progress = True
    # Per-step and per-epoch training curves as TensorBoard event files in
    # <workdir>/tensorboard/<dataset>/<model>/<stage>_<N>_<seed>/ (needs tensorboardX:
    # pip install -e .[tensorboard]); metrics.jsonl has them either way. Changes no result.
    config.tensorboard = True
    return config


def mia_block(dataset: str) -> ml_collections.ConfigDict:
    """``config.mia``, the privacy evaluation (SPEC.md 5.4-5.5), with the reference's values for
    ``dataset``; a config file changes what it needs to."""
    mia = ml_collections.ConfigDict()
    # loss_rf: the reference's loss attack (a random forest on per-sample losses) with every
    # evaluation, as the reference prints it.
    mia.loss_rf = True
    # rmia: RMIA with one reference model per target (built by the study, study/privacy.py) and
    # the attack on people; passes with the training augmentation, their batch size.
    mia.rmia = False
    mia.rmia_variant = "reference"  # | "canonical" (on probabilities; not the paper's)
    # The reference picks (γ, a) by the TPR on the very forget images it then reports (Q5); the
    # robust column reports the attack at this point of its grid instead, the same for every
    # model. γ = 1 is degenerate under the reference's double normalisation whenever the
    # reference model's losses are below 1 (a model equal to its reference gives the product
    # 1 / (s(x) s(z)) >= 1, so every vote is True: AUC 50), as the multi-label BCE losses are;
    # so γ = 2, the next point, and the middle a = 0.5. () leaves the column out.
    mia.rmia_point = (2, 0.5)
    # A third column chooses the point without the evaluation's labels: on a held-out simulated
    # request (config.num_identities TRAIN identities outside the forget set), with the retrained
    # model as target and a calibration model trained without those people too as reference
    # (one more training run, study/privacy.py). False leaves it out.
    mia.rmia_held_out = True
    mia.passes = 8
    mia.batch_size = 32
    # Q6: on CelebA the reference draws, in every pass, 30,000 of z and 7,000 of val afresh
    # ("per_pass"; val rows are then misaligned across passes and the attack on people is left
    # out); "once" is the fix (one draw for every pass); "none" scores everything.
    mia.subsample = "per_pass" if dataset == "celeba" else "none"
    mia.subsample_z = 30_000
    mia.subsample_val = 7_000
    # The augmented images of the passes, made once and shared by every model of the study while
    # they fit this many MB (more: made again for each model, the same crops). Changes no result.
    mia.cache_mb = 1024
    return mia


# MetaUnlearn's candidates for ``python -m oneshui_jax.select`` (each overrides
# config.meta_unlearn): the reference's algorithm as configured and with a smaller step, then
# the named step-length options of unlearn/meta_unlearn/.
SELECTION_CANDIDATES = (
    "",
    "meta_lr=1e-4",
    "step_control=line_search",
    "step_control=normalize,relative_step=1e-3",
    "step_control=normalize,relative_step=1e-3,task_ascent=100",
)

# The reference's methods of the paper's table (all but support_ascent, which it lacks).
REFERENCE_METHODS = tuple(m for m in ALL if m in hparams.METHODS)


def reference_settings(method: str, dataset: str,
                       num_identities: int) -> tuple[dict[str, Any], hparams.Hyperparameters]:
    """The settings of ``config.<method>`` that take the reference's value for (dataset, N)
    (``api.reference_block``: a setting reads the reference argument its ``metadata`` names),
    with those values, and the reference's ``Hyperparameters``."""
    module = registry.METHODS[method]
    block, h = api.reference_block(module, method, dataset, num_identities)
    keys = [f.name for f in api.settings(module.Config)
            if f.metadata.get("reference", f.name) in h.values]
    return {k: block[k] for k in keys}, h


def reference_methods(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every method block of ``config`` (a real dataset's) with the reference's values for
    (config.dataset, config.num_identities) where it has them (``configs/HPARAMS.md`` lists
    them), the variant ``meta_unlearn_reference`` made again from them, and
    ``config.hparams_note``, where each stage's values come from. Logs a warning for a stage
    whose pair the reference never tuned. In place; returns ``config``."""
    dataset, n = config.dataset, config.num_identities
    hparams.reference("pretrain", dataset, n)  # validates dataset, N
    # MetaUnlearn (SPEC.md 6.6), the one-shot baselines (SPEC.md 7.3-7.5) and the full-data
    # baselines (SPEC.md 7.1, 7.2: they read the forget and retain sets and are not servable, so
    # method=one_shot leaves them out). support_ascent is not in the reference: its defaults.
    for name in REFERENCE_METHODS:
        config[name].update(reference_settings(name, dataset, n)[0])
    meta_unlearn_blocks(config, {}, {})  # the variant: here the same values
    notes = []
    for stage in config.stages:
        if stage == "retrain_2":
            notes.append("retrain_2: retrain's values (config.train), training seed + 1")
            continue
        if stage not in hparams.METHODS:
            notes.append(f"{stage}: not in the reference; its Config's defaults")
            continue
        h = hparams.reference(stage, dataset, n)
        hparams.warn_if_untuned(h)
        notes.append(h.note)
    config.hparams_note = tuple(notes)
    return config


# The settings of config.train that the reference's const.py gives for pretrain / retrain.
TRAIN_SETTINGS = ("optimizer", "epochs", "batch_size", "lr", "weight_decay", "momentum",
                  "warmup_epochs")


def real_data_config(dataset: str, method: str, num_identities: int) -> ml_collections.ConfigDict:
    """The paper's setting for ``dataset`` (celeba | celebahq | mufac) and one method, or a
    group of :data:`METHOD_GROUPS` (``one_shot``: every method of :data:`ONE_SHOT`; ``all``:
    every row of the paper's table, :data:`ALL`), one stage each after the same pretrain and
    retrain: ``configs/<dataset>.py:method=<method>,N=<N>``.

    :func:`base_config` with the reference's pretrain / retrain values for the dataset in
    ``config.train`` and :func:`reference_methods`; the notes of where every method's values
    come from are ``config.hparams_note``.
    """
    pretrain = hparams.reference("pretrain", dataset, num_identities)  # validates dataset, N
    config = base_config(dataset, num_identities)
    config.stages = study_stages(method)
    config.train.update({k: pretrain.values[k] for k in TRAIN_SETTINGS})
    return reference_methods(config)


def _apply(config: ml_collections.ConfigDict, changes: dict[str, Any]) -> None:
    """Sets ``changes`` (dotted paths into ``config`` -> values; ``"{dataset}"`` in a string is
    filled in) in place."""
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        block = config
        for name in parents:
            block = block[name]
        if isinstance(value, str):
            value = value.format(dataset=config.dataset)
        block[leaf] = value


# The CPU profile of the MUFAC study: a small ViT trained from scratch (ImageNet weights cannot
# be downloaded here) on 32 px images, AdamW and float32; README "MUFAC on CPU" has its results.
# Keys are dotted paths into the config; "{dataset}" is filled in.
CPU_PROFILE: dict[str, Any] = {
    "workdir": "workdir/{dataset}_cpu",
    "model.name": "vit_small_demo",  # 0.47M parameters, 17 tokens
    "model.init": "",  # from scratch
    "model.init_scheme": "lecun",  # as its results were measured (vit.INIT_SCHEMES)
    "data.image_size": 32,
    # RandomResizedCrop area (1, 1): no crop, only the resize and the flip. With crops a model
    # trained from scratch on 7,800 faces underfits (train accuracy = test accuracy: nothing to
    # unlearn); without them it fits, and memorises, its training faces as the paper's models do.
    "data.crop_scale": (1.0, 1.0),
    "data.num_threads": 2,
    "data.in_memory": True,  # MUFAC's 13,068 decoded faces: about 0.6 GB
    "train.optimizer": "adamw",  # SGD learns far too slowly from scratch in a CPU budget
    "train.epochs": 30,  # as the reference
    "train.batch_size": 64,
    "train.lr": 1e-3,
    "train.weight_decay": 1e-4,
    "train.warmup_epochs": 2,
    "train.compute_dtype": "float32",  # bf16 matmuls are slow on CPU
    # The methods keep the reference's values for (dataset, N) (MetaUnlearn's epochs, lr,
    # meta_lr, request size; SSD's λ, α; ...), in float32.
    "meta_unlearn.compute_dtype": "float32",
    "support_ascent.compute_dtype": "float32",
    "ssd.compute_dtype": "float32",
    "lipschitz.compute_dtype": "float32",
    "pgu.compute_dtype": "float32",
    "scrub.compute_dtype": "float32",
    "bad_teacher.compute_dtype": "float32",
}


# MetaUnlearn's settings for the CPU profile, chosen by ``python -m oneshui_jax.select`` on seed
# 0 (held-out simulated requests of training identities outside the request; README "MetaUnlearn"
# and bench/results/selection_*): (dataset, N) -> (the best candidate's overrides, the best of the
# reference's algorithm). Pairs not listed keep the reference's values for both.
CPU_SELECTED_META_UNLEARN: dict[tuple[str, int], tuple[dict[str, Any], dict[str, Any]]] = {
    # bench/results/selection_mufac_N10: 61% of the held-out objective removed; the reference's
    # algorithm at its MUFAC values (meta_lr 1e-3) makes it 11.7% worse, at meta_lr 1e-4 1.4%.
    ("mufac", 10): (dict(step_control="normalize", relative_step=1e-3, task_ascent=100.0),
                    dict(meta_lr=1e-4)),
}


def meta_unlearn_blocks(config: ml_collections.ConfigDict, best: dict[str, Any],
                        reference: dict[str, Any]) -> None:
    """``config.meta_unlearn`` with ``best`` applied, and the variant
    ``config.meta_unlearn_reference`` (the reference's algorithm, ``reference`` applied): the
    two MetaUnlearn rows a selection hands to a config (in place)."""
    base = config.meta_unlearn.to_dict()
    config.meta_unlearn_reference = ml_collections.ConfigDict(
        {"method": "meta_unlearn", **base, **reference})
    for key, value in best.items():
        config.meta_unlearn[key] = value


def cpu_profile(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Applies ``CPU_PROFILE`` to ``config`` (in place) and returns it, with MetaUnlearn's
    selected settings (``CPU_SELECTED_META_UNLEARN``) and the ``meta_unlearn_reference`` variant.

    Other values (e.g. MetaUnlearn's epochs and simulated request size) keep the reference's for
    the config's (dataset, N).
    """
    _apply(config, CPU_PROFILE)
    best, reference = CPU_SELECTED_META_UNLEARN.get((config.dataset, config.num_identities),
                                                    ({}, {}))
    meta_unlearn_blocks(config, best, reference)
    return config


# runlocal=True, in every config file: the study shrunk to seconds for smoke tests (one epoch, a
# single MetaUnlearn meta-epoch, the data read in the main thread, no privacy attack, no progress
# bars). Paths (workdir, checkpoint_dir, data_dir, tfds_dir) are left to the caller; the variant
# meta_unlearn_reference (never among runlocal's stages) keeps its values.
RUNLOCAL: dict[str, Any] = {
    "train.epochs": 1,
    "meta_unlearn.epochs": 1,
    "data.num_threads": 0,
    "mia.loss_rf": False,
    "mia.rmia": False,
    "progress": False,
}

# ... and for a real dataset (its files, its split): the tiny ViT from scratch (no weights to
# bring) on 32 px images, float32 everywhere, one epoch of every method that loops over epochs.
RUNLOCAL_REAL_DATA: dict[str, Any] = {
    "model.name": "vit_tiny_test",  # 2 blocks of width 32
    "model.init": "",
    "model.init_scheme": "lecun",
    "data.image_size": 32,
    "train.compute_dtype": "float32",
    **{f"{name}.compute_dtype": "float32" for name in ALL},
    "pgu.epochs": 1,
    "scrub.epochs": 1,
    "bad_teacher.epochs": 1,
}


def runlocal(config: ml_collections.ConfigDict,
             *more: dict[str, Any]) -> ml_collections.ConfigDict:
    """Applies :data:`RUNLOCAL`, then each of ``more`` (dotted path -> value), to ``config`` (in
    place) and returns it: what every config file does for ``runlocal=True``."""
    for changes in (RUNLOCAL, *more):
        _apply(config, changes)
    return config


def _cell(value: Any) -> str:
    """A value as the table shows it: ``1e-4`` below 0.01, Python's repr for other numbers."""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_cell, value)) + ")"
    return str(value)


# The paper's grid of N per real dataset (SPEC.md 6.6): the rows of ``configs/HPARAMS.md``.
PAPER_GRID = {"celeba": (5, 10), "celebahq": (20, 50), "mufac": (5, 10)}


def hparams_table() -> str:
    """``configs/HPARAMS.md``: for every method of the paper's table, the settings the real-data
    configs take from the reference for each (dataset, N) of the paper's grid (columns: those
    that vary; the others below the table), from ``oneshui_jax.hparams``."""
    lines = [
        "# The real-data configs' settings per method, dataset and N",
        "",
        "`configs/celeba.py`, `configs/celebahq.py` and `configs/mufac.py` give `config.train` and",
        "every method block `config.<method>` the reference's values for their (dataset, N): its",
        "`const.py` and `parser.py`, held in `oneshui_jax/hparams.py`. This table lists them for",
        "the paper's grid; every other setting keeps the base config's value",
        "(`oneshui_jax.config_lib.base_config`: the method's `Config` defaults). Another N takes",
        "const.py's branch for it; where const.py has none, its generic values, with a warning",
        "(`config.hparams_note` says which). `profile=cpu` (MUFAC) changes `config.train` and",
        "MetaUnlearn as `oneshui_jax.config_lib.CPU_PROFILE` says.",
        "",
        "Written by `python tools/hparams_table.py` from `oneshui_jax/hparams.py`;",
        "`tests/test_configs.py` fails when the two differ.",
    ]
    rows = [(dataset, n) for dataset, grid in PAPER_GRID.items() for n in grid]
    sections = [("pretrain / retrain", "train", "pretrain")]
    sections += [(name, name, name) for name in REFERENCE_METHODS]
    for title, block, method in sections:
        values = {}
        for dataset, n in rows:
            if block == "train":
                h = hparams.reference(method, dataset, n)
                values[dataset, n] = {k: h.values[k] for k in TRAIN_SETTINGS}
            else:
                values[dataset, n], h = reference_settings(method, dataset, n)
            if not h.tuned:
                values[dataset, n]["(untuned)"] = h.note
        keys = list(dict.fromkeys(k for v in values.values() for k in v))
        varying = [k for k in keys if len({_cell(v.get(k)) for v in values.values()}) > 1]
        same = [k for k in keys if k not in varying]
        lines += ["", f"## {title} (`config.{block}`)", ""]
        if varying:
            lines.append("| dataset | N | " + " | ".join(varying) + " |")
            lines.append("|---|---|" + "---|" * len(varying))
            for (dataset, n), v in values.items():
                cells = " | ".join(_cell(v.get(k)) for k in varying)
                lines.append(f"| {dataset} | {n} | {cells} |")
            lines.append("")
        if same:
            first = next(iter(values.values()))
            lines.append(("In every row: " if varying else "For every dataset and N: ")
                         + ", ".join(f"{k} {_cell(first[k])}" for k in same) + ".")
    lines += ["", "## support_ascent (`config.support_ascent`)", "",
              "Not in the reference: its `Config`'s defaults, with simulated requests of N",
              "identities (`num_identities_simulation` = N)."]
    return "\n".join(lines) + "\n"


def raised_in_file(error: BaseException, path: str) -> str | None:
    """``--config PATH: get_config() raised TypeError: ... (line N)`` when ``error`` was raised
    by the config file's own code (at load or in get_config()), else None: the one line every
    command line that reads a config file prints for it."""
    inside = [frame for frame, _ in traceback.walk_tb(error.__traceback__)
              if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path)]
    if not inside:
        return None
    frame = inside[-1]
    where = "get_config()" if frame.f_code.co_name == "get_config" else "loading it"
    message = " ".join(str(error).split()) or "(no message)"
    return (f"--config {path}: {where} raised {type(error).__name__}: {message} (line "
            f"{frame.f_lineno})")
