"""The request path of serving (issue 18, item 3): no re-tracing, the fused request step, the
device checksum of parameters (``serve.digest.params_digest``).

Small synthetic models, no study: an :class:`serve.Engine` is built from its parts. Traces and
compilations are counted with ``jax.monitoring`` (the events JAX records while tracing a
function and while compiling it), so any function on the path that traces again is caught.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import suite_settings

from oneshui_jax import checkpoints, serve
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.serve import digest as digest_lib
from oneshui_jax.unlearn import api, support_ascent
from oneshui_jax.unlearn.meta_unlearn import core as mu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = vit.ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                      num_classes=5)
TRAIN_IDS = (11, 12, 13, 14)
TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"
# A program loaded from the persistent compilation cache (the suite's, tests/suite_settings.py)
# was compiled by another test or process: it counts as this process compiling it.
CACHE_HIT = "/jax/compilation_cache/cache_retrieval_time_sec"


# --------------------------------------------------------------------------------------------
# The digest


def _tree():
    rng = np.random.default_rng(0)
    return {"blocks": [{"w": rng.normal(size=(3, 4)).astype(np.float32),
                        "b": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16)},
                       {"w": rng.normal(size=(3, 4)).astype(np.float32),
                        "b": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16)}],
            "count": np.arange(7, dtype=np.int32), "small": np.arange(-3, 3, dtype=np.int8),
            "u16": np.arange(5, dtype=np.uint16), "mask": np.array([True, False, True])}


def _np_fmix(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _np_digest(tree) -> str:
    """The digest written out in numpy (the algorithm pinned: equal words on any device)."""
    keys = np.array([0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1], np.uint32)
    odd = np.array([0xCC9E2D51, 0x1B873593, 0x7FEB352D, 0x846CA68B], np.uint32)
    leaves = sorted(checkpoints.named_leaves(tree), key=lambda item: item[0])
    out = np.zeros(4, np.uint32)
    with np.errstate(over="ignore"):
        for index, (name, leaf) in enumerate(leaves):
            leaf = np.asarray(leaf)
            text = f"{index}|{name}|{leaf.dtype.name}|{tuple(leaf.shape)}".encode()
            seed = np.uint32(int.from_bytes(hashlib.sha256(text).digest()[:4], "little"))
            unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[leaf.dtype.itemsize]
            words = leaf.reshape(-1).view(unsigned).astype(np.uint32)
            position = _np_fmix(np.arange(words.size, dtype=np.uint32) * np.uint32(0x9E3779B1)
                                + seed)
            lane_position = _np_fmix(position[:, None] ^ keys)
            lanes = _np_fmix((words[:, None] ^ lane_position) * odd + keys).sum(
                axis=0, dtype=np.uint32)
            out = out + _np_fmix(lanes ^ _np_fmix(keys + seed))
        out = _np_fmix(out ^ np.uint32(len(leaves)))
    return "".join(f"{int(w):08x}" for w in out)


def test_digest_is_the_written_out_algorithm_and_deterministic():
    tree = _tree()
    words = digest_lib.params_digest(tree)
    assert words.dtype == jnp.uint32 and words.shape == (digest_lib.DIGEST_WORDS,)
    expected = _np_digest(tree)
    assert digest_lib.params_digest_hex(tree) == expected
    assert digest_lib.params_digest_hex(jax.device_put(tree)) == expected  # numpy or device
    assert digest_lib.params_digest_hex(jax.tree.map(np.copy, tree)) == expected  # a copy
    assert digest_lib.params_digest_hex(tree) == expected  # again
    assert len(expected) == 32 and expected != "0" * 32


def _leaf_paths(tree):
    return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _replace(tree, path, value):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [value if p == path else leaf
                                                  for p, leaf in flat])


def _leaf(tree, path):
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])[path]


def _one_ulp(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` with element ``k`` moved by one unit in the last place (or by 1, or negated)."""
    y = x.copy().reshape(-1)
    if y.dtype == np.bool_:
        y[k] = not y[k]
    elif np.issubdtype(y.dtype, np.integer):
        y[k] += 1
    else:
        y[k] = np.nextafter(y[k], np.asarray(np.inf, y.dtype))
    return y.reshape(x.shape)


def test_any_small_change_changes_the_digest():
    tree = _tree()
    base = digest_lib.params_digest_hex(tree)
    seen = {base}
    for path in _leaf_paths(tree):
        leaf = _leaf(tree, path)
        for k in (0, leaf.size - 1):  # one element, one ulp, of every leaf
            changed = digest_lib.params_digest_hex(_replace(tree, path, _one_ulp(leaf, k)))
            assert changed != base, (path, k)
            seen.add(changed)
        flat = leaf.reshape(-1)
        i, j = 0, int(np.flatnonzero(flat != flat[0])[0])  # two different elements swapped
        swapped = flat.copy()
        swapped[[i, j]] = swapped[[j, i]]
        digest = digest_lib.params_digest_hex(_replace(tree, path, swapped.reshape(leaf.shape)))
        assert digest != base, path
        seen.add(digest)
    # same-shaped leaves swapped, a leaf renamed, a leaf reshaped, a dtype changed
    swapped = {**tree, "blocks": [tree["blocks"][1], tree["blocks"][0]]}
    renamed = {**{k: v for k, v in tree.items() if k != "count"}, "counts": tree["count"]}
    reshaped = {**tree, "u16": tree["u16"].reshape(5, 1)}
    retyped = {**tree, "count": tree["count"].view(np.float32)}
    for other in (swapped, renamed, reshaped, retyped):
        seen.add(digest_lib.params_digest_hex(other))
    assert len(seen) == 1 + 3 * len(_leaf_paths(tree)) + 4  # all different
    # -0.0 and 0.0 are different bits: the digest is of bits, as the sha256 is of bytes
    zeros = {"x": np.zeros(3, np.float32)}
    assert digest_lib.params_digest_hex(zeros) != digest_lib.params_digest_hex(
        {"x": -zeros["x"]})


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from oneshui_jax.serve import digest as digest_lib
    rng = np.random.default_rng(1)
    tree = {"w": rng.normal(size=(8, 6)).astype(np.float32), "b": np.arange(12, dtype=np.int32),
            "s": np.float32(3.5)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    split = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P("data")),
             "s": NamedSharding(mesh, P())}
    placed = {
        "host": tree,
        "device0": jax.device_put(tree, jax.devices()[0]),
        "device3": jax.device_put(tree, jax.devices()[3]),
        "replicated": jax.device_put(tree, NamedSharding(mesh, P())),
        "sharded": jax.device_put(tree, split),
    }
    print(json.dumps({"devices": jax.device_count(),
                      **{k: digest_lib.params_digest_hex(v) for k, v in placed.items()}}))
""")


def test_digest_is_independent_of_sharding_and_placement():
    env = suite_settings.subprocess_env(("--xla_force_host_platform_device_count=4",))
    proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("devices") == 4
    rng = np.random.default_rng(1)
    tree = {"w": rng.normal(size=(8, 6)).astype(np.float32), "b": np.arange(12, dtype=np.int32),
            "s": np.float32(3.5)}
    assert set(result.values()) == {_np_digest(tree)}, result


# --------------------------------------------------------------------------------------------
# The fused request step


def _meta_setup(**cfg_kw):
    cfg = mu.Config(task="multilabel", meta_lr=0.5, hidden_size=16, **cfg_kw)
    ml_cfg = mu.meta_loss_config(api.Model(MODEL, "multilabel"), cfg, len(TRAIN_IDS))
    theta = vit.init_params(MODEL, jax.random.key(0))
    artifacts = {"phi": meta_loss.init_params(ml_cfg, jax.random.key(1)),
                 "train_identities": np.asarray(TRAIN_IDS, np.int32),
                 "step_scale": np.asarray(2.0, np.float32)}
    return ml_cfg, cfg, theta, artifacts


def _request(n: int, seed: int = 0) -> api.Request:
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, (n, MODEL.num_classes)), jnp.uint8)
    return api.Request(images, labels, tuple(TRAIN_IDS[k % 4] for k in range(n)))


def _close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


@pytest.mark.slow
def test_fused_request_equals_the_steps_one_by_one():
    """Two forget steps (a loop in the program), the retain step and the step scale."""
    ml_cfg, cfg, theta, artifacts = _meta_setup(forget_epochs=2, step_control="line_search")
    artifacts["phi_retain"] = meta_loss.init_params(ml_cfg, jax.random.key(2))
    request = _request(3)
    new, info = mu.unlearn(api.Model(MODEL, "multilabel"), theta, artifacts, request, cfg,
                           jax.random.key(0))
    support = {"image": request.images, "label": request.labels,
               "row": jnp.asarray([TRAIN_IDS.index(i) for i in request.identities]),
               "mask": jnp.ones(3, bool)}
    expected = mu.apply_steps(mu.make_unlearn_step(MODEL, ml_cfg, cfg), theta, artifacts["phi"],
                              support, cfg.forget_epochs, artifacts["phi_retain"], 2.0,
                              mu.make_unlearn_step(MODEL, ml_cfg, mu.retain_config(cfg)))
    _close(new, expected)
    assert info == {"steps": cfg.forget_epochs + 1, "step_scale": 2.0}
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new),
                                                           jax.tree.leaves(theta), strict=True))
    assert moved > 1e-4


def test_donation_only_when_asked():
    ml_cfg, cfg, theta, artifacts = _meta_setup()
    request = _request(2)
    args = (artifacts["phi"], None, request.images, request.labels, jnp.asarray([0, 1]),
            jnp.float32(1.0))
    kept = jax.device_put(theta)
    expected = mu.request_step(MODEL, ml_cfg, cfg, False)(kept, *args)
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))
    owned = jax.tree.map(jnp.copy, kept)
    donated = mu.request_step(MODEL, ml_cfg, cfg, False, donate=True)(owned, *args)
    _close(donated, expected)
    if jax.default_backend() in ("cpu", "gpu", "tpu"):  # every backend here implements it
        assert all(x.is_deleted() for x in jax.tree.leaves(owned))


# --------------------------------------------------------------------------------------------
# No re-tracing


@contextlib.contextmanager
def counting():
    """Counts the traces and backend compilations (or loads from the persistent compilation
    cache) JAX records inside the block."""
    counts = {TRACE: 0, COMPILE: 0}

    def listener(event, duration_secs, **kwargs):
        event = COMPILE if event == CACHE_HIT else event
        if event in counts:
            counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _engine(method: str, module, cfg, artifacts, theta) -> serve.Engine:
    return serve.Engine(api.Model(MODEL, "multilabel"), theta, method, module, cfg, artifacts,
                        TRAIN_IDS)


def _portraits(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + k, 18, 3), dtype=np.uint8) for k in range(n)]


@pytest.mark.parametrize("method", ["meta_unlearn", "support_ascent"])
def test_served_requests_of_a_seen_size_do_not_trace_again(method):
    if method == "meta_unlearn":
        _, cfg, theta, artifacts = _meta_setup()
        module, ids = mu, [TRAIN_IDS[1], TRAIN_IDS[2], TRAIN_IDS[3]]
    else:
        cfg, module, ids = support_ascent.Config(task="multilabel"), support_ascent, None
        theta = vit.init_params(MODEL, jax.random.key(0))
        artifacts = {"alpha": np.asarray(0.5, np.float32)}
    engine = _engine(method, module, cfg, artifacts, theta)
    before = engine.params_digest
    with counting() as first:
        new, timings = engine.forget(_portraits(3), ids)
    assert first[TRACE] > 0 and first[COMPILE] > 0 and timings["compile_s"] > 0
    digests = {timings["params_digest"]}
    with counting() as again:  # the same size, other portraits: compiled code only
        for seed in (1, 2, 3):
            _, timings = engine.forget(_portraits(3, seed), ids)
            assert timings["compile_s"] == 0
            digests.add(timings["params_digest"])
    assert again == {TRACE: 0, COMPILE: 0}
    assert len(digests) == 4  # other portraits, another model
    assert timings["params_digest"] == digest_lib.params_digest_hex(
        engine.forget(_portraits(3, 3), ids)[0])
    assert set(timings) >= {"h2d_s", "compute_s", "digest_s", "prepare_s"}
    # the engine is pure: its parameters are untouched (not donated, not changed)
    assert not any(x.is_deleted() for x in jax.tree.leaves(engine.params))
    assert digest_lib.params_digest_hex(engine.params) == before == _np_digest(
        jax.device_get(theta))
    with counting() as other:  # a new size compiles once, then not again
        engine.forget(_portraits(2), ids if ids is None else ids[:2])
        engine.forget(_portraits(2, 1), ids if ids is None else ids[:2])
    assert other[COMPILE] > 0
    with counting() as third:
        engine.forget(_portraits(2, 2), ids if ids is None else ids[:2])
    assert third == {TRACE: 0, COMPILE: 0}


@pytest.mark.slow
def test_meta_unlearn_compiles_one_request_step_per_size():
    ml_cfg, cfg, theta, artifacts = _meta_setup(forget_epochs=2)
    model = api.Model(MODEL, "multilabel")
    mu.clear_compiled()
    for n in (3, 3, 3, 1, 1, 3):
        mu.unlearn(model, theta, artifacts, _request(n, seed=n), cfg, jax.random.key(0))
    step = mu.request_step(MODEL, ml_cfg, cfg, False)
    assert step._cache_size() == 2  # one per request size
    # configs that differ only in what the step does not read share it
    other = dataclasses.replace(cfg, epochs=7, lr=0.5)
    assert mu.request_step(MODEL, ml_cfg, other, False) is step
    assert mu.request_step(MODEL, ml_cfg, dataclasses.replace(cfg, forget_epochs=1),
                           False) is not step
