"""The registry of unlearning methods: ``METHODS`` maps a method name to its study stage.

A stage function takes ``(ctx, base_params, run_dir)`` (the study context, the pretrained
parameters and the run's checkpoint folder) and returns ``(params, info)``: the unlearned
parameters and a dict with ``record`` (extra fields of the results record) and ``metadata``
(extra fields of the checkpoint metadata).
"""

from oneshui_jax.unlearn import meta_train

METHODS = {
    "meta_unlearn": meta_train.run_stage,
}
