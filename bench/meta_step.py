"""Benchmark: one MetaUnlearn meta-step (naive vs streamed meta-gradient) and request latency.

    python bench/meta_step.py                                   # CPU: vit_small_demo, float32
    python bench/meta_step.py --model vit_base_patch16_224 --anchor .device/torch_reference_style.py

Measures what DESIGN.md's performance targets name, on synthetic data (random images, labels and
identity rows; no input pipeline, so neither grain, tfds nor ml_collections is imported):

* the meta-step of meta-training (SPEC.md 6.2-6.4: inner step on the support images, outer loss
  over ``--outer_batches`` batches of ``--batch`` forget + ``--batch`` validation images, one
  AdamW(AMSGrad) step of the meta-loss), with the meta-gradient computed
  ``naive`` (``meta_unlearn.core.meta_gradient_naive``: everything differentiated at once, as the
  reference keeps one graph over all outer batches) or ``streamed``
  (``meta_unlearn.make_meta_step``: outer gradient batch by batch, then one VJP); compile time,
  median step time over ``--steps`` and peak memory;
* a deletion request at test time (SPEC.md 6.5: ``make_unlearn_step`` on ``--portraits``
  images): compile time, then p50 / p95 over ``--requests`` requests (portraits already on the
  device, and p50 including their host-to-device copy).

Each variant runs in a fresh subprocess (this script with ``--variant``), so its peak memory is
its own: ``peak_bytes_in_use`` of the device on GPUs (over the whole process, compilation
included, so an upper bound: the anchor resets its peak after a warm-up step); on CPU, where
devices report no memory statistics, the process's max RSS, labelled as such.

``--anchor PATH`` runs the PyTorch reference-style anchor (``../shared/anchors``) with
``python3 PATH`` and reports anchor time / ours and our peak / the anchor's. The defaults (support
20, 5 outer batches of 64 + 64 images, 40 labels) are the anchor's ViT-B/16 shapes. Prints a
table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

VARIANTS = ("streamed", "request", "naive")  # naive last: its compile is the slowest
NUM_IDENTITIES = 1000  # rows of the meta-loss's identity embedding (the anchor's)
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Child: one variant in this process


def _peak_memory() -> dict[str, Any]:
    """Peak memory of this process: the device's if it reports it, else max RSS (CPU proxy)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_gib": stats["peak_bytes_in_use"] / GIB,
                "peak_source": "device peak_bytes_in_use"}
    rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_gib": rss_bytes / GIB, "peak_source": "process max RSS (CPU proxy)"}


def _synthetic(model_cfg, rng, shape: tuple[int, ...], with_rows: bool) -> dict[str, Any]:
    """A random batch: images in [-1, 1], multi-hot labels, mask (and meta-loss rows)."""
    import jax.numpy as jnp

    size, c = model_cfg.image_size, model_cfg.num_classes
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (*shape, size, size, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 2, (*shape, c)), jnp.uint8),
             "mask": jnp.ones(shape, bool)}
    if with_rows:
        batch["row"] = jnp.asarray(rng.integers(0, NUM_IDENTITIES, shape), jnp.int32)
    return batch


def _naive_meta_step(model_cfg, ml_cfg, cfg, tx):
    """``meta_unlearn.make_meta_step`` with the naive meta-gradient: the same step otherwise."""
    import jax
    import optax

    from oneshui_jax.unlearn.meta_unlearn import core as mu

    def step(theta, phi, opt_state, lr, support, forget, val, retain, rng):
        loss, grad_phi = mu.meta_gradient_naive(model_cfg, ml_cfg, cfg, theta, phi, support,
                                                forget, val, retain, rng)
        updates, opt_state = tx.update(grad_phi, opt_state, phi)
        new_phi = jax.tree.map(lambda p, u: p - lr * u, phi, updates)
        stats = {"loss": loss, "meta_loss": mu.support_loss(model_cfg, ml_cfg, theta, phi,
                                                            support, rng),
                 "grad_norm": optax.global_norm(grad_phi)}
        return new_phi, opt_state, stats, None

    return jax.jit(step)


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Compiles and times one variant; the result as a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from oneshui_jax.models import meta_loss, vit
    from oneshui_jax.unlearn.meta_unlearn import core as mu

    gpu = jax.default_backend() == "gpu"
    model = args.model or ("vit_base_patch16_224" if gpu else "vit_small_demo")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    model_cfg = vit.ViTConfig.preset(model, num_classes=args.num_classes)
    cfg = mu.Config(task="multilabel", batch_size=args.batch, compute_dtype=dtype)
    ml_cfg = meta_loss.MetaLossConfig.for_vit(model_cfg, num_identities=NUM_IDENTITIES,
                                              task="multilabel")
    key = jax.random.key(0)
    theta = vit.init_params(model_cfg, jax.random.fold_in(key, 0))
    phi = meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 1))
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"variant": args.variant, "model": model, "dtype": dtype,
                           "device": str(jax.devices()[0].device_kind),
                           "backend": jax.default_backend()}

    if args.variant == "request":
        support = _synthetic(model_cfg, rng, (args.portraits,), with_rows=True)
        step = mu.make_unlearn_step(model_cfg, ml_cfg, cfg)
        start = time.perf_counter()
        compiled = step.lower(theta, phi, support, 1.0).compile()
        out["compile_s"] = time.perf_counter() - start
        jax.block_until_ready(compiled(theta, phi, support, 1.0))  # warm-up
        on_device, with_copy = [], []
        host = jax.device_get(support)
        for _ in range(args.requests):
            start = time.perf_counter()
            jax.block_until_ready(mu.apply_steps(compiled, theta, phi, support, cfg.forget_epochs))
            on_device.append(time.perf_counter() - start)
        for _ in range(args.requests):
            start = time.perf_counter()
            jax.block_until_ready(mu.apply_steps(compiled, theta, phi, jax.device_put(host),
                                             cfg.forget_epochs))
            with_copy.append(time.perf_counter() - start)
        out.update(portraits=args.portraits, requests=args.requests,
                   p50_ms=float(np.percentile(on_device, 50)) * 1e3,
                   p95_ms=float(np.percentile(on_device, 95)) * 1e3,
                   p50_with_copy_ms=float(np.percentile(with_copy, 50)) * 1e3)
        return {**out, **_peak_memory()}

    support = _synthetic(model_cfg, rng, (args.support,), with_rows=True)
    forget = _synthetic(model_cfg, rng, (args.outer_batches, args.batch), with_rows=False)
    val = _synthetic(model_cfg, rng, (args.outer_batches, args.batch), with_rows=False)
    tx = mu.optimizer(cfg)
    opt_state = tx.init(phi)
    lr = jnp.float32(cfg.lr)
    step = (mu.make_meta_step(model_cfg, ml_cfg, cfg, tx) if args.variant == "streamed"
            else _naive_meta_step(model_cfg, ml_cfg, cfg, tx))
    step_args = (theta, phi, opt_state, lr, support, forget, val, None, key)
    start = time.perf_counter()
    compiled = step.lower(*step_args).compile()
    out["compile_s"] = time.perf_counter() - start
    times = []
    for k in range(args.steps + 1):  # the first run is a warm-up
        start = time.perf_counter()
        phi, opt_state, stats, _ = jax.block_until_ready(
            compiled(theta, phi, opt_state, lr, support, forget, val, None,
                     jax.random.fold_in(key, k)))
        times.append(time.perf_counter() - start)
    out.update(step_s=statistics.median(times[1:]), steps=args.steps,
               loss=float(stats["loss"]), grad_norm=float(stats["grad_norm"]))
    return {**out, **_peak_memory()}


# --------------------------------------------------------------------------------------------
# Parent: one subprocess per variant, the anchor, the table


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _run(command: list[str], deadline: float, what: str) -> dict[str, Any]:
    """Runs ``command`` until ``deadline`` (``time.monotonic``); its last JSON line, or
    ``{"error": ...}`` saying what went wrong."""
    timeout = deadline - time.monotonic()
    if timeout < 1:
        return {"error": f"{what}: skipped, --timeout spent"}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{what}: timed out after {timeout:.0f} s"}
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"{what}: exit status {proc.returncode}: {tail}"}
    return result


def _child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--variant", variant]
    for name in ("model", "dtype", "support", "outer_batches", "batch", "num_classes", "steps",
                 "portraits", "requests"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(args: argparse.Namespace, results: dict[str, dict], anchor: dict | None) -> dict:
    """Prints the table; returns the JSON written to ``--out``."""
    first = next((r for r in results.values() if "error" not in r), {})
    shape = f"support={args.support} outer={args.outer_batches}x({args.batch} forget+" \
            f"{args.batch} val)"
    ratios: dict[str, Any] = {}
    if anchor and "error" not in anchor:
        if anchor.get("meta_shape") not in (None, shape):
            print(f"warning: the anchor measured {anchor['meta_shape']}, we measure {shape}")
        for variant in ("streamed", "naive"):
            r = results.get(variant, {})
            if "step_s" in r:
                ratios[f"{variant}_speedup"] = anchor["meta_step_s"] / r["step_s"]
            if r.get("peak_source", "").startswith("device") and anchor.get("meta_step_peak_gb"):
                ratios[f"{variant}_peak_ratio"] = r["peak_gib"] / anchor["meta_step_peak_gb"]
    print(f"\nMetaUnlearn meta-step: {first.get('model')}, {first.get('dtype')} outer passes, "
          f"{shape}, {args.num_classes} labels, on {first.get('device')}")
    print(f"peak memory: {first.get('peak_source', 'n/a')}\n")
    print("| variant | compile s | step s (median) | peak GiB | anchor s / ours | ours / anchor "
          "peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in ("streamed", "naive"):
        r = results.get(variant)
        if r is None:
            continue
        if "error" in r:
            print(f"| {variant} | {r['error']} | | | | |")
            continue
        print(f"| {variant} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | "
              f"{_fmt(ratios.get(f'{variant}_speedup'), '.2f')} | "
              f"{_fmt(ratios.get(f'{variant}_peak_ratio'), '.2f')} |")
    if anchor is not None:
        if "error" in anchor:
            print(f"| anchor | {anchor['error']} | | | | |")
        else:
            print(f"| anchor ({anchor.get('framework')}) | - | {anchor['meta_step_s']:.3f} | "
                  f"{_fmt(anchor.get('meta_step_peak_gb') or None, '.2f')} | 1.00 | 1.00 |")
    r = results.get("request")
    if r is not None:
        print(f"\nrequest ({args.portraits} portraits, one step): " + (
            r["error"] if "error" in r else
            f"compile {r['compile_s']:.1f} s, p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms "
            f"over {r['requests']} requests (p50 {r['p50_with_copy_ms']:.1f} ms with the "
            f"host-to-device copy), peak {r['peak_gib']:.2f} GiB"))
    return {"shape": shape, "num_classes": args.num_classes, "results": results,
            "anchor": anchor, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="ViT preset (default: vit_base_patch16_224 on GPU, "
                                        "vit_small_demo otherwise)")
    parser.add_argument("--dtype", help="outer-pass dtype (default: bfloat16 on GPU, else "
                                        "float32)")
    parser.add_argument("--support", type=int, default=20)
    parser.add_argument("--outer_batches", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num_classes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=5, help="timed meta-steps per variant")
    parser.add_argument("--portraits", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--anchor", help="PyTorch anchor script, run with python3")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds for all subprocesses together (each gets what is left)")
    parser.add_argument("--out", default="bench_out/meta_step.json")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected a subset of {VARIANTS}")
    deadline = time.monotonic() + args.timeout
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write(summary: dict[str, Any]) -> None:  # after every subprocess: partial results too
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)

    anchor = None
    if args.anchor:  # first: its own process, done before ours start
        anchor = _run(["python3", args.anchor], deadline, f"anchor {args.anchor}")
        print(f"anchor: {json.dumps(anchor)}", flush=True)
    results: dict[str, dict] = {}
    for variant in variants:
        write({"results": results, "anchor": anchor, "partial": True})
        results[variant] = _run(_child_argv(args, variant), deadline, variant)
        print(f"{variant}: {json.dumps(results[variant])}", flush=True)
    write(report(args, results, anchor))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
