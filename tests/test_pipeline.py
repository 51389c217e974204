"""Transforms (SPEC.md 1.4) and grain pipelines: shapes, determinism, resume, exact coverage."""

import jax
import numpy as np
import pytest

from oneshui_jax.data import pipeline, transforms


def _source(n=40, size=24, num_classes=5):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8),
             "label": rng.integers(0, 2, num_classes).astype(np.uint8), "identity": i // 4}
            for i in range(n)]


def test_normalize_maps_to_minus_one_one():
    x = np.array([0, 255, 51], np.uint8)
    np.testing.assert_allclose(transforms.normalize(x), [-1.0, 1.0, -0.6], atol=1e-6)


@pytest.mark.parametrize("shape,out", [((48, 40, 3), (32, 32)), ((20, 30, 3), (64, 50)),
                                       ((218, 178, 3), (224, 224))])
def test_eval_resize_is_bilinear_without_antialias(shape, out):
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    ours = transforms.resize_bilinear(x, *out)
    ref = np.asarray(jax.image.resize(x, (*out, 3), "linear", antialias=False))
    np.testing.assert_allclose(ours, ref, atol=5e-5)


def test_eval_resize_does_not_antialias_when_downsampling():
    # 9 -> 3 samples exactly at pixel centres 1, 4, 7: without antialiasing a 1-pixel
    # checkerboard keeps full contrast (an antialiased resize would blend neighbours).
    board = (np.indices((9, 9)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, -1)
    np.testing.assert_allclose(transforms.resize_bilinear(board, 3, 3), board[1::3, 1::3])
    blurred = np.asarray(jax.image.resize(board, (3, 3, 3), "linear", antialias=True))
    assert not np.allclose(blurred, board[1::3, 1::3])


def test_random_resized_crop_params_follow_torchvision_bounds():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = transforms.random_resized_crop_params(100, 80, rng)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
        areas.append(h * w / 8000)
        ratios.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # A tall, thin image falls back to a centre crop with the minimum ratio.
    class NoLuck:
        def uniform(self, lo, hi):
            return hi
        def integers(self, lo, hi):
            return lo
    assert transforms.random_resized_crop_params(100, 10, NoLuck()) == (43, 0, 13, 10)


def test_train_batches_shapes_and_determinism():
    src = _source()
    cfg = pipeline.PipelineConfig(image_size=16, batch_size=8, seed=3)
    idx = np.arange(0, 40, 2)
    ds = pipeline.train_dataset(src, idx, cfg, num_epochs=2)
    assert len(ds) == 2 * pipeline.steps_per_epoch(20, 8) == 6
    batches = list(pipeline.to_iterator(ds, cfg))
    b = batches[0]
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert b["label"].shape == (8, 5) and b["identity"].dtype == np.int32
    again = list(pipeline.to_iterator(pipeline.train_dataset(src, idx, cfg, 2), cfg))
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    # Each epoch covers every training example exactly once; the order changes between epochs.
    for epoch in range(2):
        chunk = batches[3 * epoch:3 * epoch + 3]
        seen = np.concatenate([c["index"][c["mask"]] for c in chunk])
        assert sorted(seen.tolist()) == idx.tolist()
    assert not np.array_equal(batches[0]["index"], batches[3]["index"])
    other = pipeline.PipelineConfig(image_size=16, batch_size=8, seed=4)
    first = next(pipeline.to_iterator(pipeline.train_dataset(src, idx, other, 1), other))
    assert not np.array_equal(first["index"], b["index"])


def test_iterator_state_resumes_exactly():
    src = _source()
    cfg = pipeline.PipelineConfig(image_size=16, batch_size=8, seed=0)
    ds = pipeline.train_dataset(src, np.arange(40), cfg, num_epochs=3)
    it = pipeline.to_iterator(ds, cfg)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.to_iterator(ds, cfg)
    resumed.set_state(state)
    for x in expected:
        y = next(resumed)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])


def test_eval_covers_every_example_once_with_mask():
    src = _source()
    cfg = pipeline.PipelineConfig(image_size=24, batch_size=16, num_threads=2)
    idx = np.array([3, 1, 4, 15, 9, 26, 5, 35, 8, 39, 7, 2, 0, 30, 11, 12, 13, 14, 21, 22, 33])
    batches = list(pipeline.eval_batches(src, idx, cfg))
    assert len(batches) == 2
    assert batches[-1]["mask"].sum() == len(idx) - 16 and not batches[-1]["mask"][-1]
    got = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(got, idx)  # in order, once each
    np.testing.assert_allclose(batches[0]["image"][0],
                               transforms.eval_transform(src[3]["image"], 24))


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        pipeline.eval_dataset(_source(), np.array([], np.int64),
                              pipeline.PipelineConfig(image_size=8, batch_size=4))


def test_eval_resize_matches_torch():
    torch = pytest.importorskip("torch", reason="torch (optional, heavy) is not installed")
    x = np.random.default_rng(0).uniform(-1, 1, (218, 178, 3)).astype(np.float32)
    for out in ((224, 224), (100, 50), (32, 32)):
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(2, 0, 1)[None], size=out, mode="bilinear",
            align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(transforms.resize_bilinear(x, *out), ref, atol=1e-5)


def test_augmented_pass_covers_every_example_once_in_order_with_fresh_crops():
    """RMIA's signal passes: the eval order and mask, the training augmentation, crops that
    differ between passes and repeat for the same pass."""
    src = _source()
    cfg = pipeline.PipelineConfig(image_size=16, batch_size=8, seed=3, crop_scale=(0.2, 1.0))
    idx = np.array([5, 0, 17, 33, 2, 9, 11, 39, 21, 4, 8])

    def run(k):
        return list(pipeline.to_iterator(pipeline.augmented_pass(src, idx, cfg, k), cfg))

    first, again, other = run(0), run(0), run(1)
    assert len(first) == 2
    order = np.concatenate([b["index"][b["mask"]] for b in first])
    np.testing.assert_array_equal(order, idx)  # each example once, in the given order
    assert first[1]["mask"].sum() == 3 and first[0]["image"].shape == (8, 16, 16, 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    evaluated = next(iter(pipeline.eval_batches(src, idx, cfg)))["image"]
    assert not np.allclose(first[0]["image"], evaluated)  # augmented, not the eval transform
