"""Benchmark: images/s of the jit-compiled pretrain/retrain step (SGD + momentum, BCE).

    python bench/train_throughput.py --model vit_base_patch16_224 --batch 128 --dtype bfloat16

Prints a table and writes JSON (``--out``). Synthetic inputs: this measures the step, not the
input pipeline. The reference-style PyTorch number comes from ../shared/anchors, run on the same
card in the same call.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import optim
from oneshui_jax import train as train_lib
from oneshui_jax.models import vit


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_demo")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--num_classes", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench_out/train_throughput.json")
    args = parser.parse_args()
    overrides = {"num_classes": args.num_classes}
    if args.image_size:
        overrides["image_size"] = args.image_size
    cfg = vit.ViTConfig.preset(args.model, **overrides)
    tcfg = train_lib.TrainConfig(task="multilabel", compute_dtype=args.dtype)
    tx = optim.sgd(1e-4)
    params = vit.init_params(cfg, jax.random.key(0))
    opt_state = tx.init(params)
    step = train_lib.make_train_step(cfg, tcfg, tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (args.batch, cfg.image_size, cfg.image_size, 3)),
                             jnp.float32),
        "label": jnp.asarray(rng.integers(0, 2, (args.batch, args.num_classes)), jnp.uint8),
        "mask": jnp.ones(args.batch, bool),
    }
    lr = jnp.float32(1e-3)
    t0 = time.perf_counter()
    params, opt_state, out = step(params, opt_state, batch, lr)
    out["loss"].block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        params, opt_state, out = step(params, opt_state, batch, lr)
    out["loss"].block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, out = step(params, opt_state, batch, lr)
    out["loss"].block_until_ready()
    seconds = (time.perf_counter() - t0) / args.steps
    result = {"model": args.model, "image_size": cfg.image_size, "batch": args.batch,
              "dtype": args.dtype, "images_per_s": args.batch / seconds,
              "step_ms": seconds * 1e3, "compile_s": compile_s,
              "params": vit.count_params(params), "device": str(jax.devices()[0].device_kind),
              "jax": jax.__version__}
    print("| model | device | batch | dtype | images/s | step ms | compile s |")
    print("|---|---|---:|---|---:|---:|---:|")
    print(f"| {args.model}@{cfg.image_size} | {result['device']} | {args.batch} | {args.dtype} | "
          f"{result['images_per_s']:.0f} | {result['step_ms']:.1f} | {compile_s:.1f} |")
    import os
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
