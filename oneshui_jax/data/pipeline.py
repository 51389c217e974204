"""grain input pipelines: training batches, evaluation batches, request batches.

Every batch is a dict of numpy arrays with a fixed shape::

    image     float32 [B, S, S, 3] in [-1, 1]
    label     the record's label (uint8 multi-hot [B, C] or int [B])
    identity  int32 [B]
    index     int32 [B]   position of the image in the dataset
    mask      bool [B]    False on padding

The last batch of an epoch (training, as the reference's ``drop_last=False``) or of an evaluation
split is padded to the full batch size and masked, so jit-compiled steps see one shape and every
example counts exactly once. Training order is a fresh permutation per epoch derived from
``(seed, epoch)``; augmentation randomness is derived per slot by grain, so a pipeline is a pure
function of its seed, and an iterator's state (``get_state``/``set_state``) is enough to resume.

On a multi-host run (``sharding``), ``PipelineConfig.shard_by_process`` makes each process read
only its rows of every global batch: process ``p`` of ``P`` gets rows ``[p*B/P, (p+1)*B/P)``. The
rows, their order and their augmentation are those of the one-process pipeline (augmentation is
keyed by the global slot), so the global batches are the same.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from oneshui_jax.data import transforms

Record = dict[str, Any]
Source = Sequence[Record]  # random access: tfds/grain data sources, lists of dicts


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings (not the dataset: that is the source and the indices)."""

    image_size: int
    batch_size: int
    seed: int = 0
    crop_scale: tuple[float, float] = transforms.SCALE  # RandomResizedCrop area range
    num_threads: int = 0  # grain read threads; 0 reads in the calling thread (tests)
    prefetch_buffer_size: int = 0
    shard_by_process: bool = False  # each process reads its own rows of every batch (module doc)
    # which process of how many (None: jax.process_index() / process_count())
    process: tuple[int, int] | None = None

    def process_slice(self) -> tuple[int, int]:
        """``(index, count)`` of this process among those sharing each batch (``(0, 1)``
        unless ``shard_by_process``)."""
        if not self.shard_by_process:
            return 0, 1
        if self.process is not None:
            return self.process
        import jax

        return jax.process_index(), jax.process_count()


def _num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


class _Slots:
    """Maps a global slot to (dataset index, valid) for epoch-wise permuted, padded batches."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, shuffle: bool):
        if len(indices) == 0:
            raise ValueError("a pipeline needs at least one example; got an empty index list")
        self.indices = np.asarray(indices, np.int64)
        self.n = len(self.indices)
        self.per_epoch = _num_batches(self.n, batch_size) * batch_size
        self.seed = seed
        self.shuffle = shuffle

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one small object per pipeline)
    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, epoch])
        return self.indices[rng.permutation(self.n)]

    def __call__(self, slot: int) -> tuple[int, bool]:
        epoch, j = divmod(int(slot), self.per_epoch)
        order = self.order(epoch)
        return (int(order[j]), True) if j < self.n else (int(order[0]), False)


def _load(source: Source, slot_to_index: Callable[[int], tuple[int, bool]]):
    def load(slot: int) -> Record:
        index, valid = slot_to_index(slot)
        record = source[index]
        return {
            "image": np.asarray(record["image"]),
            "label": np.asarray(record["label"]),
            "identity": np.int32(record["identity"]),
            "index": np.int32(index),
            "mask": np.bool_(valid),
        }
    return load


def _augment(size: int, scale: tuple[float, float]):
    def apply(record: Record, rng: np.random.Generator) -> Record:
        return {**record, "image": transforms.train_transform(record["image"], size, rng, scale)}
    return apply


def _resize(size: int):
    def apply(record: Record) -> Record:
        return {**record, "image": transforms.eval_transform(record["image"], size)}
    return apply


def _batched(examples: grain.MapDataset, cfg: PipelineConfig) -> grain.MapDataset:
    """Batches of ``cfg.batch_size`` examples, or this process's share of each (module doc)."""
    index, count = cfg.process_slice()
    if count == 1:
        return examples.batch(cfg.batch_size)
    if cfg.batch_size % count:
        raise ValueError(f"a batch of {cfg.batch_size} does not split over {count} processes")
    local = cfg.batch_size // count

    def global_slot(i: int) -> int:
        batch, row = divmod(int(i), local)
        return batch * cfg.batch_size + index * local + row

    rows = grain.MapDataset.range(len(examples) // cfg.batch_size * local)
    return rows.map(lambda i: examples[global_slot(i)]).batch(local)


def train_dataset(source: Source, indices: np.ndarray, cfg: PipelineConfig,
                  num_epochs: int) -> grain.MapDataset:
    """``num_epochs`` epochs of augmented, shuffled batches (``steps_per_epoch`` each)."""
    slots = _Slots(indices, cfg.batch_size, cfg.seed, shuffle=True)
    return _batched(grain.MapDataset.range(slots.per_epoch * num_epochs)
                    .map(_load(source, slots))
                    .random_map(_augment(cfg.image_size, cfg.crop_scale), seed=cfg.seed), cfg)


def eval_dataset(source: Source, indices: np.ndarray, cfg: PipelineConfig) -> grain.MapDataset:
    """Every example of ``indices`` once, in order, eval transform, last batch padded + masked."""
    slots = _Slots(indices, cfg.batch_size, cfg.seed, shuffle=False)
    return _batched(grain.MapDataset.range(slots.per_epoch)
                    .map(_load(source, slots))
                    .map(_resize(cfg.image_size)), cfg)


def augmented_pass(source: Source, indices: np.ndarray, cfg: PipelineConfig,
                   pass_index: int) -> grain.MapDataset:
    """Every example of ``indices`` once, in order, with the *training* augmentation
    (RandomResizedCrop over ``cfg.crop_scale`` + flip), the last batch padded + masked: one of
    RMIA's signal passes (SPEC.md 5.5: train transform, batch 32, no shuffle). Pass ``k`` draws
    its crops from the seed ``[cfg.seed, k]``, so passes differ from each other and every pass is
    reproducible."""
    slots = _Slots(indices, cfg.batch_size, cfg.seed, shuffle=False)
    seed = int(np.random.SeedSequence([cfg.seed, pass_index]).generate_state(1)[0])
    return (grain.MapDataset.range(slots.per_epoch)
            .map(_load(source, slots))
            .random_map(_augment(cfg.image_size, cfg.crop_scale), seed=seed)
            .batch(cfg.batch_size))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch with the reference's ``drop_last=False``."""
    return _num_batches(num_examples, batch_size)


def to_iterator(dataset: grain.MapDataset, cfg: PipelineConfig) -> grain.DatasetIterator:
    """A checkpointable iterator; ``num_threads`` > 0 reads and transforms in a thread pool."""
    options = grain.ReadOptions(num_threads=cfg.num_threads,
                                prefetch_buffer_size=cfg.prefetch_buffer_size)
    return iter(dataset.to_iter_dataset(options))


def eval_batches(source: Source, indices: np.ndarray, cfg: PipelineConfig) -> Iterator[Record]:
    """Convenience: iterate over ``eval_dataset``."""
    return to_iterator(eval_dataset(source, indices, cfg), cfg)
