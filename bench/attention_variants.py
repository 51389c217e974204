"""Benchmark: ViT train-step images/s under attention and batch variants (GPU exploration).

    python bench/attention_variants.py --model vit_base_patch16_224 --dtype bfloat16

Variants (``vit.ATTENTION_IMPLEMENTATIONS``, ``config.train.attention``): the plain-jnp
attention (``xla``; supports grad-of-grad, needed by MetaUnlearn) and cuDNN's fused kernel
(``cudnn``; first order only: pretrain, retrain, evaluation), each at the given batch sizes.
Prints a table and writes JSON.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import optim
from oneshui_jax import train as train_lib
from oneshui_jax.models import vit


def measure(cfg, attention, batch_size, dtype, steps):
    tcfg = train_lib.TrainConfig(task="multilabel", compute_dtype=dtype, attention=attention)
    tx = optim.sgd(1e-4)
    params = vit.init_params(cfg, jax.random.key(0))
    opt_state = tx.init(params)
    step = train_lib.make_train_step(cfg, tcfg, tx)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (batch_size, cfg.image_size,
                                                      cfg.image_size, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 2, (batch_size, cfg.num_classes)), jnp.uint8),
             "mask": jnp.ones(batch_size, bool)}
    lr = jnp.float32(1e-3)
    t0 = time.perf_counter()
    params, opt_state, out = step(params, opt_state, batch, lr)
    out["loss"].block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        params, opt_state, out = step(params, opt_state, batch, lr)
    out["loss"].block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, out = step(params, opt_state, batch, lr)
    out["loss"].block_until_ready()
    seconds = (time.perf_counter() - t0) / steps
    return {"images_per_s": batch_size / seconds, "step_ms": seconds * 1e3,
            "compile_s": compile_s, "loss": float(out["loss"])}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="128,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench_out/attention_variants.json")
    args = parser.parse_args()
    cfg = vit.ViTConfig.preset(args.model, num_classes=40)
    rows = []
    for name in vit.ATTENTION_IMPLEMENTATIONS:
        for batch_size in map(int, args.batches.split(",")):
            try:
                row = measure(cfg, name, batch_size, args.dtype, args.steps)
            except Exception as e:  # noqa: BLE001 (report and go on to the next variant)
                row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append({"attention": name, "batch": batch_size, **row})
            print(json.dumps(rows[-1]), flush=True)
    device = str(jax.devices()[0].device_kind)
    print(f"\n{args.model}, {args.dtype}, {device}")
    print("| attention | batch | images/s | step ms | compile s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['attention']} | {r['batch']} | {r['error']} | | |")
        else:
            print(f"| {r['attention']} | {r['batch']} | {r['images_per_s']:.0f} | "
                  f"{r['step_ms']:.1f} | {r['compile_s']:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
