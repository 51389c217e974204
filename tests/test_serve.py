"""Serving deletion requests (``oneshui_jax.serve``, ``python -m oneshui_jax.unlearn``).

Requests are served on the shared small study (``tests/small_study.py``) end to end: through the
command line in a subprocess twice (the first request and one error, to prove the entry points),
otherwise in process through ``oneshui_jax.cli.request.main``.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from oneshui_jax import checkpoints, serve
from oneshui_jax.cli import request as request_cli
from oneshui_jax.data import synthfaces, transforms
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.models import vit
from oneshui_jax.serve import digest as digest_lib
from oneshui_jax.unlearn import api, registry, support_ascent
from oneshui_jax.unlearn import meta_unlearn as mu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(small_study, tmp_path_factory):
    """The shared small study's runs (pretrain, meta_unlearn, support_ascent), and two PNG
    portraits of a forget identity."""
    root = str(tmp_path_factory.mktemp("serve"))
    run_dir = small_study.run_dir

    metadata = checkpoints.read_metadata(run_dir("meta_unlearn"))
    identity = metadata["splits"]["forget"][0]
    faces = synthfaces.named_config("small")
    first = int(np.cumsum(synthfaces.images_per_identity(faces))[identity - 1]) if identity else 0
    portraits = []
    for k in range(2):
        image, _, who = synthfaces.render(faces, first + k)
        assert who == identity
        portraits.append(os.path.join(root, f"portrait_{k}.png"))
        Image.fromarray(image).save(portraits[-1])
    return types.SimpleNamespace(
        root=root, pretrain=run_dir("pretrain"), meta=run_dir("meta_unlearn"),
        ascent=run_dir("support_ascent"), identity=identity, portraits=portraits,
        metadata=metadata, ascent_metadata=checkpoints.read_metadata(run_dir("support_ascent")))


def cli(module: str, *args: str) -> tuple[int, str, str]:
    """``python -m module args`` in a subprocess: ``(exit status, stdout, stderr)``."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    return proc.returncode, proc.stdout, proc.stderr


def serve_main(capsys, *args: str) -> tuple[int, str, str]:
    """``request_cli.main(args)`` in process: ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    try:
        code = request_cli.main(list(args))
    except SystemExit as e:  # a malformed command line
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_receipt(out: str) -> dict:
    with open(os.path.join(out, serve.RECEIPT_FILE)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def first(run):
    """One request from the meta_unlearn run directory, through the command line."""
    out = os.path.join(run.root, "request_1")
    code, stdout, stderr = cli(
        "oneshui_jax.unlearn", "--checkpoint", run.meta, "--method", "meta_unlearn",
        "--portrait", run.portraits[0], "--portrait", run.portraits[1], "--identity",
        str(run.identity), "--out", out, "--request_id", "req-1")
    assert code == 0, stderr
    return types.SimpleNamespace(out=out, stdout=stdout, receipt=read_receipt(out))


def read_images(paths):
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def direct_request(run, theta, identities):
    """The portraits as ``api.Request``, labels predicted by ``theta`` (the named deviation)."""
    model_cfg = vit.ViTConfig(**run.metadata["model_config"])
    images = transforms.preprocess_eval(read_images(run.portraits), model_cfg.image_size)
    predicted = np.asarray(vit.apply(model_cfg, theta, images)[0]) > 0
    model = api.Model(model_cfg, "multilabel")
    return model, api.Request(jax.numpy.asarray(images), jax.numpy.asarray(
        predicted.astype(np.uint8)), tuple(identities)), predicted


def assert_params_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


@pytest.mark.slow
def test_request_writes_model_and_receipt(run, first):
    r = first.receipt
    assert r["receipt_version"] == serve.RECEIPT_VERSION == 3
    assert r["request_id"] == "req-1" and r["method"] == "meta_unlearn"
    assert r["access"] == "stats"
    assert [p["sha256"] for p in r["portraits"]] == [
        hashlib.sha256(open(p, "rb").read()).hexdigest() for p in run.portraits]
    before = checkpoints.read_metadata(run.pretrain)["params_hash"]
    written = checkpoints.load_params(first.out)  # verifies the recorded hash
    assert r["params_hash_before"] == before == run.metadata["base_params_hash"]
    assert r["params_hash_after"] == checkpoints.params_hash(written) != before
    # the device checksum of the output, as the saved parameters give it after loading
    assert r["params_digest_after"] == digest_lib.params_digest_hex(written)
    assert r["params_digest_before"] == digest_lib.params_digest_hex(
        checkpoints.load_params(run.pretrain)) != r["params_digest_after"]
    assert r["identities"] == [run.identity, run.identity]
    assert r["labels_predicted"] is True and np.shape(r["labels"]) == (2, 24)
    recorded = run.metadata["method_config"]
    assert r["method_config"] == recorded and recorded["task"] == "multilabel"
    assert r["hyperparameters"]["meta_lr"] == recorded["meta_lr"]
    assert r["hyperparameters"]["forget_epochs"] == recorded["forget_epochs"] == 1
    assert r["hyperparameters"]["steps"] == 1  # what meta_unlearn.unlearn reported
    assert r["versions"] == checkpoints.library_versions()
    assert set(r["timings"]) >= {"load_s", "h2d_s", "compile_s", "compute_s", "digest_s",
                                 "save_s", "total_s"}
    assert r["source_checkpoint"] == run.pretrain and r["artifacts_run_dir"] == run.meta
    assert r["artifacts_hash"] == run.metadata["artifacts_hash"]
    metadata = checkpoints.read_metadata(first.out)
    assert metadata["stage"] == "request" and metadata["requests"] == ["req-1"]
    assert metadata["method"] == "meta_unlearn" and metadata["access"] == "stats"
    assert metadata["method_config"] == recorded and metadata["method_run_dir"] == run.meta
    assert metadata["artifacts_hash"] == run.metadata["artifacts_hash"]
    assert metadata["base_run_dir"] == run.pretrain
    assert metadata["splits"] == run.metadata["splits"]
    assert "req-1" in first.stdout and "compile" in first.stdout
    assert "meta_unlearn (access stats" in first.stdout


@pytest.mark.slow
def test_written_params_equal_direct_unlearn(run, first):
    """The CLI's model is ``meta_unlearn.unlearn`` on the portraits, computed here in process."""
    theta = checkpoints.load_params(run.pretrain)
    artifacts = checkpoints.load_tree(run.meta, "artifacts",
                                      expected_hash=run.metadata["artifacts_hash"])
    cfg = api.config_from_record("meta_unlearn", mu, run.metadata["method_config"])
    model, request, predicted = direct_request(run, theta, [run.identity] * 2)
    np.testing.assert_array_equal(predicted, np.asarray(first.receipt["labels"], bool))
    expected, _ = mu.unlearn(model, theta, artifacts, request, cfg, jax.random.key(0))
    assert_params_close(checkpoints.load_params(first.out), expected)


@pytest.mark.slow
def test_support_ascent_serves_through_the_cli(run, capsys):
    """support_ascent's run serves with its own method; identities are optional for it."""
    out = os.path.join(run.root, "ascent_1")
    code, stdout, stderr = serve_main(capsys, "--checkpoint", run.ascent, "--portrait",
                                      run.portraits[0], "--portrait", run.portraits[1],
                                      "--out", out)
    assert code == 0, stderr
    theta = checkpoints.load_params(run.pretrain)
    artifacts = checkpoints.load_tree(run.ascent, "artifacts",
                                      expected_hash=run.ascent_metadata["artifacts_hash"])
    cfg = api.config_from_record("support_ascent", support_ascent,
                                 run.ascent_metadata["method_config"])
    model, request, _ = direct_request(run, theta, [None, None])
    expected, info = support_ascent.unlearn(model, theta, artifacts, request, cfg,
                                            jax.random.key(0))
    assert_params_close(checkpoints.load_params(out), expected)
    r = read_receipt(out)
    assert r["method"] == "support_ascent" and r["access"] == "stats"
    assert r["hyperparameters"]["alpha"] == info["alpha"] == pytest.approx(
        float(artifacts["alpha"]))
    assert r["hyperparameters"]["alphas"] == run.ascent_metadata["method_config"]["alphas"]
    assert r["identities"] == [None, None] and r["artifacts_run_dir"] == run.ascent
    assert "support_ascent (access stats, alpha" in stdout
    # it chains too, with no flag
    again = os.path.join(run.root, "ascent_2")
    code, _, stderr = serve_main(capsys, "--checkpoint", out, "--portrait", run.portraits[0],
                                 "--out", again)
    assert code == 0, stderr
    r2 = read_receipt(again)
    assert r2["method"] == "support_ascent" and r2["params_hash_before"] == r["params_hash_after"]
    assert checkpoints.read_metadata(again)["requests"] == [r["request_id"], r2["request_id"]]


@pytest.mark.slow
def test_requests_chain_with_the_same_method_run(run, first, capsys):
    outs = [first.out]
    for k in (2, 3):
        outs.append(os.path.join(run.root, f"request_{k}"))
        code, _, stderr = serve_main(capsys, "--checkpoint", outs[-2], "--portrait",
                                     run.portraits[0], "--identity", str(run.identity),
                                     "--out", outs[-1], "--request_id", f"req-{k}")
        assert code == 0, stderr
    receipts = [read_receipt(out) for out in outs]
    for before, after in zip(receipts, receipts[1:], strict=False):
        assert after["params_hash_before"] == before["params_hash_after"]
        assert after["params_digest_before"] == before["params_digest_after"]
        assert after["source_checkpoint"] == before["output"]
    assert all(r["artifacts_run_dir"] == run.meta for r in receipts)
    metadata = checkpoints.read_metadata(outs[-1])
    assert metadata["requests"] == ["req-1", "req-2", "req-3"]
    assert metadata["base_params_hash"] == run.metadata["base_params_hash"]
    assert metadata["method_run_dir"] == run.meta
    # --artifacts names another method run prepared on the same pretrained model
    mixed = os.path.join(run.root, "request_mixed")
    code, _, stderr = serve_main(capsys, "--checkpoint", outs[-1], "--artifacts", run.ascent,
                                 "--portrait", run.portraits[0], "--out", mixed)
    assert code == 0, stderr
    assert checkpoints.read_metadata(mixed)["requests"][:3] == ["req-1", "req-2", "req-3"]
    assert read_receipt(mixed)["method"] == "support_ascent"


def _full_method() -> types.ModuleType:
    """A throwaway method that reads the forget and retain sets at request time."""
    module = types.ModuleType("full_method_for_test")

    @dataclasses.dataclass(frozen=True)
    class Config:
        task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})

    def unlearn(model, params, artifacts, request, cfg, rng, data=None):
        raise AssertionError("a full method must never be called by serving")

    module.ACCESS, module.Config, module.unlearn = api.FULL, Config, unlearn
    api.check_method("full_method", module)
    return module


@pytest.mark.parametrize("recorded_access", ["full", "stats"])
def test_full_method_is_refused(run, tmp_path, monkeypatch, capsys, recorded_access):
    monkeypatch.setitem(registry.METHODS, "full_method", _full_method())
    fake = str(tmp_path / "full_method_5_0")
    shutil.copytree(run.meta, fake)
    metadata = {k: v for k, v in checkpoints.read_metadata(run.meta).items()
                if k not in ("status", "run_dir")}
    checkpoints.write_metadata(fake, {**metadata, "method": "full_method",
                                      "access": recorded_access,
                                      "method_config": {"task": "multilabel"}}, status="done")
    out = str(tmp_path / "out")
    code, _, stderr = serve_main(capsys, "--checkpoint", fake, "--portrait", run.portraits[0],
                                 "--identity", str(run.identity), "--out", out)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "full" in stderr and "forget and retain" in stderr and "portraits alone" in stderr
    assert not os.path.exists(out)
    with pytest.raises(ConfigError, match="forget and retain sets"):
        serve.serve_request(fake, run.portraits[:1], out, identities=[run.identity])
    assert not os.path.exists(out)


def test_errors_are_one_line_exit_2_and_write_nothing(run, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(open(run.portraits[0], "rb").read()[:60])
    one = ["--portrait", run.portraits[0]]
    ident = ["--identity", str(run.identity)]
    cases = {  # arguments, what the message must name
        "corrupt": (["--checkpoint", run.meta, "--portrait", str(corrupt), *ident],
                    [str(corrupt)]),
        "missing_portrait": (["--checkpoint", run.meta, "--portrait", str(tmp_path / "no.png"),
                              *ident], [str(tmp_path / "no.png")]),
        "empty": (["--checkpoint", run.meta, *ident], ["--portrait"]),
        "no_method_run": (["--checkpoint", run.pretrain, *one, *ident],
                          [run.pretrain, "--artifacts", "--config.stages"]),
        "artifacts_not_a_method_run": (["--checkpoint", run.pretrain, "--artifacts",
                                        run.pretrain, *one, *ident],
                                       ["--artifacts", run.pretrain, "not a method run"]),
        "no_checkpoint": (["--checkpoint", str(tmp_path / "nowhere"), *one, *ident],
                          [str(tmp_path / "nowhere")]),
        "unknown_identity": (["--checkpoint", run.meta, *one, "--identity", "99999"],
                             ["99999", "not training identities"]),
        "no_identity": (["--checkpoint", run.meta, *one], ["use_ids", "--identity"]),
        "identity_count": (["--checkpoint", run.meta, *one, *ident, *ident, *ident],
                           ["one per portrait"]),
        "wrong_method": (["--checkpoint", run.meta, "--method", "support_ascent", *one, *ident],
                         ["--method support_ascent", "meta_unlearn"]),
        "labels_syntax": (["--checkpoint", run.meta, *one, *ident, "--labels", "0,x"],
                          ["--labels", "integers"]),
        "labels_values": (["--checkpoint", run.meta, *one, *ident, "--labels", "0,1"],
                          ["portrait 0", "24 values"]),
        "out_is_source": (["--checkpoint", run.meta, *one, *ident], ["--out", "new directory"]),
        "unknown_flag": (["--checkpoint", run.meta, *one, *ident, "--meta_loss", run.meta],
                         ["--meta_loss"]),
    }
    for name, (args, words) in cases.items():
        out = run.meta if name == "out_is_source" else str(tmp_path / name)
        code, stdout, stderr = serve_main(capsys, *args, "--out", out)
        assert code == 2, (name, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, (name, stderr)
        assert all(word in stderr for word in words), (name, stderr)
        assert not stdout, name
        if name != "out_is_source":
            assert not os.path.exists(out), name
    assert checkpoints.is_finished(run.meta)
    # the same through the other entry point, in a subprocess
    out = str(tmp_path / "subprocess")
    code, _, stderr = cli("oneshui_jax.serve", "--checkpoint", run.pretrain, *one, *ident,
                          "--out", out)
    assert code == 2 and stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    assert "--artifacts" in stderr and not os.path.exists(out)


def test_second_forget_reuses_the_compiled_step(run):
    engine = serve.Engine.from_checkpoint(run.meta)
    assert engine.method == "meta_unlearn" and engine.access == "stats"
    images = read_images(run.portraits)
    params_1, timings_1 = engine.forget(images, run.identity)
    compiled = engine.cache_size
    params_2, timings_2 = engine.forget(images, run.identity)
    assert timings_1["compile_s"] > 0 and timings_2["compile_s"] == 0
    assert engine.cache_size == compiled == 2  # label prediction + unlearning step
    assert checkpoints.params_hash(params_1) == checkpoints.params_hash(params_2)
    _, timings_3 = engine.forget(images[:1], [run.identity])  # another size compiles anew
    assert timings_3["compile_s"] > 0 and engine.cache_size == 4
    # labels given instead of predicted; wrong ones are refused
    prepared = engine.prepare(images, run.identity, labels=[[0] * 24, [1] * 24])
    assert not prepared.labels_predicted and prepared.labels.dtype == np.uint8
    assert prepared.identities == [run.identity] * 2
    with pytest.raises(ConfigError, match="portrait 1"):
        engine.prepare(images, run.identity, labels=[[0] * 24, [1] * 3])
    with pytest.raises(ConfigError, match="one per portrait"):
        engine.prepare(images, [run.identity] * 3)
    with pytest.raises(ConfigError, match=r"\[99999\]"):
        engine.prepare(images, [run.identity, 99999])
    assert engine.prepare(images, None).identities == [None, None]  # the method decides
    with pytest.raises(ConfigError, match="use_ids"):
        engine.forget(images, None)
    with pytest.raises(DataError, match="empty request"):
        engine.prepare([], run.identity)


def test_model_of_another_architecture_or_lineage_is_refused(run, tmp_path):
    source = checkpoints.read_metadata(run.pretrain)
    base = {k: source[k] for k in ("config", "splits", "stage")}
    tiny_cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=24)
    tiny = str(tmp_path / "tiny")
    checkpoints.save_params(tiny, vit.init_params(tiny_cfg, jax.random.key(0)),
                            {**base, "model_config": dataclasses.asdict(tiny_cfg)})
    with pytest.raises(CheckpointError, match="model_config differs") as e:
        serve.Engine.from_checkpoint(tiny, run.meta)
    wanted = checkpoints.read_metadata(run.meta)["model_config"]
    for field, value in dataclasses.asdict(tiny_cfg).items():  # each differing field, by name
        assert (f"{field}: {value!r} -> {wanted[field]!r}" in str(e.value)) == (
            value != wanted[field]), field
    other = str(tmp_path / "other")
    params = jax.tree.map(lambda x: x * 1.01, checkpoints.load_params(run.pretrain))
    checkpoints.save_params(other, params, {**base, "model_config": source["model_config"]})
    for method_run in (run.meta, run.ascent):
        with pytest.raises(CheckpointError, match="prepared on") as e:
            serve.Engine.from_checkpoint(other, method_run)
        assert other in str(e.value) and method_run in str(e.value)


def test_output_is_never_silently_replaced(run, first, tmp_path):
    again = str(tmp_path / "again")
    shutil.copytree(first.out, again)
    with pytest.raises(ConfigError, match="--overwrite"):
        serve.serve_request(run.meta, run.portraits[:1], again, identities=[run.identity])
    receipt = serve.serve_request(run.meta, run.portraits[:1], again, identities=[run.identity],
                                  overwrite=True)
    assert isinstance(receipt, serve.Receipt)
    assert read_receipt(again) == receipt.to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        receipt.method = "other"
    with pytest.raises(ConfigError, match="not the output of an earlier request"):
        serve.serve_request(run.meta, run.portraits[:1], run.pretrain,
                            identities=[run.identity], overwrite=True)
    assert checkpoints.is_finished(run.pretrain)


def test_a_failed_overwrite_keeps_the_earlier_output(run, first, tmp_path, monkeypatch):
    """--overwrite replaces an earlier output only once the new one is complete: a request that
    fails while writing leaves the earlier output as it was and nothing of its own."""
    again = str(tmp_path / "again")
    shutil.copytree(first.out, again)
    before = {p: open(os.path.join(dp, p), "rb").read() for dp, _, names in os.walk(again)
              for p in names}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serve.request.files, "save_json", full_disk)
    with pytest.raises(OSError, match="No space"):
        serve.serve_request(run.meta, run.portraits[:1], again, identities=[run.identity],
                            overwrite=True)
    after = {p: open(os.path.join(dp, p), "rb").read() for dp, _, names in os.walk(again)
             for p in names}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["again"]
    monkeypatch.undo()
    serve.serve_request(run.meta, run.portraits[:1], again, identities=[run.identity],
                        overwrite=True)
    metadata = checkpoints.read_metadata(again)
    with open(os.path.join(again, checkpoints.METADATA_FILE)) as f:
        assert json.load(f)["run_dir"] == os.path.abspath(again)  # not the temporary name
    assert metadata["status"] == "done" and sorted(os.listdir(tmp_path)) == ["again"]


def test_parse_labels():
    assert serve.parse_labels(["0,1,1", "1,0,0"], "multilabel", 3) == [[0, 1, 1], [1, 0, 0]]
    assert serve.parse_labels(["2"], "classification", 8) == [2]
    with pytest.raises(ConfigError, match="integers"):
        serve.parse_labels(["0,x"], "multilabel", 2)
    with pytest.raises(ConfigError, match="one class index"):
        serve.parse_labels(["0,1"], "classification", 8)


def test_one_model_config_comparison():
    """Serving and the study's reuse check compare architectures with the same function."""
    from oneshui_jax.study import reuse

    stored = dataclasses.asdict(vit.ViTConfig.preset("vit_tiny_test", num_classes=5))
    wanted = {**stored, "width": 64, "num_heads": 4}
    del wanted["in_chans"]
    expected = ["in_chans: 3 -> '(absent)'", "num_heads: 2 -> 4", "width: 32 -> 64"]
    assert checkpoints.model_config_differences(stored, wanted) == expected
    assert checkpoints.model_config_differences(stored, dict(stored)) == []
    assert reuse.differences({"model": stored, "seed": 0}, {"model": wanted, "seed": 1}) == [
        f"model.{line}" for line in expected] + ["seed: 0 -> 1"]
