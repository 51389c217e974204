"""Profile: where a step's time goes, XLA op by XLA op (issue 18: "profile first").

    python bench/profile_ops.py                                  # CPU: vit_small_demo train step
    python bench/profile_ops.py --model vit_tiny_test --steps train,meta --batch 8 --support 4 \
        --outer_batches 2 --meta_batch 4                         # CPU: both steps, tiny shapes
    python bench/profile_ops.py --model vit_base_patch16_224 --dtype bfloat16 --steps train,meta \
        --batch 128 --attention cudnn                            # GPU (bench/gpu_check.sh profile)

For each step in ``--steps`` (``train``: ``train.make_train_step``, SGD, multi-label, the step
``bench/attention_variants.py`` times; ``meta``: ``meta_unlearn.make_meta_step``, the streamed
MetaUnlearn meta-step ``bench/meta_step.py`` times, with its shapes) it compiles the step, runs
one warm-up call, then traces ``--iters`` calls with ``jax.profiler.trace`` into
``--trace_dir/<step>/``. The same construction as those scripts, so with a persistent compilation
cache (``JAX_COMPILATION_CACHE_DIR``, set by ``bench/gpu_check.sh``) the compile is a cache hit.

The trace is read from the Chrome-trace JSON that ``jax.profiler`` writes beside its
``.xplane.pb`` (``plugins/profile/<run>/<host>.trace.json.gz`` with jax 0.10; the
``perfetto_trace.json.gz`` that ``create_perfetto_trace=True`` adds, same format, is the
fallback): no TensorBoard or xprof needed, it works offline. XLA op events are the complete
events (``ph == "X"``) carrying an ``hlo_op`` argument: on the CPU the thunk executor's events, on
a GPU the kernels on the device's streams (when the trace has device processes,
``/device:...``, only their events count, so host-side launches are not counted twice). An op's
self time is its duration less the op events nested inside it on the same thread (a ``while``
loop's body, for instance). Ops are keyed by (HLO module, HLO op) and ranked by total self time;
``share`` is the op's part of all op self time, so the shares of any rows sum to at most 100%.
A second table groups ops by kind (the op name without its ``.N`` suffix).

Writes ``--out.md`` (markdown tables) and ``--out.json``, after each step (a step cut short by a
timeout leaves the earlier ones written).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

STEPS = ("train", "meta")
NUM_IDENTITIES = 1000  # rows of the meta-loss's identity embedding (bench/meta_step.py's)


# --------------------------------------------------------------------------------------------
# Reading a trace


def find_trace(log_dir: str) -> str:
    """The Chrome-trace JSON of the newest run under ``log_dir`` (``*.trace.json.gz``, else
    ``perfetto_trace.json.gz``); FileNotFoundError naming what is there otherwise."""
    runs = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")), key=os.path.getmtime)
    for run in reversed(runs):
        for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz", "*.trace.json"):
            found = sorted(glob.glob(os.path.join(run, pattern)))
            if found:
                return found[0]
    there = sorted(glob.glob(os.path.join(log_dir, "**", "*"), recursive=True))
    raise FileNotFoundError(f"no *.trace.json.gz or perfetto_trace.json.gz under {log_dir} "
                            f"(found: {[os.path.relpath(p, log_dir) for p in there][:10]})")


def _load(path: str) -> list[dict[str, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _kind(op: str) -> str:
    return re.sub(r"\.\d+$", "", op)


def _self_times(events: list[dict[str, Any]]) -> list[float]:
    """Self time (µs) of each event of one thread: its duration less its direct children's."""
    order = sorted(range(len(events)), key=lambda i: (events[i]["ts"], -events[i]["dur"]))
    child = [0.0] * len(events)
    stack: list[int] = []  # indices of the open events, innermost last
    eps = 1e-3  # µs: trace timestamps are rounded
    for i in order:
        start = events[i]["ts"]
        end = start + events[i]["dur"]
        while stack and events[stack[-1]]["ts"] + events[stack[-1]]["dur"] <= start + eps:
            stack.pop()
        if stack:
            parent = stack[-1]
            if end <= events[parent]["ts"] + events[parent]["dur"] + eps:
                child[parent] += events[i]["dur"]
        stack.append(i)
    return [max(0.0, e["dur"] - c) for e, c in zip(events, child, strict=True)]


def summarise(path: str, top: int = 20) -> dict[str, Any]:
    """The op table of one trace file: top ops and op kinds by self time, and what was counted."""
    events = _load(path)
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e.get("pid")] = (e.get("args") or {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = (e.get("args") or {}).get("name", "")
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    ops = [e for e in complete if "hlo_op" in (e.get("args") or {})]
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
    on_device = [e for e in ops if e.get("pid") in device_pids]
    if on_device:
        ops, source = on_device, "device"
        # A derived "XLA Ops" line, where the trace has one, repeats the stream's kernels.
        derived = [e for e in ops if threads.get((e["pid"], e.get("tid"))) == "XLA Ops"]
        if derived:
            ops, source = derived, "device, XLA Ops line"
    elif any(e.get("pid") in device_pids for e in complete):
        # A device without HLO annotations on its events: its kernels, keyed by their names.
        ops = [e for e in complete if e.get("pid") in device_pids]
        source = "device kernels (no hlo_op in the trace: keyed by kernel name)"
    else:
        source = "host (XLA:CPU thunks)"
    by_thread: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for thread_events in by_thread.values():
        for e, self_us in zip(thread_events, _self_times(thread_events), strict=True):
            args = e.get("args") or {}
            key = (str(args.get("hlo_module", "")), str(args.get("hlo_op", e.get("name"))))
            row = rows.setdefault(key, {"op": key[1], "module": key[0], "kind": _kind(key[1]),
                                        "count": 0, "self_ms": 0.0, "kernel": None})
            row["count"] += 1
            row["self_ms"] += self_us / 1e3
            if e.get("name") and e["name"] != key[1] and row["kernel"] is None:
                row["kernel"] = str(e["name"])[:80]
    total_ms = sum(r["self_ms"] for r in rows.values())
    kinds: dict[str, dict[str, Any]] = {}
    for r in rows.values():
        k = kinds.setdefault(r["kind"], {"kind": r["kind"], "ops": 0, "count": 0, "self_ms": 0.0})
        k["ops"] += 1
        k["count"] += r["count"]
        k["self_ms"] += r["self_ms"]

    def ranked(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
        table = sorted(table, key=lambda r: -r["self_ms"])[:top]
        for r in table:
            r["share_pct"] = 100.0 * r["self_ms"] / total_ms if total_ms > 0 else 0.0
        return table

    other: collections.Counter = collections.Counter()  # copies and the like, on the device
    if source.startswith("device") and not source.startswith("device kernels"):
        for e in complete:
            if e.get("pid") in device_pids and "hlo_op" not in (e.get("args") or {}):
                other[str(e.get("name"))] += e["dur"] / 1e3
    window = ([min(e["ts"] for e in ops), max(e["ts"] + e["dur"] for e in ops)] if ops else None)
    return {"trace_file": os.path.basename(path), "source": source, "op_events": len(ops),
            "distinct_ops": len(rows), "total_op_ms": total_ms,
            "op_window_ms": (window[1] - window[0]) / 1e3 if window else None,
            "top_ops": ranked(list(rows.values())), "by_kind": ranked(list(kinds.values())),
            "device_events_without_op_ms": dict(other.most_common(5))}


def markdown(name: str, s: dict[str, Any]) -> str:
    """One step's summary as markdown: a header line, the op table and the kind table."""
    per_call = s["total_op_ms"] / max(1, s["iters"])
    lines = [f"### {name}: {s.get('what', '')}", "",
             f"{s.get('device', '?')}, {s['iters']} traced calls (the totals are over all of "
             f"them): wall {s['wall_ms_per_call']:.2f} ms per call, op self time "
             f"{per_call:.2f} ms per call ({s['op_events']} op events, {s['distinct_ops']} "
             f"distinct ops; {s['source']}; {s['trace_file']})", "",
             "| op | module | count | total ms | share |", "|---|---|---:|---:|---:|"]
    for r in s["top_ops"]:
        op = r["op"] if not r.get("kernel") else f"{r['op']} (`{r['kernel'][:48]}`)"
        lines.append(f"| {op} | {r['module'][:40]} | {r['count']} | {r['self_ms']:.2f} | "
                     f"{r['share_pct']:.1f}% |")
    lines += ["", "| op kind | ops | count | total ms | share |", "|---|---:|---:|---:|---:|"]
    for r in s["by_kind"]:
        lines.append(f"| {r['kind']} | {r['ops']} | {r['count']} | {r['self_ms']:.2f} | "
                     f"{r['share_pct']:.1f}% |")
    if s.get("device_events_without_op_ms"):
        lines += ["", "device events without an HLO op (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in s["device_events_without_op_ms"].items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The steps


@functools.lru_cache(maxsize=1)
def _meta_step_script():
    """bench/meta_step.py, the script beside this one, as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_step.py")
    spec = importlib.util.spec_from_file_location("_bench_meta_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(model_cfg, rng, shape: tuple[int, ...], with_rows: bool) -> dict[str, Any]:
    """Random images in [-1, 1], multi-hot labels, mask (and identity rows): bench/meta_step.py's
    synthetic batch."""
    return _meta_step_script()._synthetic(model_cfg, rng, shape, with_rows)


def build_step(name: str, args: argparse.Namespace) -> tuple[Callable[[], Any], str]:
    """``(call, description)``: ``call()`` runs the compiled step once on its own state and
    blocks until it is done."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from oneshui_jax import optim
    from oneshui_jax import train as train_lib
    from oneshui_jax.models import meta_loss, vit
    from oneshui_jax.unlearn.meta_unlearn import core as mu

    model_cfg = vit.ViTConfig.preset(args.model, num_classes=args.num_classes)
    rng = np.random.default_rng(0)
    if name == "train":  # bench/attention_variants.py's measure()
        tcfg = train_lib.TrainConfig(task="multilabel", compute_dtype=args.dtype,
                                     attention=args.attention)
        tx = optim.sgd(1e-4)
        state = {"params": vit.init_params(model_cfg, jax.random.key(0))}
        state["opt"] = tx.init(state["params"])
        step = train_lib.make_train_step(model_cfg, tcfg, tx)
        batch = _batch(model_cfg, rng, (args.batch,), with_rows=False)
        lr = jnp.float32(1e-3)

        def call():
            state["params"], state["opt"], out = step(state["params"], state["opt"], batch, lr)
            return jax.block_until_ready(out["loss"])

        return call, (f"train step, {args.model}, {args.dtype}, batch {args.batch}, "
                      f"{args.attention} attention, SGD")
    # bench/meta_step.py's streamed variant
    cfg = mu.Config(task="multilabel", batch_size=args.meta_batch, compute_dtype=args.dtype)
    ml_cfg = meta_loss.MetaLossConfig.for_vit(model_cfg, num_identities=NUM_IDENTITIES,
                                              task="multilabel")
    key = jax.random.key(0)
    theta = vit.init_params(model_cfg, jax.random.fold_in(key, 0))
    phi = meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 1))
    support = _batch(model_cfg, rng, (args.support,), with_rows=True)
    forget = _batch(model_cfg, rng, (args.outer_batches, args.meta_batch), with_rows=False)
    val = _batch(model_cfg, rng, (args.outer_batches, args.meta_batch), with_rows=False)
    tx = mu.optimizer(cfg)
    state = {"phi": phi, "opt": tx.init(phi), "k": 0}
    lr = jnp.float32(cfg.lr)
    step = mu.make_meta_step(model_cfg, ml_cfg, cfg, tx)

    def call():
        state["k"] += 1
        state["phi"], state["opt"], stats, _ = step(
            theta, state["phi"], state["opt"], lr, support, forget, val, None,
            jax.random.fold_in(key, state["k"]))
        return jax.block_until_ready(stats["loss"])

    return call, (f"MetaUnlearn meta-step (streamed), {args.model}, {args.dtype} outer passes, "
                  f"support {args.support}, {args.outer_batches} outer batches of "
                  f"{args.meta_batch} forget + {args.meta_batch} validation images")


def profile(call: Callable[[], Any], iters: int, log_dir: str, top: int) -> dict[str, Any]:
    """Compiles and warms up (one call: ``first_call_s``), traces ``iters`` calls into
    ``log_dir``, summarises the trace."""
    import jax

    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    os.makedirs(log_dir, exist_ok=True)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        wall = time.perf_counter() - start
    summary = summarise(find_trace(log_dir), top=top)
    summary.update(iters=iters, wall_ms_per_call=wall / iters * 1e3, first_call_s=first_s,
                   device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
    return summary


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="train", help=f"comma-separated subset of {STEPS}")
    parser.add_argument("--model", default="vit_small_demo")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="xla",
                        help="train step's attention: xla, cudnn, or auto (cudnn on GPUs)")
    parser.add_argument("--num_classes", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="train batch")
    parser.add_argument("--support", type=int, default=20)
    parser.add_argument("--outer_batches", type=int, default=5)
    parser.add_argument("--meta_batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3, help="traced calls per step")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument("--trace_dir", default=None,
                        help="where the traces go (default: a new temporary folder)")
    parser.add_argument("--out", default="bench_out/profile",
                        help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    if not steps or set(steps) - set(STEPS):
        parser.error(f"--steps: expected a subset of {STEPS}, got {args.steps!r}")
    import jax

    if args.attention == "auto":
        args.attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="oneshui_profile_")
    result: dict[str, Any] = {"jax": jax.__version__, "backend": jax.default_backend(),
                              "device": str(jax.devices()[0].device_kind),
                              "trace_dir": os.path.abspath(trace_dir), "steps": {}}
    md = [f"## Top XLA ops by self time ({result['device']}, jax {jax.__version__}; "
          "bench/profile_ops.py)", ""]
    for name in steps:
        try:
            call, what = build_step(name, args)
            summary = {"what": what, **profile(call, args.iters, os.path.join(trace_dir, name),
                                                args.top)}
            md.append(markdown(name, summary))
        except Exception as e:  # noqa: BLE001 (report it and go on to the next step)
            summary = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            md.append(f"### {name}: {summary['error']}\n")
        result["steps"][name] = summary
        print(md[-1], flush=True)
        _write_atomic(args.out + ".json", json.dumps(result, indent=1))
        _write_atomic(args.out + ".md", "\n".join(md))
    print(f"wrote {args.out}.md and {args.out}.json (traces under {trace_dir})")
    return result


if __name__ == "__main__":
    main()
