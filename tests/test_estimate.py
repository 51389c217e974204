"""The GPU-time estimate of a study (``oneshui_jax/study/estimate.py``, ``cli/estimate.py``):
each stage's count of images against a hand count, the architecture's arithmetic against the
published ViT-B/16 figure, the rates read from a GPU check's files, errors as one line."""

import json
import math
import os

import pytest

from oneshui_jax.cli import config_flags
from oneshui_jax.cli import estimate as estimate_cli
from oneshui_jax.models import vit
from oneshui_jax.study import estimate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(dataset="mufac", n=10, *overrides):
    return config_flags.load_config([f"--config={REPO}/configs/{dataset}.py:method=all,N={n}",
                                     *overrides])


@pytest.fixture
def rates(tmp_path):
    """A GPU check's two files with round numbers: 1000 training images/s (xla), 0.5 s per
    meta-step."""
    with open(tmp_path / "attention_variants.json", "w") as f:
        json.dump({"rows": [{"attention": "xla", "images_per_s": 1000.0},
                            {"attention": "cudnn", "images_per_s": 2000.0}]}, f)
    with open(tmp_path / "meta_step.json", "w") as f:
        json.dump({"results": {"streamed": {"device": "a GPU", "step_s": 0.5}}}, f)
    return estimate.Rates.from_results(str(tmp_path))


def test_vit_b16_forward_is_the_published_17_6_gmacs():
    assert estimate.forward_macs(estimate.BENCHMARKED) / 1e9 == pytest.approx(17.56, rel=0.01)
    # PGU's stride-1 windows: (224 - 16 + 1)^2 windows of 768 inputs, more than the 196 patches.
    stride1 = estimate.covariance_macs(estimate.BENCHMARKED, "stride1")
    patches = estimate.covariance_macs(estimate.BENCHMARKED, "patches")
    assert stride1 - patches == pytest.approx((209 ** 2 - 196) * 768 ** 2)
    small = vit.ViTConfig(image_size=32, patch_size=8, width=16, depth=1, num_heads=1,
                          mlp_ratio=2.0, num_classes=3)
    # 16 patches x 192 x 16, then 17 tokens x (4 x 16 x 16 + 2 x 16 x 32) + 2 x 17^2 x 16, head.
    assert estimate.forward_macs(small) == 16 * 192 * 16 + 17 * (1024 + 1024) + 2 * 289 * 16 + 48


def test_each_stage_counts_the_images_it_passes(rates):
    config = _config("mufac", 10)
    sizes = estimate.SIZES["mufac"]
    assert (sizes.train_identities, sizes.train, sizes.val, sizes.test) == (725, 7840, 2620, 2608)
    per_id = 7840 / 725
    forget, retain = 10 * per_id, 7840 - 10 * per_id
    evaluation = (7840 + 2620 + 2608) / 3
    e = config.train.epochs
    images = estimate.stage_images(config, sizes)
    assert list(images) == list(config.stages)  # no attacks without RMIA
    assert images["pretrain"] == pytest.approx(e * (7840 + 2620 / 3) + evaluation)
    assert images["retrain"] == pytest.approx(e * (retain + 2620 / 3) + evaluation)
    assert images["retrain_2"] == images["retrain"]  # the same data, another seed
    s = config.scrub
    assert images["scrub"] == pytest.approx(
        4 / 3 * (s.epochs * retain + s.forgetting_epochs * forget) + evaluation)
    assert images["bad_teacher"] == pytest.approx(
        5 / 3 * config.bad_teacher.epochs * 7840 + evaluation)
    assert images["ssd"] == pytest.approx(7840 + evaluation)
    assert images["lipschitz"] == pytest.approx(evaluation)
    m = config.meta_unlearn
    batches = math.ceil(m.num_identities_simulation * (per_id - 1) / m.batch_size)
    steps = m.epochs * math.ceil(725 / m.num_identities_simulation) * batches / 5
    assert estimate.meta_steps(config, sizes) == pytest.approx(steps)
    seconds = estimate.estimate(config, rates)
    assert seconds["meta_unlearn"] == pytest.approx(evaluation / 1000 + 0.5 * steps)
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"))
    faster = estimate.estimate(_config("mufac", 10, "--config.train.attention=cudnn"), rates)
    assert faster["pretrain"] == pytest.approx(seconds["pretrain"] / 2)


def test_rmia_adds_every_method_again_and_the_signal_passes(rates):
    plain = _config("celebahq", 20)
    attacked = _config("celebahq", 20, "--config.mia.rmia=True", "--config.mia.rmia_held_out=False")
    sizes = estimate.SIZES["celebahq"]
    without, with_rmia = (estimate.stage_images(c, sizes) for c in (plain, attacked))
    methods = [s for s in plain.stages if s not in ("pretrain", "retrain", "retrain_2")]
    passes = (2 + 2 * len(methods)) * attacked.mia.passes * (18000 + 6004) / 3
    assert with_rmia["attacks"] == pytest.approx(sum(without[m] for m in methods) + passes)
    assert estimate.meta_steps(attacked, sizes) == 2 * estimate.meta_steps(plain, sizes)
    # CelebA's subsampled passes (Q6): 30,000 of z and 7,000 of val per pass.
    celeba = estimate.stage_images(_config("celeba", 5, "--config.mia.rmia=True",
                                           "--config.mia.rmia_held_out=False"),
                                   estimate.SIZES["celeba"])
    celeba_plain = estimate.stage_images(_config("celeba", 5), estimate.SIZES["celeba"])
    assert celeba["attacks"] - sum(celeba_plain[m] for m in methods) == pytest.approx(
        (2 + 2 * len(methods)) * 8 * 37_000 / 3)


def test_the_held_out_selection_adds_a_calibration_model_and_its_passes():
    sizes = estimate.SIZES["mufac"]
    off, on = (estimate.stage_images(_config("mufac", 10, "--config.mia.rmia=True",
                                             f"--config.mia.rmia_held_out={v}"), sizes)
               for v in (False, True))
    config = _config("mufac", 10)
    per_id = 7840 / 725
    retain_without = 7840 - 2 * 10 * per_id  # neither the forget nor the held-out people
    training = config.train.epochs * (retain_without + 2620 / 3) + (7840 + 2620 + 2608) / 3
    passes = config.mia.passes * (7840 + 2620) / 3
    assert on["attacks"] - off["attacks"] == pytest.approx(training + passes)


def test_what_the_estimate_cannot_cover_is_one_clear_error(rates, tmp_path):
    with pytest.raises(ValueError, match="no split sizes for dataset 'synthfaces'"):
        estimate.estimate(config_flags.load_config([f"--config={REPO}/configs/synthfaces.py"]),
                          rates)
    with pytest.raises(ValueError, match="measured vit_base_patch16_224, not vit_small"):
        estimate.estimate(_config("mufac", 10, "--config.model.name=vit_small_demo"), rates)
    with pytest.raises(ValueError, match=f"{tmp_path}/none: expected attention_variants.json"):
        estimate.Rates.from_results(str(tmp_path / "none"))
    assert estimate.hours(5400) == "≥ 1.5 h" and estimate.hours(20) == "≥ 1 min"


def test_the_command_prints_minutes_per_stage_or_one_error_line(capsys):
    args = [f"--config={REPO}/configs/mufac.py:method=all,N=5",
            f"--rates={os.path.join(REPO, estimate_cli.DEFAULT_RATES)}"]
    assert estimate_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| pretrain |" in out and "| total |" in out and "NVIDIA H200" in out
    assert out.strip().splitlines()[-1].startswith("estimated: ≥ ")
    assert estimate_cli.main([f"--config={REPO}/configs/synthfaces.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no split sizes") and len(err.strip().splitlines()) == 1
