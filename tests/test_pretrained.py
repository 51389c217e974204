"""Pretrained ImageNet weights from local files (SPEC.md section 3: timm vit_base_patch16_224,
augreg2_in21k_ft_in1k): timm safetensors, Google npz (both namings), our run directories, the
pos_embed / head adaptations, the errors and the convert CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from oneshui_jax import checkpoints
from oneshui_jax.errors import CheckpointError
from oneshui_jax.models import pretrained, vit

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NPZ = os.path.join(FIXTURES, "timm_tiny_vit.npz")
SAFETENSORS = os.path.join(FIXTURES, "timm_tiny_vit.safetensors")
TINY = vit.ViTConfig(image_size=32, patch_size=8, width=48, depth=2, num_heads=3, num_classes=5)
ARCH = ["--width", "48", "--depth", "2", "--num_heads", "3", "--patch_size", "8"]


def _fixture_cfg() -> vit.ViTConfig:
    c = json.loads(str(np.load(NPZ)["meta"]))["config"]
    return vit.ViTConfig(image_size=c["img_size"], patch_size=c["patch_size"], width=c["embed_dim"],
                         depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
                         num_classes=c["num_classes"])


def _flat(params) -> dict[str, np.ndarray]:
    return {name: np.asarray(leaf) for name, leaf in checkpoints.named_leaves(params)}


def _assert_same(a, b, skip=()):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for name in fa:
        if name not in skip:
            np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def test_timm_fixture_reproduces_timm_logits():
    cfg = _fixture_cfg()
    state_dict = pretrained.load_timm_safetensors(SAFETENSORS)
    assert set(state_dict) == set(vit.timm_state_dict_keys(cfg))
    report: list[str] = []
    params = pretrained.load_pretrained(SAFETENSORS, cfg, rng=jax.random.key(0), report=report)
    assert report == []
    data = np.load(NPZ)
    logits, _ = vit.apply(cfg, params, data["images_nhwc"])
    np.testing.assert_allclose(np.asarray(logits), data["logits"], atol=1e-5, rtol=0)


def _to_google(params, cfg: vit.ViTConfig, big_vision: bool) -> dict[str, np.ndarray]:
    """Inverse mapping, written independently: our params -> Google checkpoint names."""
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    f = _flat(params)
    w = {"embedding/kernel": f["patch_embed.proj.kernel"],
         "embedding/bias": f["patch_embed.proj.bias"], "cls": f["cls_token"],
         "Transformer/encoder_norm/scale": f["norm.scale"],
         "Transformer/encoder_norm/bias": f["norm.bias"],
         "head/kernel": f["head.kernel"], "head/bias": f["head.bias"]}
    w["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = \
        f["pos_embed"]
    ln2, mha, mlp = ("LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0") \
        if big_vision else ("LayerNorm_2", "MultiHeadDotProductAttention_1", "MlpBlock_3")
    for i in range(cfg.depth):
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", ln2)):
            w[f"{b}{theirs}/scale"] = f[f"{o}{ours}.scale"]
            w[f"{b}{theirs}/bias"] = f[f"{o}{ours}.bias"]
        kernel, bias = f[f"{o}attn.qkv.kernel"], f[f"{o}attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w[f"{b}{mha}/{name}/kernel"] = kernel[:, j * d:(j + 1) * d].reshape(d, h, hd)
            w[f"{b}{mha}/{name}/bias"] = bias[j * d:(j + 1) * d].reshape(h, hd)
        w[f"{b}{mha}/out/kernel"] = f[f"{o}attn.proj.kernel"].reshape(h, hd, d)
        w[f"{b}{mha}/out/bias"] = f[f"{o}attn.proj.bias"]
        for r in range(2):
            w[f"{b}{mlp}/Dense_{r}/kernel"] = f[f"{o}mlp.fc{r + 1}.kernel"]
            w[f"{b}{mlp}/Dense_{r}/bias"] = f[f"{o}mlp.fc{r + 1}.bias"]
    return w


@pytest.mark.parametrize("big_vision", [False, True], ids=["vision_transformer", "big_vision"])
@pytest.mark.slow
def test_google_npz_round_trip(tmp_path, big_vision):
    params = vit.init_params(TINY, jax.random.key(1))
    path = str(tmp_path / "vit.npz")
    np.savez(path, **_to_google(params, TINY, big_vision))
    _assert_same(pretrained.load_pretrained(path, TINY, rng=jax.random.key(0)), params)


def test_google_pre_logits_refused(tmp_path):
    w = _to_google(vit.init_params(TINY, jax.random.key(1)), TINY, big_vision=False)
    w["pre_logits/kernel"] = np.zeros((48, 48), np.float32)
    path = str(tmp_path / "vit.npz")
    np.savez(path, **w)
    with pytest.raises(CheckpointError, match="pre_logits.*lossy"):
        pretrained.load_google_npz(path)


def test_new_head_and_resized_pos_embed():
    source = pretrained.load_pretrained(SAFETENSORS, TINY, rng=jax.random.key(0))
    cfg = vit.ViTConfig(image_size=64, patch_size=8, width=48, depth=2, num_heads=3,
                        num_classes=1000)
    report: list[str] = []
    params = pretrained.load_pretrained(SAFETENSORS, cfg, rng=jax.random.key(3), report=report)
    assert len(report) == 2 and "grid 4x4 to 8x8" in report[0] and "head" in report[1]
    _assert_same(params, source, skip=("head.kernel", "head.bias", "pos_embed"))
    kernel = np.asarray(params["head"]["kernel"])
    # timm's head init, trunc_normal_(std=.02) truncated at +-2 in absolute units: a normal of
    # std 0.02 (about 4.6% of 48,000 values beyond 2 std; a truncation at 2 std leaves none)
    assert kernel.shape == (48, 1000) and abs(kernel.std() - 0.02) < 0.001
    assert 0.04 < np.mean(np.abs(kernel) > 0.04) < 0.052 and np.abs(kernel).max() < 0.15
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(1000))

    pos, src = np.asarray(params["pos_embed"]), np.asarray(source["pos_embed"])
    assert pos.shape == (1, 65, 48)
    np.testing.assert_array_equal(pos[:, 0], src[:, 0])
    # bilinear, half-pixel centres, clamped edges (torch align_corners=False), separably in numpy
    coords = np.clip((np.arange(8) + 0.5) * 4 / 8 - 0.5, 0, 3)
    lo = np.floor(coords).astype(int)
    hi, frac = np.minimum(lo + 1, 3), coords - np.floor(coords)
    interp = np.zeros((8, 4))
    np.add.at(interp, (np.arange(8), lo), 1 - frac)
    np.add.at(interp, (np.arange(8), hi), frac)
    grid = src[0, 1:].reshape(4, 4, 48)
    expected = np.einsum("yi,xj,ijd->yxd", interp, interp, grid).reshape(64, 48)
    np.testing.assert_allclose(pos[0, 1:], expected, atol=1e-6)


def test_same_shapes_keep_the_head():
    params = pretrained.load_pretrained(SAFETENSORS, TINY, rng=jax.random.key(0))
    state_dict = pretrained.load_timm_safetensors(SAFETENSORS)
    np.testing.assert_array_equal(params["head"]["kernel"], state_dict["head.weight"].T)


def test_one_error_names_every_problem(tmp_path):
    state_dict = pretrained.load_timm_safetensors(SAFETENSORS)
    del state_dict["norm.bias"]
    state_dict["extra_token"] = np.zeros(3, np.float32)
    state_dict["blocks.1.mlp.fc2.bias"] = np.zeros(7, np.float32)
    path = str(tmp_path / "broken.safetensors")
    save_file(state_dict, path)
    with pytest.raises(CheckpointError) as e:
        pretrained.load_pretrained(path, TINY, rng=jax.random.key(0))
    message = str(e.value)
    for part in (path, "missing: norm.bias", "unexpected: extra_token",
                 "mis-shaped: blocks.1.mlp.fc2.bias (7,) (expected (48,))"):
        assert part in message


def test_missing_file_says_what_to_download(tmp_path):
    path = str(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="vit_base_patch16_224.augreg2_in21k_ft_in1k.*"
                                              "--config.model.init") as e:
        pretrained.load_pretrained(path, TINY, rng=jax.random.key(0))
    assert path in str(e.value)


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oneshui_jax.models.convert", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_convert_cli_writes_a_run_directory(tmp_path):
    out = str(tmp_path / "imagenet")
    result = _convert(SAFETENSORS, out, *ARCH)
    assert result.returncode == 0, result.stderr
    params = checkpoints.load_params(out)
    assert f"params hash: {checkpoints.params_hash(params)}" in result.stdout
    assert "32 tensors" in result.stdout and "no adaptation" in result.stdout
    _assert_same(params, pretrained.load_pretrained(SAFETENSORS, TINY, rng=jax.random.key(0)))
    metadata = checkpoints.read_metadata(out)
    assert metadata["adaptations"] == [] and metadata["splits"] == {}
    assert metadata["config"]["model"]["num_classes"] == 5

    # run directories are inputs too; OUT existing is refused and leaves it untouched
    again = _convert(out, out, *ARCH, "--num_classes", "7")
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert "already exists" in again.stderr and again.stdout == ""
    assert checkpoints.params_hash(checkpoints.load_params(out)) == metadata["params_hash"]
    assert sorted(os.listdir(tmp_path)) == ["imagenet"]


@pytest.mark.slow
def test_study_starts_from_config_model_init(tmp_path):
    """``config.model.init`` feeds the study's initial parameters; a missing file is one clear
    error before any training."""
    from oneshui_jax import study

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import synthfaces as synthfaces_config

    config = synthfaces_config.get_config("N=5,size=small")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.num_threads = 0
    config.model.init = str(tmp_path / "missing.safetensors")
    ctx = study.prepare(config)
    with pytest.raises(CheckpointError, match="config.model.init"):
        study.initial_params(ctx)
    config.model.init = ""
    assert vit.count_params(study.initial_params(ctx)) == vit.count_params(
        vit.init_params(ctx.model_cfg, jax.random.key(0)))


def test_run_directories_convert_and_start_a_study(tmp_path, synthfaces_tfds, capsys):
    """A run directory is an input of ``convert`` (here with a new head) and of the study's
    ``config.model.init``: the study's initial parameters are the converted weights, with a head
    for the dataset's 40 attributes drawn from the seed."""
    import dataclasses

    from oneshui_jax import study
    from oneshui_jax.cli import convert

    first, second = str(tmp_path / "timm"), str(tmp_path / "seven")
    assert convert.main([SAFETENSORS, first, *ARCH]) == 0
    assert convert.main([first, second, *ARCH, "--num_classes", "7"]) == 0
    assert "head" in capsys.readouterr().out
    source, converted = checkpoints.load_params(first), checkpoints.load_params(second)
    _assert_same(source, converted, skip=("head.kernel", "head.bias"))
    assert converted["head"]["kernel"].shape == (48, 7)
    assert not np.array_equal(converted["head"]["kernel"][:, :5], source["head"]["kernel"])

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import synthfaces as synthfaces_config

    config = synthfaces_config.get_config("N=5,size=small")
    config.data.tfds_dir = synthfaces_tfds
    config.data.num_threads = 0
    config.model.init = second
    ctx = study.prepare(config)
    ctx = dataclasses.replace(ctx, model_cfg=dataclasses.replace(TINY, num_classes=40))
    init = study.initial_params(ctx)
    _assert_same(init, converted, skip=("head.kernel", "head.bias"))
    assert init["head"]["kernel"].shape == (48, 40)
    assert float(np.abs(init["head"]["bias"]).max()) == 0.0
    again = study.initial_params(ctx)
    np.testing.assert_array_equal(init["head"]["kernel"], again["head"]["kernel"])  # the seed's


# --------------------------------------------------------------------------------------------
# convert infers the architecture from the file


WIDE = vit.ViTConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=1, mlp_ratio=4.0,
                     num_classes=5)
DEEP = vit.ViTConfig(image_size=24, patch_size=4, width=128, depth=3, num_heads=2, mlp_ratio=2.5,
                     num_classes=7)


def _write_timm(path, cfg: vit.ViTConfig, seed: int = 0) -> dict:
    """Random params of ``cfg`` saved as a timm safetensors file; returns the params."""
    params = vit.init_params(cfg, jax.random.key(seed))
    save_file({k: np.ascontiguousarray(v) for k, v in vit.to_timm_state_dict(params).items()},
              str(path))
    return params


def _converted(capsys, *args: str) -> tuple[int, str, str]:
    from oneshui_jax.cli import convert

    status = convert.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _model_config(run_dir: str) -> dict:
    model = dict(checkpoints.read_metadata(run_dir)["config"]["model"])
    model.pop("name")
    return model


def test_timm_key_table_is_shared_both_ways():
    """timm_to_ours (pretrained) inverts to_timm_state_dict (vit): one table, one layout."""
    params = vit.init_params(DEEP, jax.random.key(2))
    ours = pretrained.timm_to_ours(vit.to_timm_state_dict(params))
    flat = _flat(params)
    assert set(ours) == set(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    bad = {"head.weight": np.zeros((2, 3, 4), np.float32), "extra": np.zeros(2, np.float32)}
    assert set(pretrained.timm_to_ours(bad)) == {"head.weight", "extra"}  # kept as unexpected


@pytest.mark.parametrize("cfg", [vit.ViTConfig(), WIDE, DEEP, TINY,
                                 # int(448 * (61 / 448)) is 60; the inferred ratio gives 61
                                 vit.ViTConfig(width=448, num_heads=7, depth=1,
                                               mlp_ratio=61.5 / 448)],
                         ids=["vit_b16", "wide", "deep", "tiny", "odd_mlp"])
def test_infer_architecture_from_shapes(cfg):
    abstract = jax.eval_shape(lambda: vit.init_params(cfg, jax.random.key(0)))
    found = pretrained.infer_architecture(dict(checkpoints.named_leaves(abstract)), "x")
    expected = dataclasses.asdict(cfg)
    del expected["num_heads"]  # not in the shapes
    ratio = found.pop("mlp_ratio"), expected.pop("mlp_ratio")
    assert found == expected
    assert int(cfg.width * ratio[0]) == cfg.mlp_hidden
    if cfg.mlp_ratio in (2.5, 4.0):
        assert ratio[0] == ratio[1]


@pytest.mark.parametrize("cfg", [WIDE, DEEP], ids=["wide", "deep"])
def test_convert_without_flags_infers_the_architecture(tmp_path, capsys, cfg):
    source = tmp_path / "model.safetensors"
    params = _write_timm(source, cfg)
    out = str(tmp_path / "run")
    status, stdout, err = _converted(capsys, str(source), out)
    assert status == 0, err
    assert _model_config(out) == dataclasses.asdict(cfg)
    _assert_same(checkpoints.load_params(out), params)
    assert f"num_heads {cfg.num_heads} (width / 64" in stdout
    assert f"image_size {cfg.image_size} (from the file)" in stdout
    assert "no adaptation" in stdout

    # a Google .npz of the same model and the written run directory infer the same
    npz = str(tmp_path / "model.npz")
    np.savez(npz, **_to_google(params, cfg, big_vision=True))
    for i, source_path in enumerate((npz, out)):
        again = str(tmp_path / f"again{i}")
        status, _, err = _converted(capsys, source_path, again)
        assert status == 0, err
        assert _model_config(again) == dataclasses.asdict(cfg)
        _assert_same(checkpoints.load_params(again), params)


def test_convert_num_heads_defaults_to_width_over_64_and_is_overridable(tmp_path, capsys):
    source = str(tmp_path / "model.safetensors")
    _write_timm(source, DEEP)
    assert _converted(capsys, source, str(tmp_path / "default"))[0] == 0
    assert _model_config(str(tmp_path / "default"))["num_heads"] == 128 // 64
    status, stdout, err = _converted(capsys, source, str(tmp_path / "four"), "--num_heads", "4")
    assert status == 0, err
    assert _model_config(str(tmp_path / "four")) == dataclasses.asdict(
        dataclasses.replace(DEEP, num_heads=4))
    assert "num_heads 4 (--num_heads)" in stdout
    # flags that agree with the file and adaptations keep working
    status, _, err = _converted(capsys, source, str(tmp_path / "flags"), "--width", "128",
                                "--depth", "3", "--patch_size", "4", "--mlp_ratio", "2.5",
                                "--num_classes", "3", "--image_size", "32")
    assert status == 0, err
    assert _model_config(str(tmp_path / "flags")) == dataclasses.asdict(
        dataclasses.replace(DEEP, num_classes=3, image_size=32))


def _assert_refused(capsys, tmp_path, args, *parts):
    before = sorted(os.listdir(tmp_path))
    status, stdout, err = _converted(capsys, *args, str(tmp_path / "out"))
    assert status == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.parametrize("flags, parts", [
    (["--width", "64"], ["--width gives width 64", "give 128"]),
    (["--depth", "2"], ["--depth gives depth 2", "give 3"]),
    (["--patch_size", "8"], ["--patch_size gives patch_size 8", "give 4"]),
    (["--mlp_ratio", "4"], ["--mlp_ratio gives mlp_ratio 4.0", "give 2.5"]),
    (["--model", "vit_base_patch16_224"], ["--model vit_base_patch16_224 gives width 768",
                                           "depth 12", "patch_size 16", "mlp_ratio 4.0"]),
    (["--num_heads", "3"], ["width (128) must be divisible", "num_heads (3)"]),
], ids=["width", "depth", "patch", "mlp", "preset", "heads"])
def test_convert_refuses_a_flag_that_contradicts_the_file(tmp_path, capsys, flags, parts):
    source = str(tmp_path / "model.safetensors")
    _write_timm(source, DEEP)
    _assert_refused(capsys, tmp_path, [source, *flags], *parts)


def test_convert_refuses_what_is_not_a_vit(tmp_path, capsys):
    cnn = str(tmp_path / "cnn.safetensors")
    save_file({"conv1.weight": np.zeros((8, 3, 3, 3), np.float32),
               "fc.weight": np.zeros((10, 8), np.float32)}, cnn)
    _assert_refused(capsys, tmp_path, [cnn], "is not a ViT", "patch_embed.proj", "conv1.weight")

    state_dict = vit.to_timm_state_dict(vit.init_params(WIDE, jax.random.key(0)))
    no_class_token = dict(state_dict, pos_embed=np.zeros((1, 16, 64), np.float32))
    path = str(tmp_path / "no_cls.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in no_class_token.items()}, path)
    _assert_refused(capsys, tmp_path, [path], "one class token", "(1, 16, 64)")

    headless = {k: np.ascontiguousarray(v) for k, v in state_dict.items()
                if not k.startswith("head.")}
    path = str(tmp_path / "headless.safetensors")
    save_file(headless, path)
    _assert_refused(capsys, tmp_path, [path], "classification head")

    # width 48 (the fixture) is no multiple of 64: heads cannot be inferred
    _assert_refused(capsys, tmp_path, [SAFETENSORS], "cannot infer num_heads", "--num_heads")
