"""The method API (``unlearn/api.py``) and its data-access contract, enforced by the study.

A small SynthFaces study (pretrain, one epoch) is built once; methods run on it through the
study's own stage code (``study.method_stage``), with throwaway methods that try to read what
they may not.
"""

import dataclasses
import os
import sys
import types

import doubles
import jax
import jax.numpy as jnp
import method_stages
import numpy as np
import pytest

from oneshui_jax import checkpoints, losses, study
from oneshui_jax.errors import CheckpointError, ConfigError
from oneshui_jax.models import vit
from oneshui_jax.study import access
from oneshui_jax.unlearn import api, registry, support_ascent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))


@pytest.fixture(scope="module")
def base(small_study):
    return method_stages.load_base(small_study)


fresh_context = method_stages.fresh_context
_no_evaluation = method_stages.no_evaluation
forget_only = method_stages.forget_only


def test_guarded_source_refuses_what_was_not_granted():
    source = [{"image": np.zeros(1), "i": i} for i in range(5)]
    guarded = api.GuardedSource(source, np.array([1, 3]), "images 1 and 3")
    assert guarded[3]["i"] == 3 and len(guarded) == 5 and guarded.allows(1)
    for index in (0, 2, 4, 7, -1):
        with pytest.raises(api.AccessError, match="images 1 and 3"):
            guarded[index]


def test_train_data_holds_train_and_val_only(base):
    ctx = base.ctx
    data = access.train_data(ctx)
    allowed = {i for i in range(len(data.source)) if data.source.allows(i)}
    assert allowed == set(ctx.images["train"].tolist()) | set(ctx.images["val"].tolist())
    assert not allowed & set(ctx.images["test"].tolist())
    assert not allowed & set(ctx.splits.support)  # held out of training, as in pretraining
    assert not set(data.holdout_identities) & set(ctx.splits.forget)
    assert set(data.holdout_identities) | set(ctx.splits.forget) == set(ctx.splits.train)
    assert set(data.identity_images) == set(ctx.splits.train)
    assert set(np.unique(data.image_identities)) <= set(ctx.splits.train) | {-1}
    request = access.study_request(ctx)
    assert request.identities == tuple(int(ctx.dataset.annotations.identities[i])
                                       for i in ctx.splits.support)
    assert request.images.shape[0] == len(ctx.splits.support) == 5


def spy_module(access_level, log):
    """A throwaway method that records what it receives and tries to read a test image."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
        scale: float = 1.0

    def prepare(model, params, data, cfg, rng):
        log["prepare_data"] = data
        if data is not None:
            test_image = int(log["test_image"])
            try:
                data.source[test_image]
            except api.AccessError as e:
                log["refused"] = str(e)
        return {"w": jnp.ones(2)}, {"prepared": True}

    def unlearn(model, params, artifacts, request, cfg, rng, data=None):
        log.update(unlearn_data=data, request=request, artifacts=artifacts)
        return jax.tree.map(lambda p: p * cfg.scale, params), {"touched": 0}

    return types.SimpleNamespace(__name__="spy", ACCESS=access_level, Config=Config,
                                 prepare=prepare, unlearn=unlearn)


@pytest.mark.parametrize("level", [api.SUPPORT, api.STATS, api.FULL])
def test_each_call_receives_what_its_access_grants(base, tmp_path, monkeypatch, level):
    log = {"test_image": base.ctx.images["test"][0]}
    monkeypatch.setitem(registry.METHODS, "spy", spy_module(level, log))
    _no_evaluation(monkeypatch)
    ctx = fresh_context(base, tmp_path)
    record, params = study.method_stage(ctx, "spy", base.params, base.base_dir)
    assert record["access"] == level and record["prepare"]["prepared"]
    request = log["request"]
    assert request.images.shape[0] == len(ctx.splits.support)
    np.testing.assert_array_equal(np.asarray(log["artifacts"]["w"]), np.ones(2))
    if level == api.SUPPORT:
        assert log["prepare_data"] is None and log["unlearn_data"] is None
    else:
        assert isinstance(log["prepare_data"], api.TrainData)
        assert "TRAIN images" in log["refused"]  # the test split cannot be read
        assert log["prepare_data"].crop_scale == tuple(ctx.config.data.crop_scale)
    if level == api.FULL:
        data = log["unlearn_data"]
        assert isinstance(data, api.FullData)
        assert data.crop_scale == tuple(ctx.config.data.crop_scale)
        np.testing.assert_array_equal(data.forget_images, ctx.images["forget"])
        with pytest.raises(api.AccessError):
            data.source[int(ctx.images["test"][0])]
    else:
        assert log["unlearn_data"] is None
    metadata = checkpoints.read_metadata(ctx.run_dir("spy"))
    assert metadata["access"] == level and metadata["method_config"]["scale"] == 1.0
    assert checkpoints.load_tree(ctx.run_dir("spy"), checkpoints.ARTIFACTS_DIR)["w"].shape == (2,)
    # The training augmentation is part of what a method reading TRAIN images depends on.
    ctx.config.data.crop_scale = (1.0, 1.0)
    if level == api.SUPPORT:
        assert study.method_stage(ctx, "spy", base.params, base.base_dir)[0]["reused"]
    else:
        with pytest.raises(CheckpointError, match=r"data.crop_scale: \[.*\] -> \[1.0, 1.0\]"):
            study.method_stage(ctx, "spy", base.params, base.base_dir)


@pytest.mark.slow
def test_support_ascent_never_reads_forget_or_test_images(base, tmp_path, monkeypatch):
    """Selection uses held-out identities only; the request-time step reads the portraits."""
    _no_evaluation(monkeypatch)
    recording = doubles.Recording(base.ctx.dataset.source)
    ctx = fresh_context(base, tmp_path, recording)
    record, _ = study.method_stage(ctx, "support_ascent", base.params, base.base_dir)
    read = set(recording.read)
    assert read, "the selection read no image"
    assert not read & forget_only(ctx)
    assert not read & set(ctx.images["test"].tolist())
    not_portraits = sorted(read - set(ctx.splits.support))
    identities = set(ctx.dataset.annotations.identities[not_portraits].tolist())
    assert not identities & set(ctx.splits.forget)
    assert record["prepare"]["selection_requests"] == 2
    assert record["prepare"]["alpha"] in ctx.config.support_ascent.alphas


def test_unlearned_model_ignores_the_forget_images(base, tmp_path, monkeypatch):
    """Changing every forget image but the portraits changes nothing a stats method returns."""
    _no_evaluation(monkeypatch)
    forget = forget_only(base.ctx)

    class Scrambled(doubles.Recording):
        def __getitem__(self, index):
            record = self.source[index]
            if int(index) in forget:
                return {**record, "image": 255 - np.asarray(record["image"])}
            return record

    hashes = []
    for k, source in enumerate((base.ctx.dataset.source, Scrambled(base.ctx.dataset.source))):
        ctx = fresh_context(base, tmp_path / str(k), source)
        _, params = study.method_stage(ctx, "support_ascent", base.params, base.base_dir)
        hashes.append(checkpoints.params_hash(params))
    assert hashes[0] == hashes[1]


@pytest.mark.slow
def test_meta_unlearn_prepare_never_reads_test_or_support_images(base, tmp_path, monkeypatch):
    _no_evaluation(monkeypatch)
    recording = doubles.Recording(base.ctx.dataset.source)
    # The shared study's own MetaUnlearn settings: its compiled steps are reused, not rebuilt.
    ctx = fresh_context(base, tmp_path, recording)
    record, params = study.method_stage(ctx, "meta_unlearn", base.params, base.base_dir)
    read = set(recording.read)
    assert not read & set(ctx.images["test"].tolist())
    # the study reads the support images once to build the request; prepare never does
    support_reads = [i for i in recording.read if i in set(ctx.splits.support)]
    assert sorted(support_reads) == sorted(ctx.splits.support)
    assert checkpoints.params_hash(params) != checkpoints.params_hash(base.params)
    artifacts = checkpoints.load_tree(ctx.run_dir("meta_unlearn"), checkpoints.ARTIFACTS_DIR)
    assert np.asarray(artifacts["train_identities"]).tolist() == ctx.splits.train
    assert record["prepare"]["meta_history"][0]["requests"] > 0


# ---------------------------------------------------------------------------------------------
# support_ascent's step


def _tiny_model():
    cfg = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                        num_classes=3)
    model = api.Model(cfg, "multilabel")
    params = vit.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    request = api.Request(jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32),
                          jnp.asarray([[1, 0, 1], [0, 1, 1]], jnp.uint8), (4, 7))
    return model, params, request


def test_support_ascent_chooses_the_lowest_objective_and_the_shorter_step_on_ties():
    assert support_ascent.choose((0.0, 0.1, 0.3), [2.0, 1.5, 1.7]) == 1
    assert support_ascent.choose((0.3, 0.1, 0.0), [1.0, 1.0, 3.0]) == 1  # tie: the smaller α
    assert support_ascent.choose((0.0, 1.0), [0.5, 0.9]) == 0


def test_support_ascent_is_one_ascent_step_on_the_portraits():
    model, params, request = _tiny_model()
    cfg = support_ascent.Config()

    def task_loss(p):  # written out here, not through the method
        logits = vit.apply(model.vit, p, request.images)[0]
        y = request.labels.astype(jnp.float32)
        return jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-abs(logits))))

    task_loss = jax.jit(task_loss)
    grads = jax.jit(jax.grad(task_loss))(params)
    new, info = support_ascent.unlearn(model, params, {"alpha": np.float32(0.05)}, request,
                                       cfg, None)
    jax.tree.map(lambda n, p, g: np.testing.assert_allclose(n, p + 0.05 * g, atol=1e-6), new,
                 params, grads)
    assert info["alpha"] == pytest.approx(0.05) and task_loss(new) > task_loss(params)
    same, _ = support_ascent.unlearn(model, params, {"alpha": np.float32(0.0)}, request, cfg,
                                     None)
    assert checkpoints.params_hash(same) == checkpoints.params_hash(params)


@pytest.mark.slow
def test_selection_losses_are_the_outer_objective_after_each_step():
    model, params, request = _tiny_model()
    cfg = support_ascent.Config(compute_dtype="float32")
    rng = np.random.default_rng(1)
    support = {"image": request.images, "label": request.labels, "mask": jnp.ones(2, bool)}

    def batches():
        return {"image": jnp.asarray(rng.uniform(-1, 1, (2, 4, 16, 16, 3)), jnp.float32),
                "label": jnp.asarray(rng.integers(0, 2, (2, 4, 3)), jnp.uint8),
                "mask": jnp.asarray([[True] * 4, [True, True, False, False]])}

    forget, val = batches(), batches()
    alphas = jnp.asarray([0.0, 0.5])
    got = jax.jit(support_ascent.selection_losses, static_argnums=(0, 1))(
        model.vit, cfg, params, support, forget, val, alphas)
    grads = support_ascent.support_gradient(model.vit, "multilabel", params, support)
    for a, value in zip([0.0, 0.5], np.asarray(got), strict=True):
        theta_u = jax.tree.map(lambda p, g, a=a: p + a * g, params, grads)
        total = 0.0
        for k, weight in enumerate((4 / 6, 2 / 6)):
            run = lambda p, b, k=k: vit.apply(model.vit, p, b["image"][k])[0]
            total += weight * float(losses.forget_objective(
                "multilabel", "full", "smooth_l1", True, u_f=run(theta_u, forget),
                y_f=forget["label"][k], m_f=forget["mask"][k], u_v=run(theta_u, val),
                o_v=run(params, val), y_v=val["label"][k], m_v=val["mask"][k]))
        assert value == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Configs derived from the method's Config


def test_config_blocks_are_derived_and_validated():
    block = api.default_block(support_ascent)
    assert set(block) == {f.name for f in api.settings(support_ascent.Config)}
    assert "task" not in block
    cfg = api.make_config("support_ascent", support_ascent, block, task="classification")
    assert cfg.task == "classification" and cfg.alphas == support_ascent.Config().alphas
    with pytest.raises(ConfigError, match=r"'num_request' \(did you mean 'num_requests'\?\)"):
        api.make_config("support_ascent", support_ascent, {"num_request": 3}, task="multilabel")
    with pytest.raises(ConfigError, match="config.support_ascent.num_requests must be an integer"):
        api.make_config("support_ascent", support_ascent, {"num_requests": "3"},
                        task="multilabel")
    with pytest.raises(ConfigError, match="config.support_ascent.loss_type"):
        api.make_config("support_ascent", support_ascent, {"loss_type": "scrub"},
                        task="multilabel")
    from oneshui_jax.unlearn import meta_unlearn

    block, h = api.reference_block(meta_unlearn, "meta_unlearn", "mufac", 5)
    assert (block.epochs, block.lr, block.meta_lr, block.dropout) == (10, 1e-2, 1e-3, 0.5)
    assert h.tuned
    record = api.config_record(api.make_config("meta_unlearn", meta_unlearn, block,
                                               task="classification"))
    again = api.config_from_record("meta_unlearn", meta_unlearn, record)
    assert again.task == "classification" and again.lr == 1e-2


def test_request_batches_pad_the_last_batch_with_a_masked_repeat():
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
    labels = np.arange(5)
    request = api.Request(jnp.asarray(images), jnp.asarray(labels), (1, 1, 2, 2, 3))
    order = np.array([4, 0, 3, 1, 2])
    batches = api.request_batches(request, 2, order)
    assert [b["image"].shape[0] for b in batches] == [2, 2, 2]
    assert [np.asarray(b["mask"]).tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    got = np.concatenate([np.asarray(b["label"]) for b in batches])
    assert got.tolist() == [4, 0, 3, 1, 2, 2]  # the last batch repeats its first portrait
    np.testing.assert_array_equal(batches[1]["image"], images[[3, 1]])
    one = api.request_batches(request, 128)  # never padded beyond the request
    assert len(one) == 1 and one[0]["image"].shape[0] == 5 and bool(one[0]["mask"].all())
    np.testing.assert_array_equal(one[0]["image"], images)
    with pytest.raises(ValueError, match="batch_size"):
        api.request_batches(request, 0)


def test_registry_modules_declare_the_interface():
    for name, module in registry.METHODS.items():
        api.check_method(name, module)
    broken = types.SimpleNamespace(__name__="broken", ACCESS="everything", unlearn=None)
    with pytest.raises(TypeError, match="ACCESS must be one of"):
        api.check_method("broken", broken)
