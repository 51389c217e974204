"""Runs a small SynthFaces pretrain and a MetaUnlearn meta-training epoch on one device and on
a mesh of every (CPU) device, and prints one JSON line with what ``tests/test_sharding.py``
checks: parameter differences, the shardings the steps saw, evaluation results.

Run in its own process, since the device count is fixed when JAX starts::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py TFDS ROOT
"""

import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_study  # noqa: E402

from oneshui_jax import checkpoints, sharding, study  # noqa: E402
from oneshui_jax import train as train_lib  # noqa: E402
from oneshui_jax.unlearn import api  # noqa: E402
from oneshui_jax.unlearn import meta_unlearn as mu  # noqa: E402
from oneshui_jax.unlearn.meta_unlearn import training as meta_train  # noqa: E402


def describe(x) -> dict:
    """The sharding of one array: its mesh size and the spec along each dimension."""
    if not isinstance(x, jax.Array):
        return {"devices": 0, "spec": [], "replicated": False}  # a host array: placed by jit
    s = x.sharding
    spec = list(getattr(s, "spec", ()))
    return {"devices": len(s.device_set),
            "spec": [None if p is None else str(p) for p in spec],
            "replicated": bool(s.is_fully_replicated)}


def run(tfds_dir: str, root: str, mesh: int) -> dict:
    config = small_study.config(tfds_dir, os.path.join(root, f"mesh{mesh}"), epochs=1)
    config.mesh.data = mesh
    config.model.name = "vit_tiny_test"  # what is checked is the sharding, not the model
    config.train.batch_size = 32
    config.train.compute_dtype = "float32"  # a tolerance that float32 reassociation meets
    config.data.eval_batch_size = 64
    config.meta_unlearn.batch_size = 256  # one outer batch per request: one compilation
    config.meta_unlearn.num_identities_simulation = 50  # 2 requests of 50 identities
    config.meta_unlearn.validation_requests = 0
    config.meta_unlearn.step_control = "none"
    seen: dict = {}
    real_step = train_lib.make_train_step

    def spying_step(model_cfg, cfg, tx):
        step = real_step(model_cfg, cfg, tx)

        def spy(params, opt_state, batch, lr):
            seen.setdefault("train_batch", describe(batch["image"]))
            seen.setdefault("train_params", describe(jax.tree.leaves(params)[0]))
            return step(params, opt_state, batch, lr)
        return spy

    train_lib.make_train_step = spying_step
    train_lib._cached_train_step.cache_clear()
    start = time.perf_counter()
    ctx = study.prepare(config)
    record, params = study.train_stage(ctx, "pretrain", study.initial_params(ctx))
    _, reused = study.train_stage(ctx, "pretrain", study.initial_params(ctx))
    seen["reused_params"] = describe(jax.tree.leaves(reused)[0])
    print(f"mesh {mesh}: pretrain {time.perf_counter() - start:.1f} s", file=sys.stderr)
    start = time.perf_counter()

    real_request = meta_train._request_data

    def spying_request(*args):
        out = real_request(*args)
        seen.setdefault("forget_batch", describe(out[1]["image"]))
        return out

    meta_train._request_data = spying_request
    cfg = ctx.method_config("meta_unlearn")
    ml_cfg = mu.meta_loss_config(ctx.model, cfg, len(ctx.splits.train))
    from oneshui_jax.study import access

    data = access.prepare_data(ctx, api.STATS, None)
    result = meta_train.meta_train(ctx.model, params, data, cfg, ml_cfg,
                                   jax.random.key(config.seed))
    meta_train._request_data = real_request
    print(f"mesh {mesh}: meta-train {time.perf_counter() - start:.1f} s", file=sys.stderr)
    train_lib.make_train_step = real_step
    return {"mesh": sharding.size(), "seen": seen,
            "params": jax.tree.map(np.asarray, jax.device_get(params)),
            "phi": jax.tree.map(np.asarray, jax.device_get(result.phi)),
            "val_metric": record["val"]["metric"], "test_metric": record["test"]["metric"],
            "hash": checkpoints.params_hash(params)}


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main(tfds_dir: str, root: str) -> None:
    one = run(tfds_dir, root, 1)
    many = run(tfds_dir, root, -1)
    print(json.dumps({
        "devices": jax.device_count(), "mesh": many["mesh"], "seen": many["seen"],
        "seen_one": one["seen"],
        "params_max_diff": max_difference(one["params"], many["params"]),
        "phi_max_diff": max_difference(one["phi"], many["phi"]),
        "params_max_abs": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(one["params"])),
        "val_metric": [one["val_metric"], many["val_metric"]],
        "test_metric": [one["test_metric"], many["test_metric"]],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
