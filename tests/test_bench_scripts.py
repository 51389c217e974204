"""The GPU check's own scripts, on CPU: bench/gpu_summary.py (ratios and targets from the
sections' JSON), bench/profile_ops.py (a jax.profiler trace summarised op by op) and
bench/gpu_check.sh (its syntax, its section argument), bench/ensemble.py on a tiny model, and
bench/ap_scores.py on the shared small study. Nothing is timed."""

import gzip
import importlib.util
import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_summary = _load("gpu_summary")
profile_ops = _load("profile_ops")
ensemble_bench = _load("ensemble")

# The keys the scripts write (bench/results/h100_*.json; the anchor's print in ../shared/anchors).
ANCHOR = {"framework": "torch 2.11.0", "device": "cuda", "gpu": "NVIDIA H200",
          "train_img_per_s_b128": 1000.0, "meta_step_s": 0.6, "meta_step_peak_gb": 40.0,
          "meta_shape": "support=20 outer=5x(64 forget+64 val)"}
TRAIN = {"device": "NVIDIA H200", "jax": "0.11.2", "rows": [
    {"attention": "xla", "batch": 128, "images_per_s": 1500.0},
    {"attention": "cudnn", "batch": 128, "images_per_s": 2500.0},
    {"attention": "cudnn", "batch": 256, "images_per_s": 9000.0},  # not the anchor's batch
    {"attention": "flash", "batch": 128, "error": "RuntimeError: no"}]}


def _meta(step_s=0.15, peak_gib=16.0, p50_ms=8.0, peak_source="device peak_bytes_in_use",
          **streamed_extra):
    return {"shape": "support=20 outer=5x(64 forget+64 val)", "num_classes": 40, "results": {
        "streamed": {"variant": "streamed", "compile_s": 50.0, "step_s": step_s,
                     "peak_gib": peak_gib, "peak_source": peak_source, **streamed_extra},
        "request": {"variant": "request", "portraits": 20, "requests": 50, "p50_ms": p50_ms,
                    "p95_ms": p50_ms + 1, "p50_with_copy_ms": p50_ms + 2, "compile_s": 10.0}},
            "anchor": None, "ratios": {}}


def _write(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))


def _summarise(tmp_path, monkeypatch, files):
    monkeypatch.delenv("OUT", raising=False)
    folder = str(tmp_path / "out")
    _write(folder, files)
    out = str(tmp_path / "results" / "gpu_test.json")
    summary = gpu_summary.main(["--dir", folder, "--out", out, "--no_card"])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    return summary


def test_summary_ratios_and_pass(tmp_path, monkeypatch):
    # The anchor prints other lines before its JSON line when something warns.
    s = _summarise(tmp_path, monkeypatch, {
        "anchor.json": "a warning\n" + json.dumps(ANCHOR) + "\n",
        "attention_variants.json": TRAIN, "meta_step.json": _meta()})
    assert s["train_speedup"] == pytest.approx(2.5)  # best at batch 128 (cudnn) / anchor's
    assert s["details"]["train"]["ours_attention"] == "cudnn"
    assert s["meta_step_speedup"] == pytest.approx(4.0)  # 0.6 s / 0.15 s
    assert s["meta_step_memory_ratio"] == pytest.approx(0.4)  # 16 / 40
    assert s["request_p50_ms"] == pytest.approx(8.0)
    status = {k: v["status"] for k, v in s["targets"].items()}
    assert status == {"train_speedup": "PASS", "meta_step_speedup": "PASS",
                      "meta_step_memory_ratio": "PASS", "request_p50_ms": "PASS",
                      "meta_step_compilations": "missing"}
    assert s["meta_step_compilations"] is None
    assert s["sections"]["anchor"]["meta_step_s"] == 0.6  # raw sections carried
    assert set(s["sections_missing"]) == {"request", "profile", "parity", "ties"}
    assert {"jax", "jaxlib", "flax", "torch"} <= set(s["versions"])


def test_summary_fail_and_compilations(tmp_path, monkeypatch):
    train = {"rows": [{"attention": "xla", "batch": 128, "images_per_s": 1900.0}]}
    s = _summarise(tmp_path, monkeypatch, {
        "anchor.json": ANCHOR, "attention_variants.json": train,
        "meta_step.json": _meta(step_s=0.3, peak_gib=24.0, p50_ms=12.5, compilations=2)})
    assert s["train_speedup"] == pytest.approx(1.9)
    assert s["meta_step_speedup"] == pytest.approx(2.0)
    assert s["meta_step_memory_ratio"] == pytest.approx(0.6)
    assert s["meta_step_compilations"] == 2
    assert {k: v["status"] for k, v in s["targets"].items()} == {
        "train_speedup": "FAIL", "meta_step_speedup": "FAIL", "meta_step_memory_ratio": "FAIL",
        "request_p50_ms": "FAIL", "meta_step_compilations": "FAIL"}


def test_summary_missing_sections_give_nulls(tmp_path, monkeypatch):
    # No anchor (an empty file, as a killed anchor leaves), a truncated meta_step.json, no train.
    s = _summarise(tmp_path, monkeypatch, {"anchor.json": "", "meta_step.json": '{"results": {'})
    for name in ("train_speedup", "meta_step_speedup", "meta_step_memory_ratio",
                 "request_p50_ms", "meta_step_compilations"):
        assert s[name] is None
        assert s["targets"][name]["status"] == "missing"
    assert set(s["sections_missing"]) == {"anchor", "train", "meta", "request", "profile",
                                          "parity", "ties"}
    # Ours without the anchor: still no ratio, but the request needs no anchor.
    s = _summarise(tmp_path / "b", monkeypatch, {"attention_variants.json": TRAIN,
                                                 "meta_step.json": _meta()})
    assert s["train_speedup"] is None and s["meta_step_speedup"] is None
    assert s["targets"]["request_p50_ms"]["status"] == "PASS"


def test_summary_no_memory_ratio_from_cpu_rss(tmp_path, monkeypatch):
    s = _summarise(tmp_path, monkeypatch, {
        "anchor.json": ANCHOR,
        "meta_step.json": _meta(peak_source="process max RSS (CPU proxy)")})
    assert s["meta_step_speedup"] == pytest.approx(4.0)
    assert s["meta_step_memory_ratio"] is None
    assert any("RSS" in note for note in s["notes"])


def test_summary_copies_into_out(tmp_path, monkeypatch):
    folder = tmp_path / "sections"
    _write(str(folder), {"anchor.json": ANCHOR})
    device_out = tmp_path / "device_out"
    device_out.mkdir()
    monkeypatch.setenv("OUT", str(device_out))
    gpu_summary.main(["--dir", str(folder), "--out", str(tmp_path / "r" / "gpu_x.json"),
                      "--no_card"])
    assert (device_out / "gpu_x.json").is_file()
    assert [p for p in os.listdir(device_out) if p.startswith(".tmp")] == []


def _trace(path, events, processes):
    meta = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
            for pid, name in processes.items()]
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": meta + events}, f)


def _op(pid, name, ts, dur, op=None, tid=1):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
            "args": {"hlo_op": op or name, "hlo_module": "jit_step"}}


def test_summarise_self_time_and_device_events_only(tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    events = [
        # Host-side events with hlo_op are not counted when the trace has a device.
        _op(1, "fusion.1", 0, 5000),
        # On the device: a while loop (100 µs) holding two runs of fusion.1 (30 µs each).
        _op(2, "while.3", 0, 100), _op(2, "kernel_a", 10, 30, op="fusion.1"),
        _op(2, "kernel_a", 50, 30, op="fusion.1"),
        # Another stream: a gemm of 40 µs, and a copy without an HLO op.
        _op(2, "sm90_gemm", 0, 40, op="custom-call.7", tid=2),
        {"ph": "X", "pid": 2, "tid": 3, "name": "MemcpyH2D", "ts": 0, "dur": 7, "args": {}}]
    _trace(run / "host.trace.json.gz", events, {1: "/host:CPU", 2: "/device:GPU:0"})
    s = profile_ops.summarise(profile_ops.find_trace(str(tmp_path)))
    rows = {r["op"]: r for r in s["top_ops"]}
    assert s["source"] == "device"
    assert rows["fusion.1"]["count"] == 2 and rows["fusion.1"]["self_ms"] == pytest.approx(0.06)
    assert rows["fusion.1"]["kernel"] == "kernel_a"
    assert rows["while.3"]["self_ms"] == pytest.approx(0.04)  # 100 - 2 x 30 µs
    assert rows["custom-call.7"]["self_ms"] == pytest.approx(0.04)
    assert s["total_op_ms"] == pytest.approx(0.14)
    assert [r["op"] for r in s["top_ops"]] == ["fusion.1", "while.3", "custom-call.7"]
    assert sum(r["share_pct"] for r in s["top_ops"]) == pytest.approx(100.0)
    assert s["device_events_without_op_ms"] == {"MemcpyH2D": pytest.approx(0.007)}
    kinds = {r["kind"]: r for r in s["by_kind"]}
    assert kinds["fusion"]["count"] == 2 and kinds["while"]["ops"] == 1



def test_summarise_device_kernels_without_hlo_op(tmp_path):
    # A device whose events carry no HLO annotation: its kernels, keyed by name, still count.
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    events = [{"ph": "X", "pid": 2, "tid": 1, "name": name, "ts": ts, "dur": dur, "args": {}}
              for name, ts, dur in (("gemm_k", 0, 30), ("gemm_k", 40, 30), ("add_k", 80, 40))]
    _trace(run / "perfetto_trace.json.gz", events, {1: "/host:CPU", 2: "/device:GPU:0"})
    s = profile_ops.summarise(profile_ops.find_trace(str(tmp_path)))
    assert s["source"].startswith("device kernels")
    assert [(r["op"], r["count"]) for r in s["top_ops"]] == [("gemm_k", 2), ("add_k", 1)]
    assert s["device_events_without_op_ms"] == {}

def test_profile_ops_traces_a_tiny_train_step(tmp_path):
    out = str(tmp_path / "profile")
    result = profile_ops.main(["--model", "vit_tiny_test", "--batch", "4", "--iters", "2",
                               "--top", "10", "--trace_dir", str(tmp_path / "traces"),
                               "--out", out])
    with open(out + ".json") as f:
        written = json.load(f)
    train = written["steps"]["train"]
    assert "error" not in train, train
    assert train["iters"] == 2 and train["op_events"] > 0 and train["total_op_ms"] > 0
    assert 0 < len(train["top_ops"]) <= 10
    shares = [r["share_pct"] for r in train["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-9
    assert sum(r["share_pct"] for r in train["by_kind"]) <= 100.0 + 1e-9
    names = [r["op"] for r in train["top_ops"]]
    assert any(re.search(r"fusion|dot|conv", n) for n in names), names
    assert all(r["module"] for r in train["top_ops"])
    with open(out + ".md") as f:
        md = f.read()
    assert "| op | module | count | total ms | share |" in md and names[0] in md
    assert result["steps"]["train"]["top_ops"] == train["top_ops"]


def test_ensemble_bench_measures_members_against_one_model(tmp_path):
    out = str(tmp_path / "ensemble.json")
    result = ensemble_bench.main(["--model", "vit_tiny_test", "--members", "2,3", "--batch", "4",
                                  "--steps", "1", "--out", out])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [r["members"] for r in rows] == [1, 2, 3]  # one model is always the baseline
    assert rows[0]["speedup_vs_one_at_a_time"] == 1.0
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0
        assert r["speedup_vs_one_at_a_time"] == pytest.approx(
            r["images_per_s"] / rows[0]["images_per_s"])


def test_gpu_check_script(tmp_path):
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    bad = subprocess.run(["bash", script, "no_such_section"], capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path)}, cwd=REPO, timeout=30)
    assert bad.returncode == 2 and "unknown section" in bad.stdout


def test_summary_takes_the_request_from_the_served_path(tmp_path, monkeypatch):
    """``request_latency.json`` (bench/request_latency.py, the served request) wins over the
    meta-step benchmark's own request timing."""
    latency = {"request_p50_ms": 6.5, "request_p95_ms": 9.0, "request_h2d_ms": 0.4,
               "request_digest_ms": 0.2, "traces_after_warmup": 0, "compiles_after_warmup": 0}
    s = _summarise(tmp_path, monkeypatch, {"meta_step.json": _meta(p50_ms=12.5),
                                           "request_latency.json": latency})
    assert s["request_p50_ms"] == pytest.approx(6.5)
    assert s["targets"]["request_p50_ms"]["status"] == "PASS"
    assert s["details"]["request"]["request_h2d_ms"] == 0.4


@pytest.mark.slow
def test_ap_scores_scores_every_stage_of_a_study_both_ways(small_study, tmp_path):
    """bench/ap_scores.py on the finished small study: one row per stage and split, whose float
    mAP is the study's own (float32 compute scores in float) and whose difference is the bf16
    mAP minus that, non-zero somewhere."""
    import sys

    config = small_study.config
    out = tmp_path / "ap.json"
    args = [sys.executable, os.path.join(REPO, "bench", "ap_scores.py"),
            "--config=" + os.path.join(REPO, "configs", "synthfaces.py") + ":N=5,size=small",
            f"--config.data.tfds_dir={config.data.tfds_dir}",
            f"--config.checkpoint_dir={config.checkpoint_dir}",
            f"--config.workdir={tmp_path / 'work'}", f"--config.stages={tuple(config.stages)}",
            "--config.progress=False", f"--out={out}"]
    run = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["stage"], r["split"]) for r in rows} == {
        (s, split) for s in config.stages for split in ("retain", "forget", "test", "val")}
    for record in small_study.records:
        for split in ("retain", "forget", "test", "val"):
            row = next(r for r in rows if (r["stage"], r["split"]) == (record["method"], split))
            assert row["map_float"] == pytest.approx(record[split]["metric"], abs=1e-6)
            assert row["difference"] == pytest.approx(row["map_bf16_scores"] - row["map_float"])
    assert any(abs(r["difference"]) > 1e-6 for r in rows)  # the rounding shows somewhere
