"""support_ascent: one gradient-ascent step on the portraits' task loss, a MetaUnlearn baseline.

At request time, with the support images ``s`` (the portraits) and their labels::

    θ' = θ + α ∇_θ L_task(θ; s)          (mean BCE / cross-entropy over the portraits, float32)

The step length ``α`` is chosen *before* the request (``prepare``), the way MetaUnlearn learns
its loss: on simulated requests (``splits.simulated_requests``, drawn as MetaUnlearn draws them,
with the study's seed) each candidate in ``Config.alphas`` takes the step on the simulated
request's support images, and the candidate with the lowest mean of MetaUnlearn's outer objective
(``losses.forget_objective``: the forget images' weighted loss pulled towards that of unseen
validation people, SPEC.md 6.3) wins; ties go to the shorter step. ``α = 0`` is a candidate, so
the selection can conclude that ascent does not help. The simulated requests are drawn from the
*held-out* TRAIN identities only (``TrainData.holdout_identities``): the people being forgotten
never take part in the selection.

This is the "does meta-learning add anything?" baseline the paper lacks: the same data, the same
outer objective and the same single step on the portraits as MetaUnlearn, but with the task loss
instead of a learned one and a single scalar instead of a network. ACCESS ``stats``: the request
plus one number selected on training data.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from oneshui_jax import interrupts, losses, sharding
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import vit
from oneshui_jax.unlearn import api

ACCESS = api.STATS
OBJECTIVES = ("full", "original", "unlearned", "rev")  # MetaUnlearn's, without scrub's retain set

Params = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """support_ascent's settings: the study's ``config.support_ascent`` block."""

    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    # Candidate step lengths α (ascent on the portraits' task loss); 0 = leave the model as is.
    alphas: tuple[float, ...] = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    num_requests: int = 16  # simulated requests of held-out identities the selection averages
    num_identities_simulation: int = 10  # identities per simulated request (the study's N)
    simulated_draws: int = 2  # draw the request stream this often, use the last (MetaUnlearn's)
    batch_size: int = 64  # outer batches of forget / val images
    loss_type: str = "full"  # the outer objective, as MetaUnlearn's
    forget_loss: str = "smooth_l1"
    use_accs: bool = True
    compute_dtype: str = "bfloat16"  # outer passes; the ascent step is float32

    RANGES = {  # every numeric setting's range (api.check_ranges)
        "alphas": api.NON_NEGATIVE_LIST, "num_requests": api.COUNT,
        "num_identities_simulation": api.COUNT, "simulated_draws": api.COUNT,
        "batch_size": api.COUNT,
    }

    def __post_init__(self):
        if self.loss_type not in OBJECTIVES:
            raise ConfigError(f"config.support_ascent.loss_type must be one of {OBJECTIVES}, "
                              f"got {self.loss_type!r}")
        if self.forget_loss not in losses.DISTANCES:
            raise ConfigError(f"config.support_ascent.forget_loss must be one of "
                              f"{losses.DISTANCES}, got {self.forget_loss!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float64"):
            raise ConfigError(f"config.support_ascent.compute_dtype must be float32 or "
                              f"bfloat16, got {self.compute_dtype!r}")
        api.check_ranges(self, "config.support_ascent")


# ---------------------------------------------------------------------------------------------
# Pure functions


def support_gradient(model_cfg: vit.ViTConfig, task: str, params: Params,
                     support: dict[str, jax.Array]) -> Params:
    """``∇_θ`` of the mean task loss over the valid support images (float32 forward)."""

    def loss(p):
        logits = vit.apply(model_cfg, p, support["image"])[0]
        return losses.task_loss(task, logits, support["label"], support["mask"])

    return jax.grad(loss)(params)


def ascend(params: Params, grads: Params, alpha: jax.Array) -> Params:
    """``θ + α g``."""
    return jax.tree.map(lambda p, g: p + alpha.astype(p.dtype) * g, params, grads)


def selection_losses(model_cfg: vit.ViTConfig, cfg: Config, params: Params,
                     support: dict[str, jax.Array], forget: dict[str, jax.Array],
                     val: dict[str, jax.Array], alphas: jax.Array) -> jax.Array:
    """The outer objective of one simulated request after a step of each ``alphas`` [A] -> [A].

    ``forget`` / ``val`` are stacked outer batches [K, B, ...]; batch ``k`` weighs its number of
    valid forget images, as in MetaUnlearn's meta-gradient; fully masked (padding) batches are
    skipped.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    grads = support_gradient(model_cfg, cfg.task, params, support)
    sizes = jnp.sum(forget["mask"].astype(jnp.float32), axis=1)
    weights = sizes / jnp.maximum(jnp.sum(sizes), 1.0)
    num_batches = forget["mask"].shape[0]

    def logits(p, images):
        return vit.apply(model_cfg, p, images, dtype=dtype)[0]

    o_v = jax.lax.map(lambda images: logits(params, images), val["image"])

    def one(alpha):
        theta_u = ascend(params, grads, alpha)

        def add(total, k):
            value = losses.forget_objective(
                cfg.task, cfg.loss_type, cfg.forget_loss, cfg.use_accs,
                u_f=logits(theta_u, forget["image"][k]), y_f=forget["label"][k],
                m_f=forget["mask"][k], u_v=logits(theta_u, val["image"][k]), o_v=o_v[k],
                y_v=val["label"][k], m_v=val["mask"][k])
            return total + weights[k] * value.astype(jnp.float32)

        def body(total, k):
            return jax.lax.cond(weights[k] > 0, add, lambda t, _: t, total, k), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(num_batches))
        return total

    return jax.lax.map(one, alphas)


@functools.lru_cache(maxsize=16)
def _selection_step(model_cfg: vit.ViTConfig, cfg: Config):
    return jax.jit(functools.partial(selection_losses, model_cfg, cfg))


@functools.lru_cache(maxsize=16)
def _ascent_step(model_cfg: vit.ViTConfig, task: str):
    def step(params, support, alpha):
        return ascend(params, support_gradient(model_cfg, task, params, support), alpha)

    return jax.jit(step)


def choose(alphas, mean_losses) -> int:
    """Index of the ``α`` with the lowest mean outer objective; on ties the smallest ``α``."""
    order = np.argsort(np.asarray(alphas), kind="stable")
    return int(order[np.argmin(np.asarray(mean_losses)[order])])


# ---------------------------------------------------------------------------------------------
# The method


def prepare(model: api.Model, params: Params, data: api.TrainData, cfg: Config,
            rng: jax.Array) -> tuple[api.Artifacts, dict[str, Any]]:
    """Selects ``α`` on simulated requests of the held-out TRAIN identities (module docstring).

    Artifacts: ``alpha`` (a float32 scalar). Info: the chosen ``alpha``, the mean outer objective
    of every candidate (``selection``), and how many requests and identities it used.
    """
    del rng  # the request stream follows data.seed, as MetaUnlearn's
    from oneshui_jax.unlearn import simulated

    py_rng = random.Random(data.seed)
    for _ in range(cfg.simulated_draws):
        requests = data.simulated_requests(cfg.num_identities_simulation, py_rng,
                                           identities=data.holdout_identities)
    requests = requests[:cfg.num_requests]
    # every request padded to the largest K: the selection step compiles once
    num_batches = max([simulated.outer_batches(len(r.forget), cfg.batch_size)
                       for r in requests] + [1])
    step = _selection_step(model.vit, cfg)
    alphas = jnp.asarray(cfg.alphas, jnp.float32)
    totals = np.zeros(len(cfg.alphas))
    used: set[int] = set()
    for i, request in enumerate(tqdm(requests, desc="support_ascent: selecting α",
                                     unit="request", disable=not data.progress, leave=False)):
        interrupts.check()
        support, forget, val, _ = simulated.request_batches(
            data, request, batch_size=cfg.batch_size,
            support_size=cfg.num_identities_simulation, rows={}, rng=np.random.default_rng(
                [data.seed, i]), num_batches=num_batches)
        forget, val = sharding.shard_batch((forget, val), axis=1)  # [K, B, ...] along B
        totals += np.asarray(step(params, support, forget, val, alphas), np.float64)
        used.update(request.identities)
    mean = totals / max(len(requests), 1)
    alpha = float(cfg.alphas[choose(cfg.alphas, mean)])
    info = {"alpha": alpha,
            "selection": [{"alpha": float(a), "outer_loss": float(m)}
                          for a, m in zip(cfg.alphas, mean, strict=True)],
            "selection_requests": len(requests), "selection_identities": len(used)}
    return {"alpha": np.asarray(alpha, np.float32)}, info


def unlearn(model: api.Model, params: Params, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data=None) -> tuple[Params, dict[str, Any]]:
    """``θ + α ∇_θ L_task(θ; portraits)`` with the ``α`` chosen before the request."""
    del rng, data
    support = {"image": jnp.asarray(request.images), "label": jnp.asarray(request.labels),
               "mask": jnp.ones(request.size, bool)}
    alpha = jnp.asarray(artifacts["alpha"], jnp.float32)
    new = _ascent_step(model.vit, cfg.task)(params, support, alpha)
    return new, {"alpha": float(alpha)}
