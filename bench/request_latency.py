"""Benchmark: the served deletion request path of MetaUnlearn (issue 18, item 3), split up.

    python bench/request_latency.py                       # CPU: vit_small_demo, 20 portraits
    python bench/request_latency.py --model vit_base_patch16_224   # GPU: ViT-B/16

What ``serve.Engine`` does for one request, on synthetic portraits and a random model and
meta-loss (no checkpoint, no input pipeline: neither grain, tfds nor ml_collections is
imported, so it runs on the GPU machine as it is), each part timed on its own, to completion:

* ``preprocess``: the eval transform of ``--portraits`` uint8 portraits on the host;
* ``h2d``: their copy (and the labels') to the device (``jax.device_put``);
* ``compute``: ``meta_unlearn.unlearn`` (the method's request-time step, fused: parameters in,
  unlearned parameters out, on the device), the number the target ``request_p50_ms`` is about;
* ``digest``: ``serve.digest.params_digest`` of the output on the device, 16 bytes to the host;
* ``sha256``: for comparison, ``checkpoints.params_hash`` of the output (all parameters to the
  host, then sha256; what a saved request's metadata records), over ``--sha_requests``.

The first request compiles (``compile_s``); then ``--requests`` requests (at least 20) are timed
and reported as p50 / p95 per part plus ``e2e`` (h2d + compute + digest). Traces and
compilations during the timed requests are counted (``jax.monitoring``): both must be 0.
Prints a table and writes JSON to ``--out``; the keys ``request_p50_ms``, ``request_p95_ms``
(compute), ``request_h2d_ms``, ``request_digest_ms`` (p50) are what ``bench/gpu_check.sh`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

NUM_IDENTITIES = 1000  # rows of the meta-loss's identity embedding (the anchor's)
TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from oneshui_jax import checkpoints
    from oneshui_jax.data import transforms
    from oneshui_jax.models import meta_loss, vit
    from oneshui_jax.serve import digest as digest_lib
    from oneshui_jax.unlearn import api
    from oneshui_jax.unlearn import meta_unlearn as mu

    gpu = jax.default_backend() == "gpu"
    name = args.model or ("vit_base_patch16_224" if gpu else "vit_small_demo")
    model_cfg = vit.ViTConfig.preset(name, num_classes=args.num_classes)
    model = api.Model(model_cfg, "multilabel")
    cfg = mu.Config(task="multilabel")
    ml_cfg = mu.meta_loss_config(model, cfg, NUM_IDENTITIES)
    key = jax.random.key(0)
    theta = vit.init_params(model_cfg, jax.random.fold_in(key, 0))
    artifacts = {"phi": meta_loss.init_params(ml_cfg, jax.random.fold_in(key, 1)),
                 "train_identities": np.arange(NUM_IDENTITIES, dtype=np.int32),
                 "step_scale": np.asarray(1.0, np.float32)}
    rng = np.random.default_rng(0)
    n, size = args.portraits, model_cfg.image_size
    # a few different requests of the same size, portraits larger than the model's input
    requests = [([rng.integers(0, 256, (size + 32, size + 16, 3), dtype=np.uint8)
                  for _ in range(n)],
                 rng.integers(0, 2, (n, args.num_classes)).astype(np.uint8),
                 tuple(int(i) for i in rng.integers(0, NUM_IDENTITIES, n)))
                for _ in range(4)]

    def one(k: int) -> tuple[dict[str, float], Any]:
        portraits, labels, ids = requests[k % len(requests)]
        t = {}
        start = time.perf_counter()
        host = transforms.preprocess_eval(portraits, size)
        t["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        images, labels = jax.block_until_ready(jax.device_put((host, labels)))
        t["h2d"] = time.perf_counter() - start
        start = time.perf_counter()
        new, _ = mu.unlearn(model, theta, artifacts, api.Request(images, labels, ids), cfg,
                            key)
        new = jax.block_until_ready(new)
        t["compute"] = time.perf_counter() - start
        start = time.perf_counter()
        digest_lib.params_digest_hex(new)
        t["digest"] = time.perf_counter() - start
        t["e2e"] = t["h2d"] + t["compute"] + t["digest"]
        return t, new

    start = time.perf_counter()
    _, new = one(0)  # compiles the request step and the digest
    compile_s = time.perf_counter() - start
    one(1)  # warm
    counts = {TRACE: 0, COMPILE: 0}

    def listener(event, duration_secs, **kwargs):
        if event in counts:
            counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        timings = [one(k)[0] for k in range(args.requests)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    sha = []
    for _ in range(args.sha_requests):
        start = time.perf_counter()
        checkpoints.params_hash(new)
        sha.append(time.perf_counter() - start)
    parts = {p: [t[p] for t in timings] for p in timings[0]}
    out: dict[str, Any] = {
        "model": name, "num_params": int(sum(x.size for x in jax.tree.leaves(theta))),
        "portraits": n, "requests": args.requests, "step_dtype": "float32",
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax": jax.__version__, "compile_s": compile_s,
        "request_p50_ms": _ms(parts["compute"], 50), "request_p95_ms": _ms(parts["compute"], 95),
        "request_h2d_ms": _ms(parts["h2d"], 50), "request_h2d_p95_ms": _ms(parts["h2d"], 95),
        "request_digest_ms": _ms(parts["digest"], 50),
        "request_digest_p95_ms": _ms(parts["digest"], 95),
        "request_e2e_p50_ms": _ms(parts["e2e"], 50), "request_e2e_p95_ms": _ms(parts["e2e"], 95),
        "request_preprocess_ms": _ms(parts["preprocess"], 50),
        "request_sha256_ms": _ms(sha, 50) if sha else None,
        "traces_after_warmup": counts[TRACE], "compiles_after_warmup": counts[COMPILE],
        "imported": sorted(m for m in ("grain", "tensorflow_datasets", "ml_collections")
                           if m in sys.modules),
    }
    return out


def report(r: dict[str, Any]) -> None:
    print(f"\nMetaUnlearn request: {r['model']} ({r['num_params'] / 1e6:.2f}M params), "
          f"{r['portraits']} portraits, {r['requests']} requests after compilation "
          f"({r['compile_s']:.1f} s), on {r['device']} ({r['backend']}), jax {r['jax']}\n")
    print("| part | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for label, key in (("preprocess (host)", "request_preprocess"), ("host-to-device copy",
                       "request_h2d"), ("unlearn (compute)", "request"),
                       ("digest (device)", "request_digest"), ("h2d + compute + digest",
                                                               "request_e2e")):
        p50 = r.get(f"{key}_p50_ms", r.get(f"{key}_ms"))
        p95 = r.get(f"{key}_p95_ms")
        print(f"| {label} | {p50:.2f} | {'-' if p95 is None else format(p95, '.2f')} |")
    if r["request_sha256_ms"] is not None:
        print(f"| sha256 of the output (host, for comparison) | {r['request_sha256_ms']:.1f} | - |")
    print(f"\ntraces / compilations during the timed requests: {r['traces_after_warmup']} / "
          f"{r['compiles_after_warmup']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="ViT preset (default: vit_base_patch16_224 on GPU, "
                                        "vit_small_demo otherwise)")
    parser.add_argument("--portraits", type=int, default=20)
    parser.add_argument("--num_classes", type=int, default=40)
    parser.add_argument("--requests", type=int, default=50, help="timed requests (>= 20)")
    parser.add_argument("--sha_requests", type=int, default=3,
                        help="timed sha256 of the output (0: skip)")
    parser.add_argument("--out", default="bench_out/request_latency.json")
    args = parser.parse_args()
    if args.requests < 20:
        parser.error("--requests must be >= 20 (p95 of fewer is the maximum)")
    result = run(args)
    report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
