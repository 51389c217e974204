"""How long one study of the paper's grid takes on one GPU, estimated from the benchmarks.

A lower bound for planning, not a measurement: ``docs/reproduce.md`` shows it, marked as an
estimate, until a whole study has been timed. The model counts, per stage, the images the ViT
processes, in *training images* (one forward and backward pass), and divides by measured rates:

* ``train_images_per_s``: the fine-tuning step of ViT-B/16 at 224, batch 128, bf16, with the
  config's attention (``bench/attention_variants.py``);
* a forward-only image costs a third of a training image (the backward pass does about twice
  the forward's arithmetic): evaluation, teachers, the attacks' signal passes;
* ``meta_step_s``: MetaUnlearn's streamed meta-step at the benchmark's shapes (support 20, five
  outer batches of 64 forget and 64 validation images; ``bench/meta_step.py``), scaled by the
  outer batches of a simulated request;
* PGU's covariances: their multiply-adds relative to a forward pass, from the architecture.

The stages follow the reference's recipes as the configs hold them (reference sections 4, 5.5, 6.4
and 7): pretrain and retrain with a validation pass per epoch; SCRUB's min-steps over the retain
set every epoch and max-steps over the forget set in its forgetting epochs, with a teacher
forward each; Bad Teacher's epochs over forget and retain with two teacher forwards; SSD's
gradient pass over the training images; every model evaluated once on retain, forget, test and
val; with ``config.mia.rmia``, each method run again on the retrained model (its reference
model), the calibration model of the held-out selection (``config.mia.rmia_held_out``) and the
signal passes of every attacked model and reference. Left out, so the real time
is longer: compilation, the input pipeline (decoding 1024 px CelebA-HQ images can be slower
than the model), float32 steps at the bf16 rate, checkpoint writes, MetaUnlearn's held-out
diagnostics, support_ascent's selection (small) and Lipschitz (a few hundred images).

Split sizes are those of the reference split of seed 0 on the real annotation files
(reference section 2.5; ``tests/test_splits.py`` checks them); other seeds differ by under 1%.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

from oneshui_jax.models import vit

FORWARD_SHARE = 1.0 / 3.0  # a forward-only image, in training images


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """Images (and TRAIN identities) of one dataset's split of seed 0."""

    train_identities: int
    train: int
    val: int
    test: int

    @property
    def images_per_identity(self) -> float:
        return self.train / self.train_identities


SIZES = {  # reference section 2.5 and its "facts checked": seed 0 on the real annotation files
    "celebahq": SplitSizes(3735, 18000, 6004, 5996),
    "celeba": SplitSizes(6091, 121556, 40495, 40548),
    "mufac": SplitSizes(725, 7840, 2620, 2608),
}


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured rates of one GPU: training images/s per attention, the meta-step's seconds."""

    device: str
    train_images_per_s: Mapping[str, float]
    meta_step_s: float
    source: str  # the benchmark folder they were read from

    @classmethod
    def from_results(cls, folder: str) -> Rates:
        """Reads ``attention_variants.json`` and ``meta_step.json`` of a GPU check's results
        folder (``bench/results/<machine>_<date>/``); ValueError naming the file otherwise."""
        paths = {n: os.path.join(folder, f"{n}.json") for n in ("attention_variants", "meta_step")}
        try:
            with open(paths["attention_variants"]) as f:
                variants = json.load(f)
            with open(paths["meta_step"]) as f:
                meta = json.load(f)
            rates = {row["attention"]: float(row["images_per_s"]) for row in variants["rows"]}
            streamed = meta["results"]["streamed"]
            return cls(device=streamed["device"], train_images_per_s=rates,
                       meta_step_s=float(streamed["step_s"]), source=folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder}: expected attention_variants.json (rows of attention, "
                             f"images_per_s) and meta_step.json (results.streamed.step_s, "
                             f"device) from bench/gpu_check.sh: {e}") from e


BENCHMARKED_MODEL = "vit_base_patch16_224"  # config.model.name of the rates' model
BENCHMARKED = vit.ViTConfig(num_classes=40)  # its shape: ViT-B/16 at 224
BENCH_OUTER_BATCHES = 5  # bench/meta_step.py's shapes


def forward_macs(cfg: vit.ViTConfig) -> float:
    """Multiply-adds of one image's forward pass (dense layers and attention)."""
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    patch = (tokens - 1) * cfg.in_chans * cfg.patch_size ** 2 * d
    block = tokens * (4 * d * d + 2 * d * hidden) + 2 * tokens * tokens * d
    return patch + cfg.depth * block + d * cfg.num_classes


def covariance_macs(cfg: vit.ViTConfig, patch_covariance: str) -> float:
    """Multiply-adds of PGU's ``XᵀX`` of every dense layer's inputs for one image (reference
    section 7.5): the patch projection over every window (``stride1``, Q25) or the model's own
    patches (``patches``), each block's qkv, proj, fc1 and fc2 inputs, the head's."""
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    k = cfg.in_chans * cfg.patch_size ** 2
    windows = ((cfg.image_size - cfg.patch_size + 1) ** 2 if patch_covariance == "stride1"
               else tokens - 1)
    block = tokens * (3 * d * d + hidden * hidden)  # qkv, proj, fc1 read width d; fc2 reads hidden
    return windows * k * k + cfg.depth * block + d * d


def stage_images(config, sizes: SplitSizes) -> dict[str, float]:
    """Training-image equivalents of each stage of ``config.stages`` (and of the attacks, as
    ``"attacks"``), MetaUnlearn's meta-steps apart (:func:`meta_steps`)."""
    n = config.num_identities
    forget = n * sizes.images_per_identity
    retain = sizes.train - forget
    evaluation = (sizes.train + sizes.val + sizes.test) * FORWARD_SHARE
    epochs = config.train.epochs
    cost = {
        "pretrain": epochs * (sizes.train + sizes.val * FORWARD_SHARE),
        "retrain": epochs * (retain + sizes.val * FORWARD_SHARE),
        "retrain_2": epochs * (retain + sizes.val * FORWARD_SHARE),
        "meta_unlearn": 0.0,
        "support_ascent": 0.0,
        "lipschitz": 0.0,
        "ssd": sizes.train,
    }
    if "scrub" in config:
        s = config.scrub
        cost["scrub"] = (1 + FORWARD_SHARE) * (s.epochs * retain + s.forgetting_epochs * forget)
    if "bad_teacher" in config:
        cost["bad_teacher"] = (1 + 2 * FORWARD_SHARE) * config.bad_teacher.epochs * (
            forget + retain)
    if "pgu" in config:
        share = covariance_macs(BENCHMARKED, config.pgu.patch_covariance) / forward_macs(
            BENCHMARKED)
        cost["pgu"] = sizes.train * FORWARD_SHARE * (1 + share)
    stages = {s: cost[s] + evaluation for s in config.stages}
    if config.mia.get("rmia"):
        methods = [s for s in config.stages if s not in ("pretrain", "retrain", "retrain_2")]
        per_pass = sizes.train + sizes.val
        if config.mia.subsample in ("per_pass", "once"):
            per_pass = min(sizes.train, config.mia.subsample_z) + min(
                sizes.val, config.mia.subsample_val)
        models = 2 + 2 * len(methods)  # pretrain, retrain, each method and its reference
        calibration = 0.0
        if config.mia.get("rmia_held_out"):  # one more retrain, without N more people
            models += 1
            calibration = epochs * (retain - forget + sizes.val * FORWARD_SHARE) + evaluation
        stages["attacks"] = (sum(cost[m] + evaluation for m in methods) + calibration
                             + models * config.mia.passes * per_pass * FORWARD_SHARE)
    return stages


def meta_steps(config, sizes: SplitSizes) -> float:
    """MetaUnlearn's meta-steps, in benchmark meta-steps: ``epochs × ceil(|TRAIN| / n)``
    simulated requests (reference section 2.4), each scaled by its outer batches of forget
    images; twice with RMIA (the reference model meta-trains too)."""
    if "meta_unlearn" not in config.stages:
        return 0.0
    m = config.meta_unlearn
    requests = math.ceil(sizes.train_identities / m.num_identities_simulation)
    forget = m.num_identities_simulation * (sizes.images_per_identity - 1)
    batches = max(1, math.ceil(forget / m.batch_size))
    steps = m.epochs * requests * batches / BENCH_OUTER_BATCHES
    return steps * (2 if config.mia.get("rmia") else 1)


def estimate(config, rates: Rates) -> dict[str, float]:
    """Seconds per stage (and ``"attacks"``, ``"total"``) of ``config`` on ``rates``' GPU.
    ValueError for a dataset without split sizes or a model other than the benchmarked
    ViT-B/16."""
    if config.dataset not in SIZES:
        raise ValueError(f"no split sizes for dataset {config.dataset!r}; the estimate covers "
                         f"{', '.join(SIZES)}")
    if config.model.name != BENCHMARKED_MODEL:
        raise ValueError(f"the benchmarks measured {BENCHMARKED_MODEL}, not "
                         f"{config.model.name}")
    attention = config.train.attention
    if attention not in rates.train_images_per_s:
        raise ValueError(f"{rates.source} has no training rate for attention {attention!r}")
    sizes = SIZES[config.dataset]
    per_image = 1.0 / rates.train_images_per_s[attention]
    seconds = {s: images * per_image for s, images in stage_images(config, sizes).items()}
    if "meta_unlearn" in seconds:
        seconds["meta_unlearn"] += meta_steps(config, sizes) * rates.meta_step_s
    seconds["total"] = sum(seconds.values())
    return seconds


def hours(seconds: float) -> str:
    """``≥ 1.2 h`` / ``≥ 25 min``: an estimate is a lower bound."""
    if seconds >= 3600:
        return f"≥ {seconds / 3600:.1f} h"
    return f"≥ {max(1, round(seconds / 60))} min"
