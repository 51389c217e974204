"""Benchmark: K ensemble members trained in one compiled program vs one model at a time.

    python bench/ensemble.py --model vit_small_demo --members 1,4,8,16 --batch 32

For each K, ``ensemble.ensemble_step`` (the training step of ``train.py`` mapped over K members)
runs ``--steps`` steps on K batches at once; the images/s count every member's images. The
speed-up is that rate over one model's (K = 1, ``train.make_train_step``): K members trained one
after another would run at the single model's rate, so a speed-up of S means the ensemble takes
K / S of the time. The design target on a GPU for SynthFaces-sized models: K = 16 at >= 8x.
Prints a table and writes JSON (``--out``).
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import ensemble, optim
from oneshui_jax import train as train_lib
from oneshui_jax.models import vit


def _batch(cfg, batch_size, rng, members=None):
    shape = (batch_size,) if members is None else (members, batch_size)
    return {"image": jnp.asarray(rng.uniform(-1, 1, (*shape, cfg.image_size, cfg.image_size, 3)),
                                 jnp.float32),
            "label": jnp.asarray(rng.integers(0, 2, (*shape, cfg.num_classes)), jnp.float32),
            "mask": jnp.ones(shape, bool)}


def _time(step, params, opt_state, batch, steps):
    lr = jnp.float32(1e-3)
    t0 = time.perf_counter()
    params, opt_state, out = step(params, opt_state, batch, lr)
    jax.block_until_ready(out["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        params, opt_state, out = step(params, opt_state, batch, lr)
    jax.block_until_ready(out["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, out = step(params, opt_state, batch, lr)
    jax.block_until_ready(out["loss"])
    return (time.perf_counter() - t0) / steps, compile_s


def measure(cfg, tcfg, members, batch_size, steps):
    rng = np.random.default_rng(0)
    if members == 1:
        tx = optim.make(tcfg.optimizer, tcfg.weight_decay, tcfg.momentum)
        params = vit.init_params(cfg, jax.random.key(0))
        step = train_lib.make_train_step(cfg, tcfg, tx)
        seconds, compile_s = _time(step, params, tx.init(params), _batch(cfg, batch_size, rng),
                                   steps)
    else:
        tx, step = ensemble.ensemble_step(cfg, tcfg)
        params = ensemble.stack([vit.init_params(cfg, jax.random.key(k)) for k in range(members)])
        seconds, compile_s = _time(step, params, jax.vmap(tx.init)(params),
                                   _batch(cfg, batch_size, rng, members), steps)
    return {"members": members, "images_per_s": members * batch_size / seconds,
            "step_ms": 1e3 * seconds, "compile_s": compile_s}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_demo")
    parser.add_argument("--members", default="1,4,8,16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="bench_out/ensemble.json")
    args = parser.parse_args(argv)
    cfg = vit.ViTConfig.preset(args.model, num_classes=40)
    tcfg = train_lib.TrainConfig(task="multilabel", compute_dtype=args.dtype, epochs=1,
                                 batch_size=1, lr=1.0, warmup_epochs=0)
    counts = sorted({1, *(int(m) for m in args.members.split(","))})
    rows = [measure(cfg, tcfg, m, args.batch, args.steps) for m in counts]
    single = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_one_at_a_time"] = row["images_per_s"] / single
    device = jax.devices()[0]
    result = {"model": args.model, "batch": args.batch, "dtype": args.dtype,
              "device": getattr(device, "device_kind", str(device)),
              "backend": jax.default_backend(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "jax": jax.__version__, "rows": rows}
    print(f"{args.model}, batch {args.batch} per member, {args.dtype}, {result['device']}:")
    print("| members | images/s (all members) | step ms | speed-up vs one at a time | "
          "compile s |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['members']} | {row['images_per_s']:,.0f} | {row['step_ms']:.1f} | "
              f"{row['speedup_vs_one_at_a_time']:.2f}x | {row['compile_s']:.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
