"""TFDS builders of oneshui_jax (importing this package imports tensorflow_datasets).

Builders register with TFDS when imported: ``synth_faces`` (the embedded default, generated) and
``celeba``, ``celebahq``, ``mufac`` (the paper's datasets, read from local files). Other code must
stay importable without TFDS, so import this package only where a build or data source is needed.
"""

import logging

from oneshui_jax.data.tfds_builders.faces import BUILDERS, FaceTable, build, face_builder
from oneshui_jax.data.tfds_builders.synthfaces import (
    SynthFaces,
    SynthFacesBuilderConfig,
    build_synthfaces,
    synthfaces_builder,
)

__all__ = ["BUILDERS", "FaceTable", "SynthFaces", "SynthFacesBuilderConfig", "build",
           "build_synthfaces", "face_builder", "synthfaces_builder"]


class _NoFreshBuildNoise(logging.Filter):
    """Drops TFDS's "Variant folder ... has no dataset_info.json" warning: TFDS lists the
    dataset's folders before every build, and a fresh build's folder has no dataset_info.json
    until TFDS writes it, so the warning came with every first build and meant nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Variant folder ")
                    and message.endswith(" has no dataset_info.json"))


logging.getLogger("absl").addFilter(_NoFreshBuildNoise())  # TFDS logs through absl
