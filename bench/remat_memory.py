"""Benchmark: what per-block rematerialisation (``jax.checkpoint``, ``remat``) saves and costs.

    python bench/remat_memory.py                      # ViT-B/16 at 224 compiled, small model timed
    python bench/remat_memory.py --skip_large         # only the timed small model

Two steps, each with and without ``remat`` (``config.train.remat``, ``config.meta_unlearn.remat``):

* the pretrain / retrain step (``train.make_train_step``: forward, backward, SGD update) on a batch
  of ``--train_batch`` images (the reference's 32);
* the MetaUnlearn meta-step (``meta_unlearn.make_meta_step``: the inner step on ``--support``
  portraits, float32, differentiated to second order; ``--outer_batches`` outer batches of
  ``--batch`` forget + ``--batch`` validation images in ``--dtype``, streamed; one AdamW(AMSGrad)
  step of the meta-loss). The defaults are the reference's largest request: 50 simulated
  identities (CelebA-HQ, N = 1 and N = 50; SPEC.md 6.6), batch 64, 40 labels.

For ViT-B/16 at 224 both are only lowered and compiled from ``jax.ShapeDtypeStruct`` inputs
(nothing is allocated or run); reported are XLA's ``memory_analysis()`` of the compiled step
(argument, output, alias, temp bytes; total = argument + output + temp - alias) and, independent
of the backend's scheduler, the residuals JAX keeps between forward and backward (the leaves of
``jax.vjp``'s pullback under ``jax.eval_shape``; parameters it references included): for the
train step those of its loss, for the meta-step those of the inner step's pullback (held while
the outer batches stream) plus those of one outer batch.

XLA:CPU's estimate is not the GPU's. On CPU the compiled step does contain the recomputation
(more dot products), but XLA:CPU's schedule does not keep each recomputed forward next to its
backward, so ``temp`` does not shrink (measured: it grows slightly); XLA:GPU schedules with the
optimisation barriers ``jax.checkpoint`` emits. The residual columns show what remat removes on
any backend.

The compute cost is XLA's FLOP count of each compiled step (``cost_analysis``; recomputation
included, independent of the machine's load), and is measured on ``--small_model`` (default
``vit_small_demo``, float32): the median wall and process-CPU time of ``--steps`` steps after one
warm-up step, with and without remat, the same shapes otherwise. Prints a table and writes JSON
to ``--out`` (default ``bench/results/remat_memory_<machine>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import optim
from oneshui_jax import train as train_lib
from oneshui_jax.losses import masked_mean, per_example_loss
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.unlearn.meta_unlearn import core as mu

GIB = 2**30
CARD_GB = 40  # the card the meta-step must fit (issue 17): 40 GB = 40e9 bytes
NUM_IDENTITIES = 1000  # rows of the meta-loss's identity embedding (bench/meta_step.py's)


def machine_name() -> str:
    """``cpu`` on CPUs, else the device kind's last word (``h100``, ``h200``)."""
    if jax.default_backend() == "cpu":
        return "cpu"
    return str(jax.devices()[0].device_kind).split()[-1].lower()


def _nbytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree``."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _batch(model_cfg: vit.ViTConfig, shape: tuple[int, ...], rows: bool, concrete: bool,
           seed: int = 0) -> dict[str, Any]:
    """A batch of ``shape`` images (multi-hot labels, mask, meta-loss rows if ``rows``): random
    arrays if ``concrete``, else ``ShapeDtypeStruct`` placeholders."""
    s, c = model_cfg.image_size, model_cfg.num_classes
    specs = {"image": ((*shape, s, s, 3), jnp.float32), "label": ((*shape, c), jnp.uint8),
             "mask": (shape, jnp.bool_)}
    if rows:
        specs["row"] = (shape, jnp.int32)
    if not concrete:
        return {k: jax.ShapeDtypeStruct(*v) for k, v in specs.items()}
    rng = np.random.default_rng(seed)
    out = {"image": jnp.asarray(rng.uniform(-1, 1, specs["image"][0]), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 2, specs["label"][0]), jnp.uint8),
           "mask": jnp.ones(shape, bool)}
    if rows:
        out["row"] = jnp.asarray(rng.integers(0, NUM_IDENTITIES, shape), jnp.int32)
    return out


def train_case(model_cfg, batch: int, dtype: str, remat: bool, concrete: bool):
    """``(jitted train step, its arguments, residual bytes of its loss)``."""
    cfg = train_lib.TrainConfig(task="multilabel", compute_dtype=dtype, remat=remat)
    tx = optim.make(cfg.optimizer, cfg.weight_decay, cfg.momentum)
    step = train_lib.make_train_step(model_cfg, cfg, tx)
    key = jax.random.key(0)
    if concrete:
        params = vit.init_params(model_cfg, key)
        opt_state = tx.init(params)
    else:
        params = jax.eval_shape(lambda k: vit.init_params(model_cfg, k), key)
        opt_state = jax.eval_shape(tx.init, params)
    data = _batch(model_cfg, (batch,), rows=False, concrete=concrete)

    def loss(p, b):
        logits, _ = vit.apply(model_cfg, p, b["image"], dtype=jnp.dtype(dtype), remat=remat)
        return masked_mean(per_example_loss("multilabel", logits, b["label"]), b["mask"])

    pullback = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], params, data)
    return step, (params, opt_state, data, jnp.float32(1e-3)), _nbytes(pullback)


def meta_case(model_cfg, support: int, outer_batches: int, batch: int, dtype: str, remat: bool,
              concrete: bool):
    """``(jitted meta-step, its arguments, residual bytes: inner pullback + one outer batch)``."""
    cfg = mu.Config(task="multilabel", batch_size=batch, compute_dtype=dtype, remat=remat)
    ml_cfg = meta_loss.MetaLossConfig.for_vit(model_cfg, num_identities=NUM_IDENTITIES,
                                              task="multilabel")
    tx = mu.optimizer(cfg)
    step = mu.make_meta_step(model_cfg, ml_cfg, cfg, tx)
    key = jax.random.key(0)
    init_theta = lambda k: vit.init_params(model_cfg, k)  # noqa: E731
    init_phi = lambda k: meta_loss.init_params(ml_cfg, k)  # noqa: E731
    if concrete:
        theta, phi = init_theta(jax.random.fold_in(key, 0)), init_phi(jax.random.fold_in(key, 1))
        opt_state = tx.init(phi)
    else:
        theta, phi = jax.eval_shape(init_theta, key), jax.eval_shape(init_phi, key)
        opt_state = jax.eval_shape(tx.init, phi)
        key = jax.eval_shape(lambda: jax.random.key(0))
    sup = _batch(model_cfg, (support,), rows=True, concrete=concrete, seed=1)
    forget = _batch(model_cfg, (outer_batches, batch), rows=False, concrete=concrete, seed=2)
    val = _batch(model_cfg, (outer_batches, batch), rows=False, concrete=concrete, seed=3)
    args = (theta, phi, opt_state, jnp.float32(cfg.lr), sup, forget, val, None, key)

    def inner_pullback(theta, phi, sup, rng):
        return jax.vjp(lambda p: mu.learned_step(model_cfg, ml_cfg, cfg, theta, p, sup, rng),
                       phi)[1]

    def outer_pullback(theta, forget, val):
        one = lambda b: jax.tree.map(lambda x: x[0], b)  # noqa: E731
        return jax.vjp(lambda t: mu.outer_batch_loss(model_cfg, cfg, t, theta, one(forget),
                                                     one(val)), theta)[1]

    residuals = (_nbytes(jax.eval_shape(inner_pullback, theta, phi, sup, key))
                 + _nbytes(jax.eval_shape(outer_pullback, theta, forget, val)))
    return step, args, residuals


def compiled_memory(step, args) -> dict[str, Any]:
    """Lowers and compiles ``step`` for ``args``: XLA's memory analysis, its FLOP count (the
    compute cost of remat, independent of the machine's load) and the compile time."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    out = {"compile_s": seconds}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])  # recomputation included
    if m is None:
        return {**out, "memory_analysis": "unavailable"}
    for name in ("argument", "output", "alias", "temp", "generated_code"):
        out[f"{name}_bytes"] = int(getattr(m, f"{name}_size_in_bytes", 0))
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                          - out["alias_bytes"])
    return out


def timed(step, args, steps: int, donates: bool) -> dict[str, float]:
    """Median wall and process-CPU seconds of ``steps`` calls after one warm-up call (fresh
    copies if ``donates``). CPU time (all threads of this process) is what the step computes,
    and holds on a machine other processes share; wall time does not."""
    wall, cpu = [], []
    for _ in range(steps + 1):
        call_args = jax.tree.map(jnp.copy, args) if donates else args
        jax.block_until_ready(call_args)
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(step(*call_args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"step_s": statistics.median(wall[1:]), "step_cpu_s": statistics.median(cpu[1:])}


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f}"


def case(kind: str, model_cfg, train_batch: int, support: int, outer_batches: int,
         meta_batch: int, dtype: str, remat: bool, concrete: bool):
    """``train_case`` or ``meta_case`` by ``kind`` ("train_step" | "meta_step")."""
    if kind == "train_step":
        return train_case(model_cfg, train_batch, dtype, remat, concrete)
    return meta_case(model_cfg, support, outer_batches, meta_batch, dtype, remat, concrete)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--num_classes", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16", help="train step and outer passes")
    parser.add_argument("--train_batch", type=int, default=32)
    parser.add_argument("--support", type=int, default=50)
    parser.add_argument("--outer_batches", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--small_model", default="vit_small_demo")
    parser.add_argument("--small_dtype", default="float32")
    parser.add_argument("--small_support", type=int, default=10)
    parser.add_argument("--small_outer_batches", type=int, default=2)
    parser.add_argument("--small_batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--skip_large", action="store_true", help="no ViT-B/16 compilation")
    parser.add_argument("--out", help="default bench/results/remat_memory_<machine>.json")
    args = parser.parse_args()
    machine = machine_name()
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"remat_memory_{machine}.json")
    summary: dict[str, Any] = {
        "machine": machine, "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "card_gb": CARD_GB,
        "note": ("XLA memory_analysis estimates of the compiled step, not the GPU's: XLA:CPU "
                 "compiles the recomputation, yet its temp does not show remat's saving (why was "
                 "not established); residual_bytes (what JAX keeps for the "
                 "backward pass) is backend-independent"),
        "large": {}, "small": {}}

    def write():
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(summary, f, indent=2)

    if not args.skip_large:
        model_cfg = vit.ViTConfig.preset(args.model, num_classes=args.num_classes)
        summary["large"]["shapes"] = {
            "model": args.model, "dtype": args.dtype, "train_batch": args.train_batch,
            "support": args.support, "outer_batches": args.outer_batches, "batch": args.batch,
            "num_classes": args.num_classes}
        for kind in ("train_step", "meta_step"):
            for remat in (False, True):
                step, step_args, res = case(kind, model_cfg, args.train_batch, args.support,
                                            args.outer_batches, args.batch, args.dtype, remat,
                                            concrete=False)
                result = {**compiled_memory(step, step_args), "residual_bytes": res}
                summary["large"][f"{kind}/remat={remat}"] = result
                print(f"{kind} remat={remat}: {json.dumps(result)}", flush=True)
                write()
                jax.clear_caches()

    small_cfg = vit.ViTConfig.preset(args.small_model, num_classes=args.num_classes)
    summary["small"]["shapes"] = {
        "model": args.small_model, "dtype": args.small_dtype, "train_batch": args.small_batch,
        "support": args.small_support, "outer_batches": args.small_outer_batches,
        "batch": args.small_batch, "steps": args.steps}
    for kind in ("train_step", "meta_step"):
        for remat in (False, True):
            step, step_args, _ = case(kind, small_cfg, args.small_batch, args.small_support,
                                      args.small_outer_batches, args.small_batch,
                                      args.small_dtype, remat, concrete=True)
            t = timed(step, step_args, args.steps, donates=kind == "train_step")
            summary["small"][f"{kind}/remat={remat}"] = t
            print(f"{kind} remat={remat} ({args.small_model}): {t['step_s'] * 1e3:.1f} ms, "
                  f"CPU {t['step_cpu_s'] * 1e3:.1f} ms", flush=True)
            write()
    for kind in ("train_step", "meta_step"):
        off, on = (summary["small"][f"{kind}/remat={r}"]["step_cpu_s"] for r in (False, True))
        summary["small"][f"{kind}/cpu_time_ratio"] = on / off

    large = summary["large"]
    if large:
        s = large["shapes"]
        print(f"\n{s['model']} at {model_cfg.image_size}, {s['dtype']}: train step batch "
              f"{s['train_batch']}; meta-step support {s['support']}, {s['outer_batches']} outer "
              f"batches of {s['batch']} forget + {s['batch']} val; {s['num_classes']} labels")
        print(f"XLA memory_analysis on {summary['device']} ({os.cpu_count()} cores), GB = 1e9 "
              "bytes; residuals: JAX's, backend-independent\n")
        print("| step | remat | argument GB | output GB | alias GB | temp GB | total GB | "
              f"fits {CARD_GB} GB | residuals GB | TFLOP | compile s |")
        print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        for kind in ("train_step", "meta_step"):
            for remat in (False, True):
                r = large[f"{kind}/remat={remat}"]
                fits = ("n/a" if "total_bytes" not in r
                        else "yes" if r["total_bytes"] <= CARD_GB * 1e9 else "no")
                r["fits_card"] = fits
                print(f"| {kind} | {'on' if remat else 'off'} | {_gb(r.get('argument_bytes'))} | "
                      f"{_gb(r.get('output_bytes'))} | {_gb(r.get('alias_bytes'))} | "
                      f"{_gb(r.get('temp_bytes'))} | {_gb(r.get('total_bytes'))} | {fits} | "
                      f"{_gb(r['residual_bytes'])} | "
                      f"{r['flops'] / 1e12 if 'flops' in r else float('nan'):.2f} | "
                      f"{r['compile_s']:.0f} |")
    small = summary["small"]["shapes"]
    load = os.getloadavg()[0]
    summary["small"]["load_average_1min"] = load
    print(f"\ncompute cost: {small['model']}, {small['dtype']}, {summary['device']} "
          f"({os.cpu_count()} cores, load average {load:.1f}), median of {small['steps']} "
          "steps after a warm-up; CPU = process CPU time, all threads\n")
    print("| step | off: wall ms | off: CPU ms | on: wall ms | on: CPU ms | CPU on / off |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("train_step", "meta_step"):
        off, on = (summary["small"][f"{kind}/remat={r}"] for r in (False, True))
        print(f"| {kind} | {off['step_s'] * 1e3:.1f} | {off['step_cpu_s'] * 1e3:.1f} | "
              f"{on['step_s'] * 1e3:.1f} | {on['step_cpu_s'] * 1e3:.1f} | "
              f"{on['step_cpu_s'] / off['step_cpu_s']:.2f} |")
    print(f"\nnote: {summary['note']}")
    write()
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
