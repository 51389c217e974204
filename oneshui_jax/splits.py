"""Identity splits of the 1-SHUI benchmark, bit-identical to the reference.

Implements ``IdentityUnlearningDataset._split_data``, ``_split_using_target_ratio``,
``_init_unlearning`` and ``get_simulated_unlearning_data`` of the original code (SPEC.md section 2):

1. ``random.seed(seed)``; shuffle all identity ids; split them 40/60 *by images*
   (``_split_using_target_ratio(0.4)``, including its off-by-one when the limit moves left),
   then the 40% part 50/50 into VAL and TEST. TRAIN is the 60% part.
2. Shuffle all ids again; walk them and take as FORGET the first ``N`` TRAIN identities with at
   least 2 images (at least 6 when ``N == 1``), each with one support image
   ``random.sample(images, 1)``. Every other TRAIN identity is RETAIN. Support images are held
   out of every split.
3. Simulated requests for meta-training: shuffle TRAIN, cut it into chunks of ``n`` (the last one
   wraps around), draw one support image per identity from the set of its non-support images.

The same Python ``random`` calls are made in the same order, so for a seed and identity list the
output equals the reference's. Membership tests use sets and per-identity counts, so a CelebA split
takes well under a second (the reference needs seconds).

Deviations (named): the reference silently takes fewer than ``N`` forget identities when too few
are eligible, and accepts an ``N`` that forgets every TRAIN identity (an empty retain set, on
which the study cannot retrain or evaluate) or a dataset too small for a VAL or TEST identity;
here each is an error that states the largest ``N`` allowed.

Command line (``oneshui_jax/cli/splits.py``)::

    python -m oneshui_jax.splits --dataset mufac --data_dir ../shared/data \
        --num_identities 10 --seed 0 --out split.json

Bad input prints one ``error: ...`` line on stderr, writes nothing and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

import numpy as np

from oneshui_jax import ranges
from oneshui_jax.data.annotations import IdentityAnnotations
from oneshui_jax.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test", "support", "forget", "retain")


@dataclasses.dataclass(frozen=True)
class Splits:
    """The reference's ``get_splits()``: identity lists and the support image indices.

    ``train``/``val``/``test``/``forget``/``retain`` are identity ids in the reference's order;
    ``support`` are image indices (dataset order), one per forget identity.
    """

    train: list[int]
    val: list[int]
    test: list[int]
    support: list[int]
    forget: list[int]
    retain: list[int]

    def to_dict(self) -> dict[str, list[int]]:
        return {name: list(getattr(self, name)) for name in SPLIT_NAMES}

    @classmethod
    def from_dict(cls, d: dict) -> Splits:
        """Accepts the reference's keys too (``support_set`` for ``support``)."""
        d = dict(d)
        if "support" not in d and "support_set" in d:
            d["support"] = d.pop("support_set")
        missing = [k for k in SPLIT_NAMES if k not in d]
        if missing:
            raise ConfigError(f"splits are missing the keys {missing}; expected {SPLIT_NAMES}.")
        return cls(**{k: [int(x) for x in d[k]] for k in SPLIT_NAMES})

    def check(self, ann: IdentityAnnotations) -> None:
        """The reference's consistency asserts, as errors."""
        train, val, test = set(self.train), set(self.val), set(self.test)
        forget, retain = set(self.forget), set(self.retain)
        problems = []
        if train & val or train & test or val & test:
            problems.append("train/val/test identities overlap")
        if forget & retain:
            problems.append("forget and retain identities overlap")
        if forget | retain != train:
            problems.append("forget + retain != train")
        support_ids = set(ann.identities[np.asarray(self.support, np.int64)].tolist())
        if not support_ids <= train:
            problems.append("a support image belongs to a non-train identity")
        if problems:
            raise ConfigError(f"inconsistent splits: {'; '.join(problems)}")


@dataclasses.dataclass(frozen=True)
class SimulatedRequest:
    """One simulated unlearning request used to meta-train MetaUnlearn.

    ``identities``: the ``n`` requested identities; ``support``: one image index per identity;
    ``forget``: their other images (for a one-image identity the support image itself, as in the
    reference). Retain images are every other TRAIN identity's images: see ``retain_images``.
    """

    identities: list[int]
    support: list[int]
    forget: list[int]


def _image_counts(ann: IdentityAnnotations) -> dict[int, int]:
    values, counts = np.unique(ann.identities, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def split_using_target_ratio(ratio: float, identities: Sequence[int],
                             counts: dict[int, int],
                             identity_to_images) -> tuple[list[int], list[int]]:
    """The reference's ``_split_using_target_ratio``, off-by-one included.

    ``counts[id]`` is the number of images labelled ``id`` (used for the target and first guess);
    ``identity_to_images`` is the reference's table (used while moving the limit).
    """
    target = sum(counts.get(i, 0) for i in set(identities)) * ratio
    limit = int(len(identities) * ratio)
    n = sum(counts.get(i, 0) for i in set(identities[:limit]))
    side = -1 if n > target else +1
    while (n > target and side == -1) or (n <= target and side == +1):
        limit += side
        # Moving left subtracts identities[limit - 1], which is still kept (the reference's bug).
        n += side * len(identity_to_images[identities[limit - 1]])
    return list(identities[:limit]), list(identities[limit:])


def make_splits(ann: IdentityAnnotations, num_identities: int, seed: int) -> Splits:
    """TRAIN/VAL/TEST, FORGET/RETAIN and the support set, as the reference makes them.

    Uses a private ``random.Random(seed)``, which replays the same stream as the reference's
    ``random.seed(seed)`` followed by its two shuffles and ``N`` samples.
    """
    if num_identities < 1:
        raise ConfigError(f"num_identities must be >= 1, got {num_identities}.")
    ranges.SEED.check("seed", seed)  # random.Random(-1) would quietly replay seed 1's split
    rng = random.Random(seed)
    id2imgs = ann.identity_to_images()
    counts = _image_counts(ann)

    shuffled = ann.identity_ids()
    rng.shuffle(shuffled)
    intermediate, train = split_using_target_ratio(0.4, shuffled, counts, id2imgs)
    val, test = split_using_target_ratio(0.5, intermediate, counts, id2imgs)

    train_set = set(train)
    ids = ann.identity_ids()
    rng.shuffle(ids)
    min_images = 6 if num_identities == 1 else 2
    forget, retain, support = [], [], []
    for identity in ids:
        if identity not in train_set:
            continue
        images = id2imgs[identity]
        if len(images) >= min_images and len(forget) < num_identities:
            support.append(rng.sample(images, 1)[0])
            forget.append(identity)
        else:
            retain.append(identity)
    where = f"{ann.dataset} (seed {seed})"
    if not val or not test:
        raise ConfigError(f"{where}: {len(ann.identity_ids())} identities are too few to split "
                          f"into train/val/test (val {len(val)}, test {len(test)} identities); "
                          "expected a dataset where every split gets an identity")
    eligible = sum(len(id2imgs[i]) >= min_images for i in train)
    largest = eligible if eligible < len(train) else eligible - 1  # keep one retain identity
    if len(forget) < num_identities:
        raise ConfigError(
            f"num_identities={num_identities} but only {len(forget)} train identities of "
            f"{where} have at least {min_images} images. The reference code would silently "
            f"forget only {len(forget)}; choose num_identities <= {largest}"
            f"{_retain_note(largest, eligible)}."
        )
    if not retain:  # every train identity forgotten: nothing to retain, train or evaluate on
        raise ConfigError(
            f"num_identities={num_identities} forgets every one of the {len(train)} train "
            f"identities of {where}, leaving the retain set empty; choose num_identities <= "
            f"{largest}{_retain_note(largest, eligible)}."
        )
    splits = Splits(train=train, val=val, test=test, support=support, forget=forget,
                    retain=retain)
    splits.check(ann)
    return splits


def _retain_note(largest: int, eligible: int) -> str:
    """Why the largest N is one less than the eligible identities, when it is."""
    return " (one train identity must stay in the retain set)" if largest < eligible else ""


def image_indices(ann: IdentityAnnotations, identities: Iterable[int],
                  exclude: Iterable[int] = ()) -> np.ndarray:
    """The reference's ``get_data``: images of ``identities`` minus ``exclude``, dataset order."""
    mask = np.isin(ann.identities, np.fromiter(identities, np.int64))
    excluded = np.fromiter(exclude, np.int64)
    if excluded.size:
        mask[excluded] = False
    return np.flatnonzero(mask)


def split_images(ann: IdentityAnnotations, splits: Splits) -> dict[str, np.ndarray]:
    """Image indices of every evaluation split (support images held out everywhere)."""
    out = {name: image_indices(ann, getattr(splits, name), splits.support)
           for name in ("train", "val", "test", "forget", "retain")}
    out["support"] = np.asarray(splits.support, np.int64)
    return out


def simulated_requests(ann: IdentityAnnotations, splits: Splits, num_ids: int,
                       rng: random.Random) -> list[SimulatedRequest]:
    """The reference's ``get_simulated_unlearning_data(num_ids)``: ``ceil(|TRAIN| / n)`` requests.

    Consumes ``rng`` exactly like the reference (one shuffle, one ``sample`` per identity, with the
    same CPython set iteration order). The reference calls this twice per meta-training epoch and
    uses the second draw; callers that want parity do the same.
    """
    if num_ids < 1:
        raise ConfigError(f"num_identities_simulation must be >= 1, got {num_ids}.")
    id2imgs = ann.identity_to_images()
    support = set(splits.support)
    identities = list(splits.train)
    rng.shuffle(identities)
    requests = []
    for i in range(0, len(identities), num_ids):
        if i + num_ids < len(identities):
            chunk = identities[i:i + num_ids]
        else:
            chunk = identities[i:] + identities[:i + num_ids - len(identities)]
        sup, fgt = [], []
        for identity in chunk:
            images = set()
            images.update(id2imgs[identity])  # same construction as the reference: same order
            images -= support
            valid = list(images)
            if not valid:
                raise ConfigError(
                    f"identity {identity} has no image outside the support set; "
                    "it cannot be part of a simulated request."
                )
            image = rng.sample(valid, 1)[0]
            sup.append(image)
            if len(valid) > 1:
                valid.remove(image)
            fgt.extend(valid)
        requests.append(SimulatedRequest(identities=list(chunk), support=sup, forget=fgt))
    return requests


def retain_images(ann: IdentityAnnotations, splits: Splits,
                  request: SimulatedRequest) -> np.ndarray:
    """Images of every TRAIN identity not in ``request`` (minus real support), dataset order."""
    others = set(splits.train) - set(request.identities)
    return image_indices(ann, others, splits.support)


def export(ann: IdentityAnnotations, splits: Splits, seed: int, num_identities: int) -> dict:
    """The JSON record the CLI writes."""
    d = {"dataset": ann.dataset, "seed": seed, "num_identities": num_identities}
    d.update(splits.to_dict())
    d["support_files"] = [ann.files[i] for i in splits.support]
    d["num_images"] = {name: int(len(v)) for name, v in split_images(ann, splits).items()}
    return d


if __name__ == "__main__":  # python -m oneshui_jax.splits: an alias of the command line
    import runpy  # run, not imported: this library module stays below the command lines

    runpy.run_module("oneshui_jax.cli.splits", run_name="__main__")
