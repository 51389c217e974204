"""head_ascent: a few steps of gradient ascent on the portraits' task loss, on the head alone.

The example method of the tutorial "Add your own unlearning method" (docs/add-a-method.md). It is
deliberately simple: at request time it raises the task loss of the portraits by ``steps``
steps of gradient ascent of size ``lr`` on the classification head's parameters; the backbone
is left as it is. It reads the request's portraits and nothing else (ACCESS ``support``), so it
can serve a deletion request.

A study runs it as a stage whose config block names this module::

    config.head_ascent = api.default_block(head_ascent)
    config.head_ascent.method = "docs.examples.head_ascent"
    config.stages = ("pretrain", "retrain", "head_ascent")
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from oneshui_jax import losses
from oneshui_jax.unlearn import api

ACCESS = api.SUPPORT  # the request's portraits alone: servable


@dataclasses.dataclass(frozen=True)
class Config:
    """head_ascent's settings: the study's ``config.head_ascent`` block."""

    # Bound to the model, not a setting: the study fills it from the dataset.
    task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
    steps: int = 5  # ascent steps on the portraits
    lr: float = 0.05  # step size of each ascent step

    RANGES = {"steps": api.COUNT, "lr": api.LEARNING_RATE}  # checked before any work


@functools.cache
def _ascent(model: api.Model, task: str, steps: int):
    """The jitted ascent, compiled once per (model, task, steps)."""

    def loss(head, params, images, labels):
        logits = model.logits({**params, "head": head}, images, dtype="float32")
        return losses.task_loss(task, logits, labels, jnp.ones(images.shape[0], bool))

    @jax.jit
    def run(params, images, labels, lr):
        def step(head, _):
            grads = jax.grad(loss)(head, params, images, labels)
            return jax.tree.map(lambda h, g: h + lr * g, head, grads), None

        head, _ = jax.lax.scan(step, params["head"], None, length=steps)
        return {**params, "head": head}, loss(head, params, images, labels)

    return run


def unlearn(model: api.Model, params: Any, artifacts: api.Artifacts, request: api.Request,
            cfg: Config, rng: jax.Array, data=None) -> tuple[Any, dict[str, Any]]:
    """The unlearned parameters and what the step did (recorded in the study's results)."""
    del artifacts, rng, data  # no prepare, no randomness, no data beyond the request
    run = _ascent(model, cfg.task, cfg.steps)
    new, loss_after = run(params, jnp.asarray(request.images), jnp.asarray(request.labels),
                          jnp.float32(cfg.lr))
    return new, {"portrait_loss_after": float(loss_after)}
