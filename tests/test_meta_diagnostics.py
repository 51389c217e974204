"""MetaUnlearn: step-length options, held-out diagnostics, selection without the request."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oneshui_jax import checkpoints, losses, study
from oneshui_jax.errors import ConfigError
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.study import access, select
from oneshui_jax.unlearn import api
from oneshui_jax.unlearn.meta_unlearn import core as mu
from oneshui_jax.unlearn.meta_unlearn import diagnostics as meta_diagnostics
from oneshui_jax.unlearn.meta_unlearn import training as meta_train

MODEL = vit.ViTConfig.preset("vit_tiny_test", num_classes=6)


def _setup(n=4, seed=0, **cfg_kw):
    cfg = mu.Config(**{"compute_dtype": "float32", "hidden_size": 16, **cfg_kw})
    ml_cfg = meta_loss.MetaLossConfig.for_vit(MODEL, num_identities=8, task="multilabel",
                                              hidden_size=16)
    keys = jax.random.split(jax.random.key(seed), 6)
    theta = vit.init_params(MODEL, keys[0])
    phi = meta_loss.init_params(ml_cfg, keys[1])
    support = {"image": jax.random.uniform(keys[2], (n, 32, 32, 3), minval=-1, maxval=1),
               "label": (jax.random.uniform(keys[3], (n, 6)) > 0.5).astype(jnp.float32),
               "row": jnp.arange(n, dtype=jnp.int32), "mask": jnp.ones(n, bool)}

    def batches(key, k=2, b=5):
        ka, kb = jax.random.split(key)
        return {"image": jax.random.uniform(ka, (k, b, 32, 32, 3), minval=-1, maxval=1),
                "label": (jax.random.uniform(kb, (k, b, 6)) > 0.5).astype(jnp.float32),
                "mask": jnp.ones((k, b), bool).at[-1, -2:].set(False)}

    return cfg, ml_cfg, theta, phi, support, batches(keys[4]), batches(keys[5])


def _norm(tree):
    return float(optax.global_norm(tree))


def _diff(a, b):
    return jax.tree.map(lambda x, y: x - y, a, b)


# ---------------------------------------------------------------------------------------------
# The step


@pytest.mark.slow
def test_the_default_learned_step_is_the_reference_inner_step():
    cfg, ml_cfg, theta, phi, support, _, _ = _setup()
    ours = mu.learned_step(MODEL, ml_cfg, cfg, theta, phi, support, None)
    reference = mu.inner_step(MODEL, ml_cfg, cfg.meta_lr, theta, phi, support, None)
    assert checkpoints.params_hash(ours) == checkpoints.params_hash(reference)


def test_normalize_gives_the_step_its_relative_size_times_the_factor():
    cfg, ml_cfg, theta, phi, support, _, _ = _setup(step_control="normalize",
                                                    relative_step=2e-3)
    for scale in (1.0, 3.0):
        new = mu.learned_step(MODEL, ml_cfg, cfg, theta, phi, support, None, jnp.float32(scale))
        assert _norm(_diff(new, theta)) / _norm(theta) == pytest.approx(2e-3 * scale, rel=1e-3)


def test_task_ascent_adds_minus_lambda_times_the_task_loss_gradient():
    cfg, ml_cfg, theta, phi, support, _, _ = _setup(task_ascent=3.0)
    ours = mu.learned_gradient(MODEL, ml_cfg, cfg, theta, phi, support, None)
    meta = jax.grad(mu.support_loss, argnums=2)(MODEL, ml_cfg, theta, phi, support, None)

    def task(t):
        logits = vit.apply(MODEL, t, support["image"])[0]
        return losses.task_loss("multilabel", logits, support["label"], support["mask"])

    expected = jax.tree.map(lambda m, t: m - 3.0 * t, meta, jax.grad(task)(theta))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_request_step_uses_the_factor_only_when_step_length_is_controlled():
    for control, expected in (("none", 1.0), ("line_search", 2.5)):
        cfg, ml_cfg, theta, phi, support, _, _ = _setup(step_control=control)
        step = mu.make_unlearn_step(MODEL, ml_cfg, cfg)
        one = _norm(_diff(step(theta, phi, support, 1.0), theta))
        scaled = _norm(_diff(step(theta, phi, support, 2.5), theta))
        assert scaled == pytest.approx(expected * one, rel=1e-4)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="step_control"):
        mu.Config(step_control="bogus")
    with pytest.raises(ConfigError, match="validation_requests >= 1"):
        mu.Config(step_control="line_search", validation_requests=0)
    with pytest.raises(ConfigError, match="step_scales"):
        mu.Config(step_scales=(1.0, -1.0))
    with pytest.raises(ConfigError, match="requests_per_update"):
        mu.Config(requests_per_update=0)


# ---------------------------------------------------------------------------------------------
# Diagnostics and the line search


@pytest.mark.slow
def test_diagnostics_measure_the_step_on_the_request():
    cfg, ml_cfg, theta, phi, support, forget, val = _setup()
    out = meta_diagnostics.request_diagnostics(MODEL, ml_cfg, cfg, theta, phi, support, forget,
                                               val, None, jnp.float32(1.0))
    none = meta_diagnostics.outer_loss(MODEL, cfg, theta, theta, forget, val, None)
    theta_u = mu.learned_step(MODEL, ml_cfg, cfg, theta, phi, support, None)
    learned = meta_diagnostics.outer_loss(MODEL, cfg, theta_u, theta, forget, val, None)
    assert float(out["outer_none"]) == pytest.approx(float(none), rel=1e-6)
    assert float(out["outer_learned"]) == pytest.approx(float(learned), rel=1e-5)
    assert float(out["step_norm"]) == pytest.approx(_norm(_diff(theta_u, theta)), rel=1e-4)
    # the per-portrait gradients: each equals the gradient of that portrait alone
    single = jax.tree.map(lambda x: x[1:2], support)
    g1 = mu.learned_gradient(MODEL, ml_cfg, cfg, theta, phi, single, None)
    assert float(out["portrait_norms"][1]) == pytest.approx(_norm(g1), rel=1e-4)
    # the same scale on the line search gives the same objective
    grid = meta_diagnostics.scale_losses(MODEL, ml_cfg, cfg, theta, phi, support, forget, val,
                                         None, jnp.asarray([0.0, 1.0]))
    assert float(grid[0]) == pytest.approx(float(none), rel=1e-6)
    assert float(grid[1]) == pytest.approx(float(learned), rel=1e-5)


def test_a_pinned_softplus_gives_no_step_and_is_counted():
    cfg, ml_cfg, theta, phi, support, forget, val = _setup()
    phi = jax.tree.map(lambda x: x, phi)
    phi["output_block"]["linear"]["bias"] = jnp.full((1,), -200.0)  # Softplus pinned at 0
    phi["output_block"]["linear"]["kernel"] = jnp.zeros_like(
        phi["output_block"]["linear"]["kernel"])
    raw = meta_diagnostics.request_diagnostics(MODEL, ml_cfg, cfg, theta, phi, support, forget,
                                               val, None, jnp.float32(1.0))
    summary = meta_diagnostics.summarize([jax.device_get(raw)])
    assert summary["dead_share"] == 1.0
    assert summary["relative_step"] == pytest.approx(0.0, abs=1e-12)
    assert summary["reduction_learned"] == pytest.approx(0.0, abs=1e-6)


def test_summary_of_planted_requests():
    def raw(none, learned, ascent, norms, mask=None):
        norms = np.asarray(norms, float)
        return {"outer_none": none, "outer_learned": learned, "outer_ascent": ascent,
                "step_norm": 2.0, "theta_norm": 100.0, "portrait_norms": norms,
                "mask": np.ones(len(norms), bool) if mask is None else np.asarray(mask)}

    summary = meta_diagnostics.summarize([
        raw(1.0, 0.5, 0.8, [1.0, 1.0, 1e-9, 2.0]),
        raw(3.0, 3.5, 2.2, [3.0, 1.0, 99.0], mask=[True, True, False])])
    assert summary["reduction_learned"] == pytest.approx(1 - 4.0 / 4.0)
    assert summary["reduction_ascent"] == pytest.approx(1 - 3.0 / 4.0)
    assert summary["relative_step"] == pytest.approx(0.02)
    assert summary["dead_share"] == pytest.approx(1 / 6)  # the padded 99 is not a portrait
    assert summary["top_share"] == pytest.approx((2.0 / (4.0 + 1e-9) + 3.0 / 4.0) / 2)


def test_line_search_picks_the_best_of_its_candidates_on_a_planted_objective():
    scales = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    planted = np.asarray([5.0, 4.0, 3.0, 1.0, 2.0, 6.0])

    def losses_fn(theta, phi, s, f, v, r, grid):
        assert np.allclose(np.asarray(grid), scales)
        return jnp.asarray(planted * s)  # requests weigh differently; the argmin stays

    best, table = meta_train.line_search(losses_fn, None, None, [(1.0, 0, 0, 0), (2.0, 0, 0, 0)],
                                         scales)
    assert best == 2.0
    assert [r["outer_loss"] for r in table] == pytest.approx(list(planted * 1.5))
    # ties go to the shorter step; a flat objective keeps no step at all
    tied = np.asarray([3.0, 3.0, 1.0, 1.0, 2.0, 2.0])
    best, _ = meta_train.line_search(lambda *a: jnp.asarray(tied), None, None, [(0, 0, 0, 0)],
                                     scales)
    assert best == 1.0
    best, _ = meta_train.line_search(lambda *a: jnp.ones(6), None, None, [(0, 0, 0, 0)], scales)
    assert best == 0.0


# ---------------------------------------------------------------------------------------------
# Meta-training with held-out requests, on the small SynthFaces variant


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, synthfaces_tfds):
    import small_study

    config = small_study.config(synthfaces_tfds, str(tmp_path_factory.mktemp("diag")))
    config.model.name = "vit_tiny_test"
    config.train.epochs = 1
    config.meta_unlearn.hidden_size = 16
    config.meta_unlearn.num_identities_simulation = 20
    config.meta_unlearn.validation_requests = 1
    config.meta_unlearn.step_control = "line_search"
    config.meta_unlearn.step_scales = (0.0, 1.0, 4.0)
    return study.prepare(config)


@pytest.mark.slow
def test_held_out_requests_diagnose_and_search_and_averaged_updates_resume(ctx, tmp_path,
                                                                           monkeypatch):
    """Held-out identities stay out of meta-training and the request; every epoch records the
    diagnostics; the line search's pick is its best; ``requests_per_update`` = 2 updates once
    per two requests and resumes mid-epoch with an identical result."""
    cfg = dataclasses.replace(ctx.method_config("meta_unlearn"), requests_per_update=2)
    data = access.train_data(ctx)
    held = meta_train.validation_identities(data, cfg)
    assert len(held) == 20 and not set(held) & set(ctx.splits.forget)
    assert held == meta_train.validation_identities(data, cfg)  # reproducible
    assert meta_train.validation_identities(data, dataclasses.replace(
        cfg, validation_requests=0, step_control="none")) == ()
    # never more than a quarter of the identities outside the request
    assert len(meta_train.validation_identities(data, dataclasses.replace(
        cfg, validation_requests=50))) == int(0.25 * len(data.holdout_identities))

    seen, updates = [], []
    real_data, real_update = meta_train._request_data, mu.meta_update

    def spy(data, request, cfg, rows, rng, num_batches=None):
        seen.append(list(request.identities))
        return real_data(data, request, cfg, rows, rng, num_batches)

    def counting(c):
        fn = real_update(c)

        def wrapped(*a):
            updates.append(1)
            return fn(*a)
        return wrapped

    monkeypatch.setattr(meta_train, "_request_data", spy)
    monkeypatch.setattr(mu, "meta_update", counting)
    theta = vit.init_params(ctx.model_cfg, jax.random.key(0))
    ml_cfg = mu.meta_loss_config(ctx.model, cfg, len(data.train_identities))
    straight = meta_train.meta_train(ctx.model, theta, data, cfg, ml_cfg, jax.random.key(0))
    validation, training = seen[:1], seen[1:]
    assert set(validation[0]) == set(held)
    assert training and not set(held) & {i for r in training for i in r}
    requests = straight.history[0]["requests"]
    assert len(updates) == -(-requests // 2)  # one update per 2 requests
    for record in straight.history:
        assert set(meta_diagnostics.SUMMARY_FIELDS) <= set(record)
    assert set(meta_diagnostics.SUMMARY_FIELDS) <= set(straight.validation["initial"])
    assert [r["scale"] for r in straight.line_search] == [0.0, 1.0, 4.0]
    best = min(straight.line_search, key=lambda r: r["outer_loss"])
    assert straight.step_scale == best["scale"]

    monkeypatch.setattr(meta_train, "_request_data", real_data)
    real_grad = mu.meta_grad
    calls = []

    def dying(*args, **kwargs):
        fn = real_grad(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 4:  # mid-group after a save at request 2
                raise KeyboardInterrupt
            return fn(*a)
        return wrapped

    monkeypatch.setattr(mu, "meta_grad", dying)
    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt, pytest.raises(KeyboardInterrupt):
        meta_train.meta_train(ctx.model, theta, access.train_data(ctx, ckpt), cfg, ml_cfg,
                              jax.random.key(0), checkpoint_every=2)
    monkeypatch.setattr(mu, "meta_grad", real_grad)
    with checkpoints.TrainCheckpointer(str(tmp_path)) as ckpt:
        resumed = meta_train.meta_train(ctx.model, theta, access.train_data(ctx, ckpt), cfg,
                                        ml_cfg, jax.random.key(0), checkpoint_every=2)
    assert checkpoints.params_hash(resumed.phi) == checkpoints.params_hash(straight.phi)
    assert resumed.step_scale == straight.step_scale
    # the diagnostics too (the epoch's mean training loss covers the requests after the resume)
    strip = lambda h: [{k: v for k, v in r.items() if k != "outer_loss"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)


# ---------------------------------------------------------------------------------------------
# Selection


@pytest.mark.slow
def test_selection_never_reads_a_request_identity_and_picks_the_lowest(ctx, monkeypatch,
                                                                       tmp_path):
    config = ctx.config.copy_and_resolve_references()
    config.meta_unlearn.epochs = 1
    reference = "step_control=none,task_ascent=0"  # the config's base is a variant
    # The second reference candidate differs in the meta-loss's learning rate, which the
    # compiled steps do not read (meta_unlearn.compile_key): it reuses the first's compilation.
    config.selection.meta_unlearn = (reference, f"lr=0.01,{reference}",
                                     "step_control=line_search")
    forget_images = set(np.asarray(ctx.images["forget"]).tolist())
    forget_images |= set(np.asarray(ctx.images["support"]).tolist())
    real_get = api.GuardedSource.__getitem__
    read = set()

    def spy(self, index):
        read.add(int(index))
        return real_get(self, index)

    monkeypatch.setattr(api.GuardedSource, "__getitem__", spy)
    result = select.select(config, str(tmp_path / "selection"))
    assert read and not read & forget_images
    scores = {r["candidate"]: r["outer"] for r in result["meta_unlearn"]}
    assert result["best"] == min(scores, key=scores.get)
    reference = {k: v for k, v in scores.items() if "line_search" not in k}
    assert result["best_reference"] == min(reference, key=reference.get)
    assert [r["family"] for r in result["meta_unlearn"]] == ["reference", "reference", "variant"]
    assert result["support_ascent"]["alpha"] in config.support_ascent.alphas
    paths = select.write(result, str(tmp_path))
    text = open(paths["selection.md"]).read()
    assert result["overrides"] in text and os.path.exists(paths["selection.json"])
    # a rerun reuses every finished candidate: no meta-training, the same table
    from oneshui_jax.unlearn import meta_unlearn

    monkeypatch.setattr(meta_unlearn, "prepare", lambda *a, **k: pytest.fail("meta-trained"))
    again = select.select(config, str(tmp_path / "selection"))
    assert [r["outer"] for r in again["meta_unlearn"]] == [r["outer"] for r in
                                                           result["meta_unlearn"]]


def test_selection_candidates_are_checked_before_any_work(ctx):
    config = ctx.config.copy_and_resolve_references()
    config.selection.meta_unlearn = ("meta_lr=1e-3", "step_control=sideways")
    with pytest.raises(ConfigError, match="step_control"):
        select.candidate_configs(config, "multilabel")
    config.selection.meta_unlearn = ("meta_lr",)
    with pytest.raises(ConfigError, match="key=value"):
        select.candidate_configs(config, "multilabel")
    config.selection.meta_unlearn = ("bogus=1",)
    with pytest.raises(ConfigError, match="unknown settings"):
        select.candidate_configs(config, "multilabel")


def test_select_refuses_an_unwritable_out_before_any_work(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "oneshui_jax.select",
                           f"--out={blocker}/selection"], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: --out {blocker}/selection: {blocker} is a file, "
                                   "not a folder")


def test_report_plots_the_diagnostics_only_when_a_run_has_them(tmp_path):
    from oneshui_jax import report

    fields = dict.fromkeys(meta_diagnostics.SUMMARY_FIELDS, 0.1)
    with_diag = {"method": "meta_unlearn", "dataset": "synthfaces", "num_identities": 10,
                 "seed": 0, "prepare": {"meta_history": [{"epoch": 0, **fields},
                                                         {"epoch": 1, **fields}],
                                        "validation": {"initial": fields}}}
    without = {**with_diag, "prepare": {"meta_history": [{"epoch": 0, "outer_loss": 0.1}]}}
    assert report.meta_diagnostics_figure([without]) is None
    fig = report.meta_diagnostics_figure([with_diag, without])
    lines = fig.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines[:2]] == [[-1, 0, 1], [-1, 0, 1]]
