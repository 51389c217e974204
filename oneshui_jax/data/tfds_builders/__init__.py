"""TFDS builders of oneshui_jax (importing this package imports tensorflow_datasets).

Builders register with TFDS when imported. Other code must stay importable without TFDS, so import
this package only where a TFDS build or data source is needed.
"""

from oneshui_jax.data.tfds_builders.synthfaces import (
    SynthFaces,
    SynthFacesBuilderConfig,
    build_synthfaces,
    synthfaces_builder,
)

__all__ = ["SynthFaces", "SynthFacesBuilderConfig", "build_synthfaces", "synthfaces_builder"]
