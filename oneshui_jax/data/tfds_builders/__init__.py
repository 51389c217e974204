"""TFDS builders of oneshui_jax (importing this package imports tensorflow_datasets).

Builders register with TFDS when imported: ``synth_faces`` (the embedded default, generated) and
``celeba``, ``celebahq``, ``mufac`` (the paper's datasets, read from local files). Other code must
stay importable without TFDS, so import this package only where a build or data source is needed.
"""

from oneshui_jax.data.tfds_builders.faces import BUILDERS, FaceTable, build, face_builder
from oneshui_jax.data.tfds_builders.synthfaces import (
    SynthFaces,
    SynthFacesBuilderConfig,
    build_synthfaces,
    synthfaces_builder,
)

__all__ = ["BUILDERS", "FaceTable", "SynthFaces", "SynthFacesBuilderConfig", "build",
           "build_synthfaces", "face_builder", "synthfaces_builder"]
