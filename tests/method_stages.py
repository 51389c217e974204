"""The study's method stages on the shared small study (``small_study.py``): the pretrained
model reloaded as a base for ``study.method_stage``, a fresh checkpoint folder per test, and
evaluation switched off for tests that watch what a method reads."""

import dataclasses
import types

from oneshui_jax import study
from oneshui_jax.study import stages


def load_base(small_study):
    """A context on the shared small study and its pretrained model (reloaded, not trained)."""
    config = small_study.config.copy_and_resolve_references()
    config.support_ascent.num_requests = 2
    ctx = study.prepare(config)
    record, params = study.train_stage(ctx, "pretrain", study.initial_params(ctx))
    assert record["reused"]
    return types.SimpleNamespace(config=config, ctx=ctx, params=params,
                                 base_dir=ctx.run_dir("pretrain"))


def fresh_context(base, tmp_path, source=None):
    """``base.ctx`` with its own checkpoint folder (the pretrained run copied) and source."""
    ctx = dataclasses.replace(base.ctx, config=base.config.copy_and_resolve_references())
    ctx.config.checkpoint_dir = str(tmp_path / "ckpt")
    if source is not None:
        ctx.dataset = dataclasses.replace(ctx.dataset, source=source)
    return ctx


def no_evaluation(monkeypatch):
    """Evaluation reads every split by design; these tests watch the method alone."""
    fake = {s: {"metric": 50.0, "loss": 1.0} for s in ("retain", "forget", "test", "val")}
    monkeypatch.setattr(stages, "evaluate_splits", lambda ctx, params: fake)


def forget_only(ctx):
    """Images of the forget identities other than their support images."""
    return set(ctx.images["forget"].tolist())
