"""Building blocks of the config files under ``configs/``.

Config files are loaded by path (``--config=configs/mufac.py``) and cannot import each other, so
what they share lives here:

* ``parse_arg``: the ``key=value,key=value`` argument after the colon of ``--config=file.py:arg``;
* ``real_data_config``: the paper's setting for CelebA, CelebA-HQ or MUFAC (the reference's
  ``parser.py`` defaults and ``const.py`` values, ``oneshui_jax.hparams``);
* ``cpu_profile``: the same study shrunk to run on CPU (MUFAC, a small ViT from scratch).
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import ml_collections
from ml_collections import config_dict

from oneshui_jax import hparams
from oneshui_jax.unlearn import api, meta_unlearn, registry, support_ascent

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
              choices: dict[str, tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """Parses ``"key=value,key=value"`` into ``allowed`` (key -> default value).

    A value takes the type of its default (``N=5`` is an int when the default is). ``choices``
    optionally lists the values a key accepts. A malformed item, an unknown key, a value of the
    wrong type or outside its choices raises one ``ValueError`` naming the key.
    """
    out = dict(allowed)
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
        if choices and key in choices and out[key] not in choices[key]:
            raise ValueError(f"config argument {key}={value!r} must be one of "
                             f"{', '.join(map(str, choices[key]))}")
    return out


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
# the named step-length options of unlearn/meta_unlearn.py.
SELECTION_CANDIDATES = (
    "",
    "meta_lr=1e-4",
    "step_control=line_search",
    "step_control=normalize,relative_step=1e-3",
    "step_control=normalize,relative_step=1e-3,task_ascent=100",
)


def real_data_config(dataset: str, method: str, num_identities: int) -> ml_collections.ConfigDict:
    """The paper's setting for ``dataset`` (celeba | celebahq | mufac) and one method, or a
    group of :data:`METHOD_GROUPS` (``one_shot``: every method of :data:`ONE_SHOT`; ``all``:
    every row of the paper's table, :data:`ALL`), one stage each after the same pretrain and
    retrain.

    Same blocks as ``configs/synthfaces.py`` (``data``, ``model``, ``train``, ``meta_unlearn``)
    with the reference's values (``parser.py`` defaults, ``const.py`` per method / dataset / N),
    plus a block per method on the method API (``meta_unlearn``, ``support_ascent``, ``ssd``,
    ``lipschitz``, ``pgu``, ``scrub``, ``bad_teacher``), always present, with the reference's
    values for (dataset, N) where it has them. Logs a warning for a stage whose pair the
    reference never tuned; the notes of where every method's values come from are
    ``config.hparams_note``.
    """
    pretrain = hparams.reference("pretrain", dataset, num_identities)  # validates dataset, N
    if method not in METHOD_CHOICES:
        raise ValueError(f"unknown method {method!r}; expected one of "
                         f"{', '.join(METHOD_CHOICES)}")

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
    training = ("pretrain", "retrain")
    if method in METHOD_GROUPS:
        config.stages = training + METHOD_GROUPS[method]
    else:
        config.stages = training if method in training else training + (method,)

    config.data = data = ml_collections.ConfigDict()
    data.data_dir = "datasets/"  # the reference's --data_dir default; the original layout below
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
    data.synthfaces_config = "medium"  # unused for real data

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit_base_patch16_224"  # the reference's --model
    # timm's ImageNet weights, as the reference (--pretrained True); bring the file, see README
    # "Pretrained weights".
    config.model.init = ("checkpoints/imagenet/"
                         "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors")
    # Fresh weights when config.model.init is empty (vit.INIT_SCHEMES): timm's distributions.
    config.model.init_scheme = "timm"

    # Pretrain / retrain (SPEC.md 4.2): SGD, linear warmup then per-epoch cosine (t_max = epochs),
    # no gradient clipping (clip_grad 0), bf16 autocast.
    p = pretrain.values
    config.train = t = ml_collections.ConfigDict()
    t.optimizer = p["optimizer"]  # sgd | adamw
    t.epochs = p["epochs"]
    t.batch_size = p["batch_size"]
    t.lr = p["lr"]
    t.weight_decay = p["weight_decay"]  # 1e-3 for CelebA-HQ, 1e-4 otherwise
    t.momentum = p["momentum"]  # SGD only
    t.warmup_epochs = p["warmup_epochs"]
    t.compute_dtype = "bfloat16"  # the reference's autocast
    # The mAP's scores (validation and evaluation): "reference" = sigmoid rounded to bf16 under
    # bf16 compute, as the reference (ties, SPEC Q4); "float32" = no rounding of the scores.
    t.ap_scores = "reference"
    t.attention = "xla"  # "cudnn" on GPUs: fused attention, 1.31x faster (ViT-B/16)
    t.remat = False  # jax.checkpoint per block: less memory, more compute, same numbers

    # The methods on the method API (unlearn/registry.py): every setting of the method's Config,
    # with the reference's value for (dataset, N) where const.py / parser.py have one.
    # All are always present, so --config.stages can add any.
    # MetaUnlearn (SPEC.md 6.6): the reference's values for (dataset, N).
    config.meta_unlearn, _ = api.reference_block(meta_unlearn, "meta_unlearn", dataset,
                                                 num_identities)
    config.meta_unlearn.compute_dtype = "bfloat16"  # outer passes, the reference's autocast
    # The variant meta_unlearn_reference: here the same values (a profile may select others).
    meta_unlearn_blocks(config, {}, {})
    # support_ascent is not in the reference: its defaults, simulated requests of size N.
    config.support_ascent = api.default_block(support_ascent)
    config.support_ascent.num_identities_simulation = num_identities
    # The reference's one-shot baselines on the method API (SPEC.md 7.3-7.5): their Config with
    # the reference's values for (dataset, N).
    # The full-data baselines (SPEC.md 7.1, 7.2: SCRUB, Bad Teacher) likewise; they read the
    # forget and retain sets and are not servable, so method=one_shot leaves them out.
    for name in ONE_SHOT_BASELINES + FULL_DATA_BASELINES:
        config[name], _ = api.reference_block(registry.METHODS[name], name, dataset,
                                              num_identities)

    config.mia = mia_block(dataset)
    # python -m oneshui_jax.select: candidates for config.meta_unlearn, scored on held-out
    # simulated requests of TRAIN identities outside the request (README "MetaUnlearn").
    config.selection = ml_collections.ConfigDict()
    config.selection.meta_unlearn = SELECTION_CANDIDATES

    # Data parallelism (oneshui_jax/sharding.py): the devices the batch is split over; -1 all
    # of them, 1 one device. The global batch stays config.train.batch_size.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1

    config.progress = True
    # Per-step and per-epoch training curves as TensorBoard event files in
    # <workdir>/tensorboard/<dataset>/<model>/<stage>_<N>_<seed>/ (needs tensorboardX:
    # pip install -e .[tensorboard]); metrics.jsonl has them either way. Changes no result.
    config.tensorboard = True
    notes = []
    for stage in config.stages:
        if stage not in hparams.METHODS:
            notes.append(f"{stage}: not in the reference; its Config's defaults")
            continue
        h = hparams.reference(stage, dataset, num_identities)
        hparams.warn_if_untuned(h)
        notes.append(h.note)
    config.hparams_note = tuple(notes)
    return config


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
    for path, value in CPU_PROFILE.items():
        *parents, leaf = path.split(".")
        block = config
        for name in parents:
            block = block[name]
        if isinstance(value, str):
            value = value.format(dataset=config.dataset)
        block[leaf] = value
    best, reference = CPU_SELECTED_META_UNLEARN.get((config.dataset, config.num_identities),
                                                    ({}, {}))
    meta_unlearn_blocks(config, best, reference)
    return config


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
