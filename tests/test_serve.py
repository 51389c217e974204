"""Serving deletion requests (``oneshui_jax.serve``, ``python -m oneshui_jax.unlearn``).

One small study (pretrain + meta_unlearn, one epoch each) is built per module; requests are served
on it end to end through the command line and in process.
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

from oneshui_jax import checkpoints, serve, study
from oneshui_jax.data import synthfaces, transforms
from oneshui_jax.errors import CheckpointError, ConfigError, DataError
from oneshui_jax.models import meta_loss, vit
from oneshui_jax.unlearn import meta_unlearn as mu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import synthfaces as synthfaces_config  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The small study's pretrain and meta_unlearn runs, and two PNG portraits of a forget id."""
    root = str(tmp_path_factory.mktemp("serve"))
    config = synthfaces_config.get_config("N=5,size=small")
    config.data.tfds_dir = os.path.join(root, "tfds")
    config.workdir = os.path.join(root, "work")
    config.checkpoint_dir = os.path.join(root, "ckpt")
    config.stages = ("pretrain", "meta_unlearn")
    config.train.epochs = 1
    config.meta_unlearn.epochs = 1
    config.data.num_threads = 0
    config.progress = False
    study.run(config)

    def run_dir(stage):
        return checkpoints.run_dir(config.checkpoint_dir, "synthfaces", "vit_small_demo", stage,
                                   5, 0)

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
    return types.SimpleNamespace(root=root, pretrain=run_dir("pretrain"),
                                 meta=run_dir("meta_unlearn"), identity=identity,
                                 portraits=portraits, metadata=metadata)


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "oneshui_jax.unlearn", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def first(run):
    """One request from the meta_unlearn run directory, through the command line."""
    out = os.path.join(run.root, "request_1")
    code, stdout, stderr = finish(cli(
        "--checkpoint", run.meta, "--method", "meta_unlearn", "--portrait", run.portraits[0],
        "--portrait", run.portraits[1], "--identity", str(run.identity), "--out", out,
        "--request_id", "req-1"))
    assert code == 0, stderr
    receipt = json.load(open(os.path.join(out, serve.RECEIPT_FILE)))
    return types.SimpleNamespace(out=out, stdout=stdout, receipt=receipt)


def read_images(paths):
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_request_writes_model_and_receipt(run, first):
    r = first.receipt
    assert r["request_id"] == "req-1" and r["method"] == "meta_unlearn"
    assert [p["sha256"] for p in r["portraits"]] == [
        hashlib.sha256(open(p, "rb").read()).hexdigest() for p in run.portraits]
    before = checkpoints.read_metadata(run.pretrain)["params_hash"]
    written = checkpoints.load_params(first.out)  # verifies the recorded hash
    assert r["params_hash_before"] == before == run.metadata["base_params_hash"]
    assert r["params_hash_after"] == checkpoints.params_hash(written) != before
    assert r["identities"] == [run.identity, run.identity]
    assert r["labels_predicted"] is True and np.shape(r["labels"]) == (2, 24)
    expected = run.metadata["meta_unlearn"]
    assert r["hyperparameters"]["meta_lr"] == expected["meta_lr"]
    assert r["hyperparameters"]["forget_epochs"] == expected["forget_epochs"] == 1
    assert r["hyperparameters"]["meta_loss"] == run.metadata["meta_loss"]
    assert r["versions"] == checkpoints.library_versions()
    assert set(r["timings"]) >= {"load_s", "compile_s", "compute_s"}
    assert r["source_checkpoint"] == run.pretrain and r["meta_loss_run_dir"] == run.meta
    metadata = checkpoints.read_metadata(first.out)
    assert metadata["stage"] == "request" and metadata["requests"] == ["req-1"]
    assert metadata["splits"] == run.metadata["splits"]
    assert "req-1" in first.stdout and "compile" in first.stdout


def test_written_params_equal_direct_unlearn(run, first):
    """The CLI's model is ``meta_unlearn.unlearn`` on the portraits, computed here in process."""
    model_cfg = vit.ViTConfig(**run.metadata["model_config"])
    ml_cfg = meta_loss.MetaLossConfig(**run.metadata["meta_loss"])
    cfg = mu.MetaUnlearnConfig(**run.metadata["meta_unlearn"])
    theta = checkpoints.load_params(run.pretrain)
    phi = checkpoints.load_tree(run.meta, "meta_loss", jax.eval_shape(
        lambda: meta_loss.init_params(ml_cfg, jax.random.key(0))))
    images = transforms.preprocess_eval(read_images(run.portraits), model_cfg.image_size)
    predicted = np.asarray(vit.apply(model_cfg, theta, images)[0]) > 0  # the named deviation
    np.testing.assert_array_equal(predicted, np.asarray(first.receipt["labels"], bool))
    row = run.metadata["splits"]["train"].index(run.identity)
    support = {"image": images, "label": predicted.astype(np.uint8),
               "row": np.full(2, row, np.int32), "mask": np.ones(2, bool)}
    expected = mu.unlearn(mu.make_unlearn_step(model_cfg, ml_cfg, cfg.meta_lr), theta, phi,
                          jax.tree.map(jax.numpy.asarray, support), cfg.forget_epochs)
    written = checkpoints.load_params(first.out)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), written,
                 expected)


def test_chained_request_needs_no_meta_loss_flag(run, first):
    out = os.path.join(run.root, "request_2")
    code, stdout, stderr = finish(cli("--checkpoint", first.out, "--portrait", run.portraits[0],
                                      "--identity", str(run.identity), "--out", out))
    assert code == 0, stderr
    receipt = json.load(open(os.path.join(out, serve.RECEIPT_FILE)))
    assert receipt["params_hash_before"] == first.receipt["params_hash_after"]
    assert receipt["meta_loss_run_dir"] == run.meta and receipt["source_checkpoint"] == first.out
    metadata = checkpoints.read_metadata(out)
    assert metadata["requests"] == ["req-1", receipt["request_id"]]
    assert metadata["base_params_hash"] == run.metadata["base_params_hash"]


def test_errors_are_one_line_and_write_nothing(run, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(open(run.portraits[0], "rb").read()[:60])
    outs = {name: str(tmp_path / name) for name in ("corrupt", "empty", "no_meta", "unknown")}
    cases = {  # arguments, what the message must name
        "corrupt": (["--checkpoint", run.meta, "--portrait", str(corrupt), "--identity",
                     str(run.identity)], [str(corrupt)]),
        "empty": (["--checkpoint", run.meta, "--identity", str(run.identity)], ["--portrait"]),
        "no_meta": (["--checkpoint", run.pretrain, "--portrait", run.portraits[0], "--identity",
                     str(run.identity)], [run.pretrain, "--meta_loss", "--config.stages"]),
        "unknown": (["--checkpoint", run.meta, "--portrait", run.portraits[0], "--identity",
                     "99999"], ["99999"]),
    }
    procs = {name: cli(*args, "--out", outs[name]) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        code, _, stderr = finish(proc)
        assert code != 0, name
        assert "error:" in stderr and "Traceback" not in stderr, (name, stderr)
        assert all(word in stderr for word in cases[name][1]), (name, stderr)
        assert not os.path.exists(outs[name]), name


def test_second_forget_reuses_the_compiled_step(run):
    unlearner = serve.Unlearner.from_checkpoint(run.meta)
    images = read_images(run.portraits)
    params_1, timings_1 = unlearner.forget(images, run.identity)
    compiled = unlearner.cache_size
    params_2, timings_2 = unlearner.forget(images, run.identity)
    assert timings_1["compile_s"] > 0 and timings_2["compile_s"] == 0
    assert unlearner.cache_size == compiled == 2  # label prediction + unlearning step
    assert checkpoints.params_hash(params_1) == checkpoints.params_hash(params_2)
    _, timings_3 = unlearner.forget(images[:1], [run.identity])  # another size compiles anew
    assert timings_3["compile_s"] > 0 and unlearner.cache_size == 4
    # labels given instead of predicted; wrong ones are refused
    request = unlearner.prepare(images, run.identity, labels=[[0] * 24, [1] * 24])
    assert not request.labels_predicted and request.labels.dtype == np.uint8
    with pytest.raises(ConfigError, match="portrait 1"):
        unlearner.prepare(images, run.identity, labels=[[0] * 24, [1] * 3])
    with pytest.raises(ConfigError, match="one per portrait"):
        unlearner.prepare(images, [run.identity] * 3)
    with pytest.raises(ConfigError, match="use_ids"):
        unlearner.prepare(images, None)
    with pytest.raises(DataError, match="empty request"):
        unlearner.prepare([], run.identity)


def test_model_of_another_architecture_or_lineage_is_refused(run, tmp_path):
    source = checkpoints.read_metadata(run.pretrain)
    base = {k: source[k] for k in ("config", "splits", "stage")}
    tiny_cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=24)
    tiny = str(tmp_path / "tiny")
    checkpoints.save_params(tiny, vit.init_params(tiny_cfg, jax.random.key(0)),
                            {**base, "model_config": dataclasses.asdict(tiny_cfg)})
    with pytest.raises(CheckpointError, match="model_config differs"):
        serve.Unlearner.from_checkpoint(tiny, run.meta)
    other = str(tmp_path / "other")
    params = jax.tree.map(lambda x: x * 1.01, checkpoints.load_params(run.pretrain))
    checkpoints.save_params(other, params, {**base, "model_config": source["model_config"]})
    with pytest.raises(CheckpointError, match="meta-trained on"):
        serve.Unlearner.from_checkpoint(other, run.meta)


def test_output_is_never_silently_replaced(run, first, tmp_path):
    again = str(tmp_path / "again")
    shutil.copytree(first.out, again)
    with pytest.raises(ConfigError, match="--overwrite"):
        serve.serve_request(run.meta, run.portraits[:1], again, identities=[run.identity])
    receipt = serve.serve_request(run.meta, run.portraits[:1], again, identities=[run.identity],
                                  overwrite=True)
    assert json.load(open(os.path.join(again, serve.RECEIPT_FILE))) == receipt
    with pytest.raises(ConfigError, match="not the output of an earlier request"):
        serve.serve_request(run.meta, run.portraits[:1], run.pretrain,
                            identities=[run.identity], overwrite=True)
    assert checkpoints.is_finished(run.pretrain)


def test_parse_labels():
    assert serve.parse_labels(["0,1,1", "1,0,0"], "multilabel", 3) == [[0, 1, 1], [1, 0, 0]]
    assert serve.parse_labels(["2"], "classification", 8) == [2]
    with pytest.raises(ConfigError, match="integers"):
        serve.parse_labels(["0,x"], "multilabel", 2)
    with pytest.raises(ConfigError, match="one class index"):
        serve.parse_labels(["0,1"], "classification", 8)
