"""MetaUnlearn: a learned loss whose one gradient step on the portraits unlearns a person.

The paper's method for 1-SHUI (paper section 3: a person hands in a few portraits and the
training data is gone); the reference's code as SPEC.md section 6 specifies it. While the
training data is still there, a small network, the meta-loss ``ℓ_φ`` (``models/meta_loss.py``),
is meta-trained on simulated deletion requests of the TRAIN identities
(``splits.simulated_requests``): for each request's support images ``s`` the model takes one
inner step ``θ_u = θ − η ∇_θ mean_{x ∈ s} ℓ_φ(x; θ)`` and φ is updated so that ``θ_u`` has
forgotten the request's people and kept the rest (the outer objective, ``losses.py``). At
request time the same single step, on the portraits alone, is the unlearning.

This module is the method as the registry (``unlearn/registry.py``) and the method API
(``unlearn/api.py``) see it: ``ACCESS`` (``stats``), ``Config``, ``prepare`` (meta-training,
before the request), ``unlearn`` (the step, at the request; what serving calls), plus
``clear_compiled``, ``meta_loss_config`` and ``reference_hyperparameters``. The parts, each
importing only those before it:

* ``core``: ``Config`` and its validation, the inner step on the learned loss, the outer
  objective, the exact streamed meta-gradient and the compiled meta-step, the request-time
  step (``request_step``, ``unlearn``) and the per-process caches of compiled code;
* ``diagnostics``: what the learned step does on held-out simulated requests, and the line
  search's objective;
* ``training``: meta-training over the simulated requests (resumable, diagnosed each epoch,
  the optional line search) and ``prepare``.
"""

from __future__ import annotations

from oneshui_jax.unlearn.meta_unlearn.core import (
    ACCESS,
    Config,
    clear_compiled,
    meta_loss_config,
    reference_hyperparameters,
    unlearn,
)
from oneshui_jax.unlearn.meta_unlearn.training import prepare

__all__ = ["ACCESS", "Config", "clear_compiled", "meta_loss_config", "prepare",
           "reference_hyperparameters", "unlearn"]
