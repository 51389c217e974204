"""MetaUnlearn's definition: its settings, the learned step and its exact meta-gradient, and
the request-time step that serving calls (SPEC.md 6.2, 6.3, 6.5).

For one simulated request with support images ``s``:

    inner    θ_u(φ) = θ − η · ∇_θ mean_{x ∈ s} ℓ_φ(x; θ)             (fp32, dropout on)
    outer    L(φ)   = Σ_b n_b L_b(θ_u(φ)) / Σ_b n_b                    (bf16, losses.py)

and φ takes one AdamW(AMSGrad) step on ∂L/∂φ (``meta_step``; ``training`` walks the requests).
At request time (1-SHUI) only the portraits are used: ``θ_u = θ − η ∇_θ mean ℓ_φ`` (dropout
off), ``forget_epochs`` times, in one compiled call (``unlearn``, ``request_step``).

The meta-gradient is exact and memory-bounded (DESIGN.md): every outer batch depends on φ only
through θ_u, so ``g = Σ_b w_b ∇_{θ_u} L_b`` is accumulated batch by batch (a ``lax.scan``, plain
first-order), then pulled back through the inner step with one VJP: ``∂L/∂φ = vjp(θ_u)(g)``.
``meta_gradient_naive`` differentiates the whole thing at once; tests check both agree.

Beyond the reference (named options of ``Config``; the defaults keep the reference's step):

* ``step_control``: ``none`` (the reference: ``η = meta_lr``); ``line_search`` (after
  meta-training, the request-time step is multiplied by the best of ``step_scales`` on held-out
  simulated requests); ``normalize`` (every step has length ``relative_step ‖θ‖``, then the line
  search);
* ``task_ascent`` λ: the inner loss is ``mean ℓ_φ − λ L_task``, so the learned term corrects a
  gradient-ascent step on the portraits instead of replacing it;
* ``requests_per_update`` k: the meta-gradient is averaged over k requests per update of φ;
* ``validation_requests``: held-out simulated requests (``training``) on which every epoch's
  step is diagnosed (``diagnostics``) and the line search runs; 0 restores the reference's
  request stream exactly;
* ``remat``: every transformer block of the meta-step's passes (the inner step's forward and
  backward, the outer passes) runs under ``jax.checkpoint``: less memory, the same numbers
  (bench/remat_memory.py). The request-time step never uses it (first order, N portraits).

Functions here are pure and jit-compiled with every array passed as an argument; each compiled
step is cached per process (``compiled_cache``) until ``clear_compiled``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from oneshui_jax import hparams, losses, optim
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.unlearn import api

Params = Any
Batch = dict[str, jax.Array]  # image [B,H,W,3], label, row (meta-loss identity row), mask

STEP_CONTROLS = ("none", "line_search", "normalize")


@dataclasses.dataclass(frozen=True)
class Config:
    """MetaUnlearn's settings: the study's ``config.meta_unlearn`` block (the method's schema).

    Defaults are the reference's ``parser.py`` defaults; ``hparams`` holds its per-(dataset, N)
    values, read through each field's reference name. Frozen and hashable: a static jit argument.
    """

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    epochs: int = 3  # meta-training epochs over the simulated requests
    lr: float = 1e-4  # AdamW(AMSGrad) of the meta-loss, per-epoch cosine
    weight_decay: float = 0.0
    meta_lr: float = 0.1  # η of the inner step and of the request-time step
    batch_size: int = 64  # outer batches (forget / val / retain images)
    num_identities_simulation: int = 10  # identities per simulated request
    forget_epochs: int = 1  # request-time steps
    forget_loss: str = "smooth_l1"  # distance of the outer objective: smooth_l1 | l1 | l2
    loss_type: str = "full"  # full | original | unlearned | rev | scrub
    use_accs: bool = True
    use_retain: bool = False  # also meta-train a retain meta-loss (one more request-time step)
    # Retain batches with the train transform; read only with use_retain or loss_type="scrub".
    use_train_aug: bool = True
    hidden_size: int = 512  # meta-loss network (models/meta_loss.py)
    num_layers: int = 0
    dropout: float = dataclasses.field(default=0.5, metadata={"reference": "prob_dropout"})
    use_feats: bool = True
    use_ids: bool = True
    use_targets: bool = True
    compute_dtype: str = "bfloat16"  # outer passes; the inner step is float32
    simulated_draws_per_epoch: int = 2  # the reference draws twice and uses the second (Q23)
    # Held-out simulated requests (of validation_requests x num_identities_simulation TRAIN
    # identities outside the request, kept out of meta-training): the per-epoch diagnostics and
    # the line search run on them. 0: meta-train on every TRAIN identity, the reference's
    # request stream exactly, and no diagnostics (a named deviation otherwise; README).
    validation_requests: int = 4
    # Step-length control (README "MetaUnlearn: step length"). "none": the request-time step is
    # the meta-training step, η = meta_lr (the reference). "line_search": its length is
    # multiplied by the best of step_scales on the held-out requests. "normalize": every step
    # (meta-training and request) has length relative_step * ||θ||, then the line search.
    step_control: str = "none"
    step_scales: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0,
                                      128.0)
    relative_step: float = 1e-3  # "normalize": ||Δθ|| / ||θ|| of the meta-training step
    requests_per_update: int = 1  # meta-gradients averaged per update of φ (the reference: 1)
    # λ: the inner loss is mean ℓ_φ − λ · task loss of the portraits (0: the reference). With
    # λ > 0 the learned term corrects a gradient-ascent step instead of replacing it.
    task_ascent: float = 0.0
    # jax.checkpoint per transformer block in the meta-step (inner step and outer passes): less
    # memory, more compute, the same numbers. Not in the stage fingerprint (study/reuse.py).
    remat: bool = False

    RANGES = {  # every numeric setting's range (api.check_ranges), one ConfigError for each
        "epochs": api.COUNT, "lr": api.NON_NEGATIVE, "weight_decay": api.NON_NEGATIVE,
        "meta_lr": api.NON_NEGATIVE, "batch_size": api.COUNT,
        "num_identities_simulation": api.COUNT, "forget_epochs": api.COUNT,
        "hidden_size": api.COUNT, "num_layers": api.COUNT_OR_ZERO, "dropout": api.BELOW_ONE,
        "simulated_draws_per_epoch": api.COUNT, "validation_requests": api.COUNT_OR_ZERO,
        "step_scales": api.NON_NEGATIVE_LIST, "relative_step": api.NON_NEGATIVE,
        "requests_per_update": api.COUNT, "task_ascent": api.NON_NEGATIVE,
    }

    def __post_init__(self):
        checks = {
            "loss_type": (self.loss_type, losses.LOSS_TYPES),
            "forget_loss": (self.forget_loss, losses.DISTANCES),
            "task": (self.task, ("multilabel", "classification")),
            "compute_dtype": (self.compute_dtype, ("float32", "bfloat16", "float64")),
            "step_control": (self.step_control, STEP_CONTROLS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"config.meta_unlearn.{name} must be one of {allowed}, "
                                  f"got {value!r}")
        api.check_ranges(self, "config.meta_unlearn")
        if not isinstance(self.remat, bool):
            raise ConfigError(f"config.meta_unlearn.remat must be True or False, got "
                              f"{self.remat!r}")
        if self.step_control != "none" and self.validation_requests < 1:
            raise ConfigError(f"config.meta_unlearn.step_control={self.step_control!r} chooses "
                              "the step length on held-out simulated requests: set "
                              "config.meta_unlearn.validation_requests >= 1")

    def lr_at(self, epoch: int) -> float:
        """Per-epoch cosine without warmup: ``lr (1 + cos(π e / E)) / 2``."""
        return optim.epoch_cosine(self.lr, epoch, self.epochs)


def reference_hyperparameters(dataset: str, num_identities: int) -> dict[str, Any]:
    """The reference's per-(dataset, N) MetaUnlearn values (``const.py``; SPEC.md 6.6).

    Returns ``epochs``, ``lr``, ``meta_lr``, ``num_identities_simulation`` and ``batch_size``,
    plus ``tuned``: False (with a logged warning) where the reference has no tuned values for the
    pair and falls back to its generic defaults. The table is ``oneshui_jax.hparams``.
    """
    h = hparams.reference("meta_unlearn", dataset, num_identities)
    if not h.tuned:  # as hparams.warn_if_untuned, logged from here
        logging.warning("MetaUnlearn: %s", h.note)
    keys = ("batch_size", "num_identities_simulation", "epochs", "lr", "meta_lr")
    return {**{k: h.values[k] for k in keys}, "tuned": h.tuned}


def identity_rows(train_ids: list[int]) -> dict[int, int]:
    """The reference's ``identity_map``: identity id -> row of the embedding table."""
    return {identity: row for row, identity in enumerate(train_ids)}


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """torch's AdamW(amsgrad=True) without the learning rate (applied by the step)."""
    return optim.torch_adamw_amsgrad(weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# Inner step: one gradient step on the learned loss


def support_objective(model_cfg: vit.ViTConfig, ml_cfg: meta_loss.MetaLossConfig,
                      task_ascent: float, theta: Params, phi: Params, support: Batch,
                      dropout_rng: jax.Array | None, remat: bool = False) -> jax.Array:
    """The inner loss: mean ``ℓ_φ`` over the valid support images, minus ``λ`` (``task_ascent``)
    times their task loss (model in float32, as the reference; ``λ = 0`` is the reference).
    ``remat``: the model's blocks under ``jax.checkpoint`` (``vit.apply``)."""
    logits, cls = vit.apply(model_cfg, theta, support["image"], remat=remat)
    x = meta_loss.meta_inputs(ml_cfg, logits, cls, support["label"])
    per = meta_loss.apply(ml_cfg, phi, x, support["row"], dropout_rng=dropout_rng)
    out = losses.masked_mean(per, support["mask"])
    if task_ascent:
        out = out - task_ascent * losses.task_loss(ml_cfg.task, logits, support["label"],
                                                   support["mask"])
    return out


def support_loss(model_cfg: vit.ViTConfig, ml_cfg: meta_loss.MetaLossConfig, theta: Params,
                 phi: Params, support: Batch, dropout_rng: jax.Array | None) -> jax.Array:
    """Mean of ``ℓ_φ`` over the valid support images (the model in float32, as the reference)."""
    return support_objective(model_cfg, ml_cfg, 0.0, theta, phi, support, dropout_rng)


def inner_step(model_cfg, ml_cfg, meta_lr, theta, phi, support, dropout_rng) -> Params:
    """``θ − η ∇_θ mean ℓ_φ(support)`` for every parameter (patch embed to head): the
    reference's step (``learned_step`` with the default Config)."""
    grads = jax.grad(support_loss, argnums=2)(model_cfg, ml_cfg, theta, phi, support,
                                              dropout_rng)
    return jax.tree.map(lambda p, g: p - meta_lr * g, theta, grads)


def learned_gradient(model_cfg, ml_cfg, cfg: Config, theta, phi, support,
                     dropout_rng) -> Params:
    """``g = ∇_θ (mean ℓ_φ − λ L_task)`` of the support images (``cfg.remat``: rematerialised)."""
    return jax.grad(support_objective, argnums=3)(model_cfg, ml_cfg, cfg.task_ascent, theta,
                                                  phi, support, dropout_rng, cfg.remat)


def safe_norm(tree) -> jax.Array:
    """The global L2 norm, differentiable at 0."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(tree)) + 1e-30)


def step_coefficient(cfg: Config, theta, grads):
    """``c`` of the step ``θ − c g``: ``meta_lr`` (``step_control`` none / line_search), or
    ``relative_step ‖θ‖ / ‖g‖`` (normalize: the step's length is ``relative_step ‖θ‖``)."""
    if cfg.step_control == "normalize":
        return cfg.relative_step * safe_norm(theta) / safe_norm(grads)
    return cfg.meta_lr


def learned_step(model_cfg, ml_cfg, cfg: Config, theta, phi, support, dropout_rng,
                 scale=None) -> Params:
    """One step on the learned loss, ``θ − s · c · g`` (``c``: ``step_coefficient``; ``s``:
    ``scale``, the line search's factor, 1 if None). With the default Config this is
    ``inner_step`` operation for operation."""
    grads = learned_gradient(model_cfg, ml_cfg, cfg, theta, phi, support, dropout_rng)
    c = step_coefficient(cfg, theta, grads)
    if scale is not None:
        c = scale * c
    return jax.tree.map(lambda p, g: p - c * g, theta, grads)


def retain_config(cfg: Config) -> Config:
    """The retain meta-loss's step: no task-ascent term (it retains)."""
    return dataclasses.replace(cfg, task_ascent=0.0)


# ---------------------------------------------------------------------------------------------
# Outer objective


def outer_batch_loss(model_cfg, cfg: Config, theta_u, theta, forget: Batch,
                     val: Batch, retain: Batch | None = None) -> jax.Array:
    """``L_b`` of one forget batch (with its validation and, for scrub, retain batch).
    ``cfg.remat``: the passes through ``θ_u`` (differentiated) are rematerialised."""
    dtype = jnp.dtype(cfg.compute_dtype)

    def run(params, batch):
        return vit.apply(model_cfg, params, batch["image"], dtype=dtype, remat=cfg.remat)[0]

    u_f = run(theta_u, forget)
    u_v = run(theta_u, val)
    o_v = jax.lax.stop_gradient(run(theta, val))
    kw = {}
    if cfg.loss_type == "scrub":
        kw = dict(u_r=run(theta_u, retain), o_r=jax.lax.stop_gradient(run(theta, retain)),
                  y_r=retain["label"], m_r=retain["mask"],
                  o_f=jax.lax.stop_gradient(run(theta, forget)))
    return losses.forget_objective(
        cfg.task, cfg.loss_type, cfg.forget_loss, cfg.use_accs, u_f=u_f, y_f=forget["label"],
        m_f=forget["mask"], u_v=u_v, o_v=o_v, y_v=val["label"], m_v=val["mask"], **kw)


def retain_batch_loss(model_cfg, cfg: Config, theta_u, theta, forget, val,
                      retain) -> jax.Array:
    """Outer objective of the optional retain step: the task loss on a retain batch.

    The reference hard-codes BCE here, which breaks classification (Q18); the task loss is
    identical for multi-label tasks and correct for classification.
    """
    logits = vit.apply(model_cfg, theta_u, retain["image"], dtype=jnp.dtype(cfg.compute_dtype),
                       remat=cfg.remat)[0]
    return losses.task_loss(cfg.task, logits, retain["label"], retain["mask"])


def _weights(batches: Batch) -> jax.Array:
    """``n_b / Σ n_b`` for stacked batches [K, B, ...] (fully padded batches weigh 0)."""
    sizes = jnp.sum(batches["mask"].astype(jnp.float32), axis=1)
    return sizes / jnp.maximum(jnp.sum(sizes), 1.0)


def _stack_item(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


def meta_gradient(model_cfg, ml_cfg, cfg: Config, theta, phi, support, forget,
                  val, retain, dropout_rng, objective: Callable = outer_batch_loss):
    """``(L, ∂L/∂φ, θ_u)`` streamed: outer gradient batch by batch, then one VJP.

    ``forget``/``val``/``retain`` are stacked batches [K, B, ...] (``retain`` may be None).
    Fully masked batches (padding: ``simulated.pad_batches``) weigh 0 and are skipped, so
    requests padded to one ``K`` share one compilation at the cost of their real batches only.
    """
    theta_u, pullback = jax.vjp(
        lambda p: learned_step(model_cfg, ml_cfg, cfg, theta, p, support, dropout_rng), phi)
    weights = _weights(forget)

    def accumulate(carry, k):
        g_acc, loss_acc = carry
        batch_retain = None if retain is None else _stack_item(retain, k)
        loss_b, g_b = jax.value_and_grad(objective, argnums=2)(
            model_cfg, cfg, theta_u, theta, _stack_item(forget, k), _stack_item(val, k),
            batch_retain)
        w = weights[k]
        g_acc = jax.tree.map(lambda a, g: a + w * g, g_acc, g_b)
        return g_acc, loss_acc + w * loss_b

    def body(carry, k):
        return jax.lax.cond(weights[k] > 0, accumulate, lambda c, _: c, carry, k), None

    zeros = jax.tree.map(jnp.zeros_like, theta_u)
    num_batches = forget["mask"].shape[0]
    loss0 = jnp.zeros((), jnp.promote_types(jax.tree.leaves(theta_u)[0].dtype, jnp.float32))
    (g, loss), _ = jax.lax.scan(body, (zeros, loss0), jnp.arange(num_batches))
    (grad_phi,) = pullback(g)
    return loss, grad_phi, theta_u


def meta_gradient_naive(model_cfg, ml_cfg, cfg: Config, theta, phi, support, forget,
                        val, retain, dropout_rng, objective: Callable = outer_batch_loss):
    """``(L, ∂L/∂φ)`` by differentiating inner step and all outer batches at once."""
    weights = _weights(forget)

    def total(p):
        theta_u = learned_step(model_cfg, ml_cfg, cfg, theta, p, support, dropout_rng)
        out = 0.0
        for k in range(forget["mask"].shape[0]):
            batch_retain = None if retain is None else _stack_item(retain, k)
            out = out + weights[k] * objective(model_cfg, cfg, theta_u, theta,
                                               _stack_item(forget, k), _stack_item(val, k),
                                               batch_retain)
        return out

    return jax.value_and_grad(total)(phi)


# ---------------------------------------------------------------------------------------------
# Jitted steps

_compiled_caches: list[Any] = []  # every per-process cache of compiled functions


def compiled_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache(maxsize=maxsize)`` of a function that returns compiled code, the
    cache kept in a list that ``clear_compiled`` empties (``diagnostics`` uses it too)."""

    def wrap(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _compiled_caches.append(cached)
        return cached

    return wrap


def make_meta_step(model_cfg, ml_cfg, cfg: Config, tx,
                   objective: Callable = outer_batch_loss) -> Callable:
    """``step(theta, phi, opt_state, lr, support, forget, val, retain, rng)`` -> new φ, state.

    Returns ``(phi, opt_state, {"loss", "meta_loss", "grad_norm"}, theta_u)``. ``theta_u`` is the
    one-step-unlearned model (the start of the optional retain step).
    """
    grad_fn = _meta_grad_fn(model_cfg, ml_cfg, cfg, objective)

    def step(theta, phi, opt_state, lr, support, forget, val, retain, rng):
        grad_phi, stats, theta_u = grad_fn(theta, phi, support, forget, val, retain, rng)
        phi, opt_state = _apply_update(tx, phi, opt_state, grad_phi, lr)
        return phi, opt_state, stats, theta_u

    return jax.jit(step)


def _meta_grad_fn(model_cfg, ml_cfg, cfg: Config, objective: Callable) -> Callable:
    def grad_fn(theta, phi, support, forget, val, retain, rng):
        loss, grad_phi, theta_u = meta_gradient(model_cfg, ml_cfg, cfg, theta, phi, support,
                                                forget, val, retain, rng, objective)
        stats = {"loss": loss, "meta_loss": support_loss(model_cfg, ml_cfg, theta, phi, support,
                                                         rng),
                 "grad_norm": optax.global_norm(grad_phi)}
        return grad_phi, stats, jax.lax.stop_gradient(theta_u)

    return grad_fn


def _apply_update(tx, phi, opt_state, grad_phi, lr):
    updates, opt_state = tx.update(grad_phi, opt_state, phi)
    return jax.tree.map(lambda p, u: p - lr * u, phi, updates), opt_state


_COMPILED_FIELDS = ("task", "weight_decay", "meta_lr", "forget_loss", "loss_type", "use_accs",
                    "compute_dtype", "step_control", "relative_step", "task_ascent", "remat")


def compile_key(cfg: Config) -> Config:
    """``cfg`` with only the fields a compiled step reads (``_COMPILED_FIELDS``; the rest at
    their defaults): configs that differ in epochs, lr, request sizes, ... share one compilation
    (a selection over learning rates compiles once)."""
    return Config(**{k: getattr(cfg, k) for k in _COMPILED_FIELDS})


def meta_step(model_cfg, ml_cfg, cfg: Config,
              objective: Callable = outer_batch_loss) -> Callable:
    """``make_meta_step`` with the method's optimiser, compiled once per process for each
    (model, meta-loss, ``compile_key(cfg)``, objective): a resumed or repeated meta-training
    reuses it."""
    return _meta_step(model_cfg, ml_cfg, compile_key(cfg), objective)


@compiled_cache(8)
def _meta_step(model_cfg, ml_cfg, cfg: Config, objective: Callable) -> Callable:
    return make_meta_step(model_cfg, ml_cfg, cfg, optimizer(cfg), objective)


def meta_grad(model_cfg, ml_cfg, cfg: Config,
              objective: Callable = outer_batch_loss) -> Callable:
    """The first half of ``meta_step`` alone, for ``requests_per_update`` > 1:
    ``(theta, phi, support, forget, val, retain, rng) -> (∂L/∂φ, stats, theta_u)``."""
    return _meta_grad(model_cfg, ml_cfg, compile_key(cfg), objective)


@compiled_cache(8)
def _meta_grad(model_cfg, ml_cfg, cfg: Config, objective: Callable) -> Callable:
    return jax.jit(_meta_grad_fn(model_cfg, ml_cfg, cfg, objective))


def meta_update(cfg: Config) -> Callable:
    """The second half of ``meta_step``: ``(phi, opt_state, grad_phi, lr) -> (phi, opt_state)``
    (the averaged meta-gradient of ``requests_per_update`` requests)."""
    return _meta_update(compile_key(cfg))


@compiled_cache(8)
def _meta_update(cfg: Config) -> Callable:
    return jax.jit(functools.partial(_apply_update, optimizer(cfg)))


def clear_compiled() -> None:
    """Drops every compiled MetaUnlearn step of this process (and JAX's caches). A process that
    meta-trains many configurations in a row (``oneshui_jax.select``) calls it between them:
    compiled CPU executables each hold memory mappings, and a few dozen of the meta-step's
    exhaust the kernel's per-process limit (LLVM then fails with "Cannot allocate memory").
    Every ``compiled_cache`` is emptied: the meta-step's, the request steps' and the
    diagnostics' (``diagnostics._jitted``)."""
    for cached in _compiled_caches:
        cached.cache_clear()
    _request_constants_cache.clear()
    jax.clear_caches()


def make_unlearn_step(model_cfg, ml_cfg, cfg: Config) -> Callable:
    """Request-time unlearning, one step: ``θ − s c ∇_θ (mean ℓ_φ − λ L_task)(portraits)``
    (dropout off; ``learned_step``). ``step(theta, phi, support, scale)``; ``scale`` (``s``, the
    line search's factor) is ignored with ``step_control="none"``, the reference's step.
    Never rematerialised (``cfg.remat`` is for meta-training): a first-order step on N images."""
    cfg = dataclasses.replace(cfg, remat=False)

    def step(theta, phi, support, scale=1.0):
        s = None if cfg.step_control == "none" else jnp.asarray(scale, jnp.float32)
        return learned_step(model_cfg, ml_cfg, cfg, theta, phi, support, None, s)

    return jax.jit(step)


_unlearn_steps = compiled_cache(32)(make_unlearn_step)


def _cached_unlearn_step(model_cfg, ml_cfg, cfg: Config) -> Callable:
    return _unlearn_steps(model_cfg, ml_cfg, compile_key(dataclasses.replace(cfg, remat=False)))


def apply_steps(unlearn_step: Callable, theta, phi_forget, support, forget_epochs: int,
                phi_retain=None, scale=1.0, retain_step: Callable | None = None):
    """``forget_epochs`` steps with the forget meta-loss, then one with the retain one if any
    (``retain_step``, default ``unlearn_step``)."""
    for _ in range(forget_epochs):
        theta = unlearn_step(theta, phi_forget, support, scale)
    if phi_retain is not None:
        theta = (retain_step or unlearn_step)(theta, phi_retain, support, scale)
    return theta


def make_request_step(model_cfg, ml_cfg, cfg: Config, forget_epochs: int, retain: bool,
                      donate: bool = False) -> Callable:
    """A whole request in one compiled call: ``apply_steps`` fused, the update inside it.

    ``request(theta, phi, phi_retain, images, labels, rows, scale) -> θ_u``: ``forget_epochs``
    steps ``θ ← θ − s c g`` (``learned_step``, dropout off) with ``phi``, then one with
    ``phi_retain`` if ``retain`` (else pass None), the mask of the N portraits built inside.
    Each step's new parameters are computed inside the step's own program (no separate update
    pass, no intermediate θ handed back to Python). ``donate``: the input ``theta`` is donated
    (its buffers may hold the output; the caller must not use it again): only for a caller
    that owns a copy. ``unlearn`` never donates (the caller keeps its parameters: an Engine
    serves every request from the same model).
    """
    forget_cfg = dataclasses.replace(cfg, remat=False)
    retain_cfg = retain_config(forget_cfg)

    def request(theta, phi, phi_retain, images, labels, rows, scale):
        support = {"image": images, "label": labels, "row": rows,
                   "mask": jnp.ones(images.shape[:1], bool)}
        s = None if cfg.step_control == "none" else jnp.asarray(scale, jnp.float32)

        def forget_step(_, t):
            return learned_step(model_cfg, ml_cfg, forget_cfg, t, phi, support, None, s)

        if forget_epochs == 1:
            theta = forget_step(0, theta)
        else:  # one compiled step body, however many steps
            theta = jax.lax.fori_loop(0, forget_epochs, forget_step, theta)
        if retain:
            theta = learned_step(model_cfg, ml_cfg, retain_cfg, theta, phi_retain, support,
                                 None, s)
        return theta

    return jax.jit(request, donate_argnums=(0,) if donate else ())


_request_steps = compiled_cache(32)(make_request_step)


def request_step(model_cfg, ml_cfg, cfg: Config, retain: bool, donate: bool = False
                 ) -> Callable:
    """``make_request_step`` compiled once per process for each (model, meta-loss,
    ``compile_key(cfg)``, ``forget_epochs``, retain, donate) and request size: a served
    request of a size seen before runs compiled code without tracing again."""
    return _request_steps(model_cfg, ml_cfg, compile_key(dataclasses.replace(cfg, remat=False)),
                          cfg.forget_epochs, retain, donate)


_request_constants_cache: dict[tuple[int, int], tuple[Any, ...]] = {}


def request_constants(artifacts: api.Artifacts
                      ) -> tuple[dict[int, int], int, jax.Array, float]:
    """``(identity -> embedding row, number of rows, step scale on the device, step scale as a
    float)`` of a
    method run's artifacts, computed at its first request and reused: later requests do no
    host work and no device-to-host copy for them. Keyed by the identity of the
    ``train_identities`` and ``step_scale`` arrays, which the cache keeps alive (so an id is not
    reused while cached); artifacts are never modified in place."""
    ids, scale = artifacts["train_identities"], artifacts.get("step_scale", 1.0)
    key = (id(ids), id(scale))
    hit = _request_constants_cache.get(key)
    if hit is None or hit[0] is not ids or hit[1] is not scale:
        value = float(np.asarray(scale))  # runs before the step_control option: 1
        listed = np.asarray(ids).tolist()
        hit = (ids, scale, identity_rows(listed), len(listed), jnp.asarray(value, jnp.float32),
               value)
        if len(_request_constants_cache) >= 8:
            _request_constants_cache.pop(next(iter(_request_constants_cache)))
        _request_constants_cache[key] = hit
    return hit[2:]


# ---------------------------------------------------------------------------------------------
# The method (unlearn/api.py), request side: one step on the portraits (``training.prepare``
# meta-trains before the request)

ACCESS = api.STATS


def meta_loss_config(model: api.Model, cfg: Config, num_identities: int
                     ) -> meta_loss.MetaLossConfig:
    """The meta-loss network for ``model``: one embedding row per TRAIN identity."""
    return meta_loss.MetaLossConfig.for_vit(
        model.vit, num_identities=num_identities, task=model.task, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, dropout=cfg.dropout, use_feats=cfg.use_feats,
        use_ids=cfg.use_ids, use_targets=cfg.use_targets)


def request_rows(train_identities: Sequence[int] | dict[int, int],
                 identities: Sequence[int | None], use_ids: bool) -> np.ndarray:
    """The meta-loss embedding row of each portrait; ConfigError for an unusable identity.
    ``train_identities``: the ids of the embedding rows in order, or ``identity_rows`` of them."""
    rows = (train_identities if isinstance(train_identities, dict)
            else identity_rows([int(i) for i in train_identities]))
    if any(i is None for i in identities):
        if use_ids:
            raise ConfigError("the meta-loss uses identity embeddings (use_ids): give each "
                              "portrait's training identity id (--identity ID)")
        return np.zeros(len(identities), np.int32)
    unknown = sorted({int(i) for i in identities} - set(rows))
    if unknown:
        raise ConfigError(f"identities {unknown} are not training identities of this model "
                          f"({len(rows)} known); the meta-loss can only forget people it was "
                          "trained on")
    return np.asarray([rows[int(i)] for i in identities], np.int32)


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data=None) -> tuple[Params, dict[str, Any]]:
    """``forget_epochs`` steps ``θ − η ∇_θ mean ℓ_φ(portraits)``, then the retain step if any
    (SPEC.md 6.5). Reads the portraits alone.

    One compiled call (``request_step``, fused steps, ``params`` not donated), traced once per
    request size; per request only the identities' rows are looked up on the host
    (``request_constants``) and nothing is copied back from the device.
    """
    del rng, data  # deterministic; reads nothing but the request
    rows, num_rows, scale, scale_value = request_constants(artifacts)
    ml_cfg = meta_loss_config(model, cfg, num_rows)
    retain = "phi_retain" in artifacts
    step = request_step(model.vit, ml_cfg, cfg, retain)
    new = step(params, artifacts["phi"], artifacts.get("phi_retain"),
               jnp.asarray(request.images), jnp.asarray(request.labels),
               jnp.asarray(request_rows(rows, request.identities, cfg.use_ids)), scale)
    return new, {"steps": cfg.forget_epochs + int(retain), "step_scale": scale_value}
