"""The reference's baselines end to end through the study's own stage code, on the shared small
study: what each reads (through a recording source), its record and checkpoint, and serving
(one-shot methods serve a request from their run; full-data methods are refused)."""

import os

import doubles
import jax
import method_stages
import numpy as np
import optax
import pytest

from oneshui_jax import checkpoints, study
from oneshui_jax.unlearn import api, registry

fresh_context = method_stages.fresh_context
_no_evaluation = method_stages.no_evaluation
forget_only = method_stages.forget_only


@pytest.fixture(scope="module")
def base(small_study):
    return method_stages.load_base(small_study)


@pytest.mark.parametrize("name", ["ssd", "lipschitz", "pgu"])
@pytest.mark.slow
def test_one_shot_baselines_run_as_stages_read_what_they_may_and_serve(base, tmp_path,
                                                                        monkeypatch, name):
    """SSD and PGU (stats) and Lipschitz (support) as study stages: Lipschitz reads the
    portraits and nothing else; SSD and PGU also read, before the request, the training images
    the pretrained model was fitted on (the forget identities' other images among them, as the
    reference) and never a test image. Each changes the model and serves a request from its own
    run directory."""
    from PIL import Image

    from oneshui_jax import serve

    _no_evaluation(monkeypatch)
    recording = doubles.Recording(base.ctx.dataset.source)
    ctx = fresh_context(base, tmp_path, recording)
    record, params = study.method_stage(ctx, name, base.params, base.base_dir)
    read = set(recording.read)
    assert not read & set(ctx.images["test"].tolist())
    if name == "lipschitz":
        assert read == set(ctx.splits.support) and record["access"] == api.SUPPORT
    else:
        assert read - set(ctx.splits.support) == set(ctx.images["train"].tolist())
        assert record["access"] == api.STATS
        assert name != "ssd" or record["unlearn"]["dampened"] > 0
    assert checkpoints.params_hash(params) != checkpoints.params_hash(base.params)

    rdir = ctx.run_dir(name)
    portrait = str(tmp_path / "portrait.png")
    support = int(ctx.splits.support[0])
    Image.fromarray(np.asarray(base.ctx.dataset.source[support]["image"])).save(portrait)
    identity = int(ctx.dataset.annotations.identities[support])
    receipt = serve.serve_request(rdir, [portrait], str(tmp_path / "out"), identities=[identity])
    assert receipt.method == name
    served = checkpoints.load_params(str(tmp_path / "out"))
    assert checkpoints.params_hash(served) != checkpoints.params_hash(base.params)


FULL_DATA_SETTINGS = {  # one epoch, a few steps: the study's code path, not the method's result
    "scrub": {"epochs": 1, "forgetting_epochs": 1, "batch_size": 16, "batch_size_retain": 256,
              "use_train_aug": True, "compute_dtype": "float32", "lr": 1e-3},
    "bad_teacher": {"epochs": 1, "batch_size": 256, "compute_dtype": "float32", "lr": 1e-3},
}


@pytest.mark.parametrize("name", ["scrub", "bad_teacher"])
@pytest.mark.slow
def test_full_data_baselines_run_as_stages_read_what_they_may_and_are_not_served(
        base, tmp_path, monkeypatch, capsys, name):
    """SCRUB and Bad Teacher (ACCESS full) as study stages: they read the forget and retain
    sets (and the portraits the study turns into the request), never a test image; the record
    says ``full``; serving refuses the run with one error line."""
    from PIL import Image

    from oneshui_jax.cli import request as request_cli

    _no_evaluation(monkeypatch)
    recording = doubles.Recording(base.ctx.dataset.source)
    ctx = fresh_context(base, tmp_path, recording)
    block = api.default_block(registry.METHODS[name])
    block.update(FULL_DATA_SETTINGS[name])
    ctx.config[name] = block
    record, params = study.method_stage(ctx, name, base.params, base.base_dir)
    read = set(recording.read)
    granted = set(np.concatenate([ctx.images[s] for s in ("forget", "retain", "val")]).tolist())
    assert not read & set(ctx.images["test"].tolist())
    assert read - set(ctx.splits.support) <= granted
    assert forget_only(ctx) <= read and set(ctx.images["retain"].tolist()) <= read
    assert record["access"] == api.FULL == checkpoints.read_metadata(ctx.run_dir(name))["access"]
    forget, retain = len(ctx.images["forget"]), len(ctx.images["retain"])
    batches = lambda n, b: -(-n // min(b, n))  # noqa: E731
    unlearned = record["unlearn"]
    if name == "scrub":
        assert (unlearned["max_steps"], unlearned["min_steps"]) == (batches(forget, 16),
                                                                    batches(retain, 256))
    else:
        assert unlearned["steps"] == batches(forget + retain, 256)
    assert (unlearned["forget_images"], unlearned["retain_images"]) == (forget, retain)
    assert checkpoints.params_hash(params) != checkpoints.params_hash(base.params)

    portrait = str(tmp_path / "portrait.png")
    support = int(ctx.splits.support[0])
    Image.fromarray(np.asarray(base.ctx.dataset.source[support]["image"])).save(portrait)
    out = str(tmp_path / "out")
    capsys.readouterr()
    code = request_cli.main(["--checkpoint", ctx.run_dir(name), "--portrait", portrait,
                             "--identity", str(int(ctx.dataset.annotations.identities[support])),
                             "--out", out])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "forget and retain" in stderr and not os.path.exists(out)


@pytest.mark.slow
def test_a_variant_runs_as_its_own_stage_and_serves_as_its_method(base, tmp_path, monkeypatch):
    """A stage whose block names its method (``registry.resolve``): its own run folder, its own
    row, its own settings; its run records the method and serves like it."""
    import ml_collections

    from oneshui_jax import serve
    from oneshui_jax.errors import ConfigError

    _no_evaluation(monkeypatch)
    ctx = fresh_context(base, tmp_path)
    ctx.config.lipschitz.n_samples = 2
    ctx.config.lipschitz_gentle = ml_collections.ConfigDict(
        {"method": "lipschitz", **ctx.config.lipschitz.to_dict(), "lr": 1e-4})
    ctx.config.stages = ("pretrain", "lipschitz", "lipschitz_gentle")
    study.validate_config(ctx.config)
    assert ctx.method_config("lipschitz_gentle").lr == 1e-4
    plain, plain_params = study.method_stage(ctx, "lipschitz", base.params, base.base_dir)
    gentle, gentle_params = study.method_stage(ctx, "lipschitz_gentle", base.params,
                                               base.base_dir)
    assert (plain["method"], gentle["method"]) == ("lipschitz", "lipschitz_gentle")
    rdir = ctx.run_dir("lipschitz_gentle")
    assert rdir != ctx.run_dir("lipschitz") and os.path.basename(rdir).startswith(
        "lipschitz_gentle_")
    meta = checkpoints.read_metadata(rdir)
    assert (meta["method"], meta["variant"]) == ("lipschitz", "lipschitz_gentle")
    # a smaller learning rate moves the model less
    moved = lambda p: float(optax.global_norm(jax.tree.map(  # noqa: E731
        lambda a, b: a - b, p, base.params)))
    assert 0 < moved(gentle_params) < moved(plain_params)
    from PIL import Image

    portrait = str(tmp_path / "portrait.png")
    support = int(ctx.splits.support[0])
    Image.fromarray(np.asarray(base.ctx.dataset.source[support]["image"])).save(portrait)
    receipt = serve.serve_request(rdir, [portrait], str(tmp_path / "out"))
    assert receipt.method == "lipschitz"
    # a variant must name a registered method
    ctx.config.lipschitz_gentle.method = "lipshitz"
    with pytest.raises(ConfigError, match="config.lipschitz_gentle.method"):
        study.validate_config(ctx.config)
    with pytest.raises(ConfigError, match="unknown stages"):
        ctx.config.stages = ("pretrain", "nobody")
        study.validate_config(ctx.config)
    assert registry.resolve(ctx.config, "ssd")[0] == "ssd"
