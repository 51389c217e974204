"""TFDS builder of SynthFaces, the embedded default dataset of oneshui_jax.

SynthFaces (see :mod:`oneshui_jax.data.synthfaces`) is licence-free and procedurally generated:
face-like portraits of synthetic people with a CelebA-like multi-label attribute task. Identity
attributes are rendered and constant per person, image attributes are rendered and vary per photo,
and annotator-quirk attributes are drawn per person but not rendered: a model fits those on a
person only by memorising the person, which makes identity unlearning measurable.

This builder stores the dataset as ``array_record`` and is read back with
:meth:`~tfds.core.DatasetBuilder.as_data_source`, which works WITHOUT TensorFlow (``tfds.load``
does not). One split, ``train``, holds every image in dataset order (``index`` == position: the
project makes its own identity splits), so shuffling on write is disabled. Images are handed to
TFDS as PNG bytes encoded with PIL (encoding arrays would need TensorFlow) and decode to uint8
``(S, S, 3)`` arrays with PIL. Decoded ``file_name`` values are ``bytes`` and scalars are Python
ints.

Importing this module imports ``tensorflow_datasets`` and registers the ``synth_faces`` builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from oneshui_jax.data import synthfaces
from oneshui_jax.data.tfds_builders.local import LocalBuild

_DESCRIPTION = """\
SynthFaces: procedurally generated, licence-free face-like portraits of synthetic identities
(2..30 images each) with a CelebA-like multi-label attribute task. Attributes are per identity
(rendered, constant per person), per image (rendered, varying) or annotator quirks (per person,
not rendered, with label noise: fitting them requires memorising the person).
"""

SPLIT = "train"
FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class SynthFacesBuilderConfig(tfds.core.BuilderConfig):
    """A TFDS builder config carrying the generator's :class:`SynthFacesConfig`."""

    synth: synthfaces.SynthFacesConfig = dataclasses.field(
        default_factory=synthfaces.SynthFacesConfig
    )


class SynthFaces(LocalBuild, tfds.core.GeneratorBasedBuilder):
    """SynthFaces as an ``array_record`` TFDS dataset with one ordered ``train`` split."""

    name = "synth_faces"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SynthFacesBuilderConfig(
            name=name,
            description=f"{cfg.num_identities} identities, {cfg.image_size} px, seed {cfg.seed}",
            synth=cfg,
        )
        for name, cfg in synthfaces.CONFIGS.items()
    ]
    DEFAULT_CONFIG_NAME = synthfaces.DEFAULT_CONFIG

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.synth.image_size
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": tfds.features.Tensor(
                    shape=(len(synthfaces.ATTRIBUTE_NAMES),), dtype=np.uint8
                ),
                "identity": tfds.features.Scalar(dtype=np.int64),
                "index": tfds.features.Scalar(dtype=np.int64),
                "file_name": tfds.features.Text(),
            }
        )
        # DatasetInfo is built directly: dataset_info_from_configs() reads package metadata files.
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=features,
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep dataset order: record at position i has index i
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # nothing to download
        return {SPLIT: self._generate_examples(self.builder_config.synth)}

    def _generate_examples(
        self, cfg: synthfaces.SynthFacesConfig
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for example in synthfaces.examples(cfg):
            yield example["index"], {**example, "image": synthfaces.encode_png(example["image"])}


def synthfaces_builder(data_dir: str, config: str = synthfaces.DEFAULT_CONFIG) -> SynthFaces:
    """The SynthFaces builder of named ``config`` storing ``array_record`` files in ``data_dir``."""
    synthfaces.named_config(config)  # ValueError on an unknown name
    return SynthFaces(data_dir=data_dir, config=config, file_format=FILE_FORMAT)


def build_synthfaces(data_dir: str,
                     config: str = synthfaces.DEFAULT_CONFIG) -> Sequence[Mapping[str, Any]]:
    """Build SynthFaces ``config`` into ``data_dir`` once and return its ``train`` data source.

    A finished build is reused untouched. TFDS writes into an ``incomplete.*`` folder and renames
    it when done, so an interrupted build leaves no half-written dataset (only that folder).
    The source is random access: ``source[i]`` is the dict of example ``i`` (dataset order).
    """
    builder = synthfaces_builder(data_dir, config)
    if not builder.is_prepared():
        logging.info("building SynthFaces %s into %s (generated here, offline)",
                     config, builder.data_dir)
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder.as_data_source(split=SPLIT)
