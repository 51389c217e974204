"""The GPU check's summary: issue 18's ratios from the per-section JSON of ``bench/gpu_check.sh``.

    python bench/gpu_summary.py --dir "$OUT"        # writes bench/results/gpu_<date>.json (+ $OUT)

Reads what the sections wrote into ``--dir`` (a missing or unreadable file is a missing section:
its values are ``null``, never a crash):

* ``anchor.json``: the PyTorch reference-style anchor (``../shared/anchors/
  torch_reference_style.py``): one JSON line with ``train_img_per_s_b<batch>``, ``meta_step_s``,
  ``meta_step_peak_gb`` (GiB: bytes / 2**30), ``meta_shape``, ``gpu``, ``framework``;
* ``attention_variants.json`` (``bench/attention_variants.py``): ``rows`` of ``attention``,
  ``batch``, ``images_per_s`` (or ``error``);
* ``meta_step.json`` (``bench/meta_step.py``): ``results.streamed`` (``step_s``, ``peak_gib``,
  ``peak_source``), ``results.request`` (``p50_ms``, ...), ``shape``;
* ``profile.json`` (``bench/profile_ops.py``), ``timm_parity.json`` and
  ``torch_mode_ties.json`` (``tools/check_torch_mode_ties.py``): carried as raw results.

and computes, all measured side by side in one call:

* ``train_speedup``: our best train-step images/s (over attention implementations) at the
  anchor's batch over the anchor's (both bf16; ``gpu_check.sh`` runs ours with
  ``--dtype bfloat16``); target >= 2.0;
* ``meta_step_speedup``: the anchor's seconds per meta-step over ours (streamed); target >= 3.0;
* ``meta_step_memory_ratio``: our peak memory over the anchor's, only where ours is the device's
  ``peak_bytes_in_use`` (a CPU's max RSS is not comparable); target <= 0.5;
* ``request_p50_ms``: p50 of a 20-portrait MetaUnlearn request after compilation; target <= 10;
* ``meta_step_compilations``: where ``meta_step.json`` reports a compilation count; target 1.

Writes the summary (card, versions, ratios, targets with PASS / FAIL / missing, raw sections)
atomically to ``--out`` (default ``bench/results/gpu_<UTC date>.json``) and, when ``$OUT`` is set
and is another folder, a copy there (the device tool returns only files under ``$OUT``). Prints a
short table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import tempfile
from typing import Any

SECTIONS = {"anchor": "anchor.json", "train": "attention_variants.json",
            "meta": "meta_step.json", "request": "request_latency.json",
            "profile": "profile.json", "parity": "timm_parity.json",
            "ties": "torch_mode_ties.json"}
# name -> (comparison, threshold)
TARGETS = {"train_speedup": (">=", 2.0), "meta_step_speedup": (">=", 3.0),
           "meta_step_memory_ratio": ("<=", 0.5), "request_p50_ms": ("<=", 10.0),
           "meta_step_compilations": ("<=", 1)}
VERSIONS = ("jax", "jaxlib", "flax", "optax", "torch", "timm", "numpy")
COMPILATION_KEYS = ("meta_step_compilations", "compilations", "num_compilations")


def read_json(path: str) -> dict[str, Any] | None:
    """The file's JSON object, or its last JSON-object line (the anchor prints one after other
    output); None if the file is missing, empty or holds no JSON object."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else None
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _anchor_train(anchor: dict[str, Any] | None) -> tuple[int | None, float | None]:
    """The anchor's train batch and images/s from its ``train_img_per_s_b<batch>`` key."""
    for key, value in (anchor or {}).items():
        m = re.fullmatch(r"train_img_per_s_b(\d+)", key)
        if m and _number(value):
            return int(m.group(1)), float(value)
    return None, None


def _find_compilations(meta: dict[str, Any] | None) -> Any:
    """A compilation count of the meta-step, wherever ``meta_step.json`` reports one."""
    if not meta:
        return None
    streamed = (meta.get("results") or {}).get("streamed") or {}
    for where in (streamed, meta, meta.get("ratios") or {}):
        for key in COMPILATION_KEYS:
            if key in where and _number(where[key]) is not None:
                return where[key]
    return None


def compute(sections: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The ratios, their targets and the details they came from, from the sections' JSON."""
    anchor, train, meta = sections.get("anchor"), sections.get("train"), sections.get("meta")
    if anchor and "error" in anchor:
        anchor = None
    notes: list[str] = []
    details: dict[str, Any] = {}

    batch, anchor_ips = _anchor_train(anchor)
    ours = [r for r in (train or {}).get("rows", []) if _number(r.get("images_per_s"))]
    if batch is not None:
        same_batch = [r for r in ours if r.get("batch") == batch]
        if ours and not same_batch:
            notes.append(f"train: no row of ours at the anchor's batch {batch}")
        ours = same_batch
    best = max(ours, key=lambda r: r["images_per_s"]) if ours else None
    train_speedup = best["images_per_s"] / anchor_ips if best and anchor_ips else None
    details["train"] = {"batch": batch, "anchor_images_per_s": anchor_ips,
                        "ours_images_per_s": best["images_per_s"] if best else None,
                        "ours_attention": best.get("attention") if best else None}

    results = (meta or {}).get("results") or {}
    streamed = results.get("streamed") or {}
    step_s = _number(streamed.get("step_s"))
    anchor_s = _number((anchor or {}).get("meta_step_s"))
    meta_speedup = anchor_s / step_s if anchor_s and step_s else None
    anchor_gb = _number((anchor or {}).get("meta_step_peak_gb"))
    ours_gib = _number(streamed.get("peak_gib"))
    device_peak = str(streamed.get("peak_source", "")).startswith("device")
    memory_ratio = ours_gib / anchor_gb if ours_gib and anchor_gb and device_peak else None
    if ours_gib and anchor_gb and not device_peak:
        notes.append(f"meta: our peak is {streamed.get('peak_source')!r}, not the device's: "
                     "no memory ratio")
    if anchor and meta and anchor.get("meta_shape") not in (None, meta.get("shape")):
        notes.append(f"meta: the anchor measured {anchor.get('meta_shape')}, "
                     f"we measured {meta.get('shape')}")
    details["meta"] = {"shape": (meta or {}).get("shape"), "anchor_step_s": anchor_s,
                       "ours_step_s": step_s, "anchor_peak_gib": anchor_gb,
                       "ours_peak_gib": ours_gib, "ours_peak_source": streamed.get("peak_source"),
                       "ours_compile_s": streamed.get("compile_s")}
    request = results.get("request") or {}
    details["request"] = {k: request.get(k) for k in ("portraits", "requests", "p50_ms", "p95_ms",
                                                      "p50_with_copy_ms", "compile_s")}
    latency = sections.get("request")  # bench/request_latency.py: the served request path
    if latency and _number(latency.get("request_p50_ms")) is not None:
        request = {"p50_ms": latency["request_p50_ms"]}
        details["request"] = {k: v for k, v in latency.items() if k.startswith("request_")
                              or k in ("compile_s", "traces_after_warmup",
                                       "compiles_after_warmup")}
    for name in ("streamed", "request"):
        if "error" in (results.get(name) or {}):
            notes.append(f"meta: {name}: {results[name]['error']}")
    for row in (train or {}).get("rows", []):
        if "error" in row:
            notes.append(f"train: {row.get('attention')} batch {row.get('batch')}: "
                         f"{row['error'][:120]}")

    values = {"train_speedup": train_speedup, "meta_step_speedup": meta_speedup,
              "meta_step_memory_ratio": memory_ratio,
              "request_p50_ms": _number(request.get("p50_ms")),
              "meta_step_compilations": _find_compilations(meta)}
    targets = {}
    for name, (op, threshold) in TARGETS.items():
        value = values[name]
        if value is None:
            status = "missing"
        else:
            ok = value >= threshold if op == ">=" else value <= threshold
            status = "PASS" if ok else "FAIL"
        targets[name] = {"value": value, "target": f"{op} {threshold}", "status": status}
    return {**values, "targets": targets, "details": details, "notes": notes}


def card() -> dict[str, Any]:
    """The GPU as nvidia-smi names it (name, memory, driver, CUDA version), or nulls."""
    out: dict[str, Any] = {"name": None, "memory_total": None, "driver": None, "cuda": None}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30)
        fields = [f.strip() for f in query.stdout.strip().splitlines()[0].split(",")]
        out.update(name=fields[0], memory_total=fields[1], driver=fields[2])
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        m = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
        out["cuda"] = m.group(1) if m else None
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return out


def versions() -> dict[str, str | None]:
    """Installed versions (package metadata: nothing is imported, no device is touched)."""
    out: dict[str, str | None] = {}
    names = list(VERSIONS) + sorted(
        d.metadata["Name"] for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax_cuda")))
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_atomic(path: str, data: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def table(summary: dict[str, Any]) -> str:
    lines = ["| metric | value | target | status |", "|---|---:|---:|---|"]
    for name, t in summary["targets"].items():
        value = "null" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {name} | {value} | {t['target']} | {t['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.environ.get("OUT", "bench_out"),
                        help="the sections' JSON files (default: $OUT, else bench_out)")
    parser.add_argument("--out", help="default: bench/results/gpu_<UTC date>.json")
    parser.add_argument("--no_copy", action="store_true", help="no copy into $OUT")
    parser.add_argument("--no_card", action="store_true", help="skip nvidia-smi (tests)")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.UTC)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"gpu_{now:%Y-%m-%d}.json")
    sections = {name: read_json(os.path.join(args.dir, file)) for name, file in SECTIONS.items()}
    summary = {"date": now.isoformat(timespec="seconds"),
               "card": None if args.no_card else card(), "versions": versions(),
               **compute(sections),
               "sections_missing": sorted(n for n, s in sections.items() if s is None),
               "sections": sections}
    if summary["card"] is not None and summary["card"]["name"] is None:
        summary["card"]["name"] = ((sections.get("anchor") or {}).get("gpu")
                                   or (sections.get("train") or {}).get("device"))
    write_atomic(out, summary)
    written = [out]
    env_out = os.environ.get("OUT")
    if env_out and not args.no_copy and \
            os.path.abspath(env_out) != os.path.dirname(os.path.abspath(out)):
        copy = os.path.join(env_out, os.path.basename(out))
        write_atomic(copy, summary)
        written.append(copy)
    name = (summary["card"] or {}).get("name") or "no card"
    print(f"\nGPU check summary ({name}; jax {summary['versions'].get('jax')}, "
          f"torch {summary['versions'].get('torch')}; missing sections: "
          f"{', '.join(summary['sections_missing']) or 'none'})")
    print(table(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    print("wrote " + " and ".join(written))
    return summary


if __name__ == "__main__":
    main()
