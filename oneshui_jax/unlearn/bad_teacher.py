"""bad_teacher: Bad Teacher (Chundawat et al., AAAI 2023), the reference's full-data baseline
(SPEC.md 7.2).

Two teachers: a *dumb* one, the same architecture randomly initialised (``vit.init_params`` with a
key drawn from ``rng``; the reference's ``get_model(pretrained=False)``), and the *smart* one, the
pretrained model; both frozen. The student starts from the pretrained parameters. Every image of
the forget set and of the retain set (the reference's ``TeacherDataset``, concatenated, shuffled
every epoch, batches of ``batch_size``) carries ``split`` = 1 (forget) or 0 (retain), and, at
temperature 1::

    teacher = split · softmax(dumb(x)) + (1 − split) · softmax(smart(x))      per example
    loss    = (1/B) Σ_rows Σ_c teacher_c (log teacher_c − log_softmax(student(x))_c)

(``F.kl_div(log_softmax(student), teacher, reduction="batchmean")``), minimised for ``epochs`` (5)
epochs by torch's SGD (momentum 0.9, weight decay 5e-4, ``optim.sgd``) with the per-epoch cosine
``lr (1 + cos(π e / epochs)) / 2`` (``optim.epoch_cosine``), no clipping.

Q20: the softmax runs over the independent multi-label logits as one categorical (``kl="softmax"``,
faithful, the default); ``kl="bernoulli"`` (multi-label fix) mixes the per-label probabilities
``σ(dumb)`` / ``σ(smart)`` the same way and sums the per-label Bernoulli KLs to ``σ(student)``.

Where the SPEC is silent, this port chooses (as ``scrub``): batch order from ``data.seed`` (a fresh
permutation of the forget + retain images per epoch; ``rng`` only seeds the dumb teacher); the
training augmentation, when ``use_train_aug``, with the study's crop area range; the last short
batch padded and masked, losses divided by its valid rows (the reference's ``batchmean`` of the
short batch); forward passes in ``compute_dtype`` (bfloat16, the reference's autocast), losses in
float32; no GradScaler (float16 only) and no per-epoch validation printout.

``info``: per epoch the learning rate and the mean loss over its steps (before each step), the
number of steps and of forget / retain images. ACCESS ``full``: a full-data reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from oneshui_jax import interrupts, optim, sharding
from oneshui_jax.data import pipeline
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api, scrub

ACCESS = api.FULL
TEACHER_KEY = 0x6261645F  # fold_in(rng, TEACHER_KEY) initialises the dumb teacher

Params = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Bad Teacher's settings: the study's ``config.bad_teacher`` block (SPEC.md 7.2).

    Defaults are the reference's values for a (dataset, N) it never tuned (SPEC Q24: lr 0.1);
    the real-data configs fill in the tuned values.
    """

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    epochs: int = 5
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32  # mixed forget + retain batches
    use_train_aug: bool = False  # training augmentation (the reference: on for MUFAC only)
    # "softmax": one categorical over the multi-label logits (Q20, faithful); "bernoulli": fix.
    kl: str = "softmax"
    compute_dtype: str = "bfloat16"  # forward passes (the reference's autocast)

    RANGES = scrub.COMMON_RANGES  # every numeric setting's range (api.check_ranges)

    def __post_init__(self):
        scrub.check_common("bad_teacher", self)


# ---------------------------------------------------------------------------------------------
# The loss and the step (pure; ``_step`` jit-compiles it per model and Config)


def forget_flags(indices: np.ndarray, forget_images: np.ndarray) -> np.ndarray:
    """The reference's ``split`` of each row: 1.0 for an image of the forget set, else 0.0."""
    return np.isin(np.asarray(indices, np.int64), np.asarray(forget_images, np.int64)
                   ).astype(np.float32)


def mixed_teacher(kind: str, smart_logits: jax.Array, dumb_logits: jax.Array,
                  split: jax.Array) -> jax.Array:
    """``split · P(dumb) + (1 − split) · P(smart)`` per row, ``P`` the softmax (``softmax``) or
    the per-label sigmoid (``bernoulli``), temperature 1. Float32 [B, C]."""
    s = split.astype(jnp.float32)[:, None]
    return (s * scrub.teacher_probs(kind, dumb_logits)
            + (1.0 - s) * scrub.teacher_probs(kind, smart_logits))


def teacher_kl(kind: str, student_logits: jax.Array, smart_logits: jax.Array,
               dumb_logits: jax.Array, split: jax.Array, mask: jax.Array) -> jax.Array:
    """``KL(mixed teacher ‖ student)`` with ``batchmean`` reduction over the valid rows."""
    q = mixed_teacher(kind, smart_logits, dumb_logits, split)
    return scrub.batch_sum_mean(scrub.kl_rows(kind, q, student_logits), mask)


def loss_fn(model: api.Model, cfg: Config, params: Params, smart: Params, dumb: Params,
            batch) -> jax.Array:
    """The Bad Teacher loss of the student ``params`` on one batch (``batch["forget"]`` the
    per-row split)."""
    dtype = cfg.compute_dtype
    s = model.logits(params, batch["image"], dtype)
    t_smart = jax.lax.stop_gradient(model.logits(smart, batch["image"], dtype))
    t_dumb = jax.lax.stop_gradient(model.logits(dumb, batch["image"], dtype))
    return teacher_kl(cfg.kl, s, t_smart, t_dumb, batch["forget"], batch["mask"])


def train_step(model: api.Model, cfg: Config, params: Params, opt_state: Any, smart: Params,
               dumb: Params, batch, lr: jax.Array):
    """One SGD step on the Bad Teacher loss: ``(params, opt_state, loss before the step)``."""
    loss, grads = jax.value_and_grad(functools.partial(loss_fn, model, cfg))(
        params, smart, dumb, batch)
    params, opt_state = scrub.sgd_apply(params, opt_state, grads, lr, cfg.weight_decay,
                                        cfg.momentum)
    return params, opt_state, loss


@functools.lru_cache(maxsize=16)
def _step(model: api.Model, cfg: Config):
    """``train_step`` jit-compiled for one model and ``scrub.step_config`` (student and optimiser
    state donated)."""
    return jax.jit(functools.partial(train_step, model, cfg), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=4)
def _init(model_cfg: vit.ViTConfig):
    return jax.jit(functools.partial(vit.init_params, model_cfg))


def dumb_teacher(model: api.Model, rng: jax.Array) -> Params:
    """The randomly initialised teacher, drawn from ``rng``."""
    return _init(model.vit)(jax.random.fold_in(rng, TEACHER_KEY))


# ---------------------------------------------------------------------------------------------
# The method


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data: api.FullData | None = None
            ) -> tuple[Params, dict[str, Any]]:
    """Bad Teacher on the forget and retain sets of ``data`` (module docstring); the request's
    portraits are not used (the reference's Bad Teacher does not read them)."""
    del artifacts, request
    if data is None:
        raise ValueError("bad_teacher reads the forget and retain sets (ACCESS full): data is "
                         "None")
    step = _step(model, scrub.step_config(cfg))
    smart, dumb = params, dumb_teacher(model, rng)
    student = jax.tree.map(jnp.copy, params)  # donated to the step; the caller keeps params
    opt_state = optim.sgd(cfg.weight_decay, cfg.momentum).init(student)
    forget = np.asarray(data.forget_images, np.int64)
    retain = np.asarray(data.retain_images, np.int64)
    images = np.concatenate([forget, retain])
    epochs = scrub.epoch_batches(data, images, cfg.batch_size, cfg.use_train_aug, cfg.epochs,
                                 scrub.stream_seed(data.seed, 2))
    per_epoch = pipeline.steps_per_epoch(images.size, min(cfg.batch_size, max(images.size, 1)))
    history, steps = [], 0
    with tqdm(total=per_epoch * cfg.epochs * (images.size > 0), desc="bad_teacher", unit="step",
              disable=not data.progress, leave=False) as bar:
        for epoch in range(cfg.epochs):
            lr = jnp.float32(optim.epoch_cosine(cfg.lr, epoch, cfg.epochs))
            epoch_losses = []
            for batch in next(epochs, ()):
                interrupts.check()
                device = scrub.device_batch(batch)
                device["forget"] = sharding.shard_batch(forget_flags(batch["index"], forget))
                student, opt_state, loss = step(student, opt_state, smart, dumb, device, lr)
                epoch_losses.append(loss)
                steps += 1
                bar.update()
            history.append({"epoch": epoch, "lr": float(lr), "steps": len(epoch_losses),
                            "loss": scrub.mean_or_none(epoch_losses)})
            scrub.diverged(history[-1], "bad_teacher", epoch, cfg)
    info = {"steps": steps, "forget_images": int(forget.size), "retain_images": int(retain.size),
            "kl": cfg.kl, "history": history}
    return student, info
