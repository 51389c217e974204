"""What the builders of oneshui_jax share: data made here from local files or generated, never
downloaded, so TFDS's own lines ("Downloading and preparing dataset ...", "Dataset ...
downloaded and prepared to ...") are replaced by the package's: the caller logs "building ..."
before a build, and :class:`LocalBuild` logs "built ..." after it."""

from __future__ import annotations

from absl import logging


class LocalBuild:
    """Mixed into a TFDS builder (before ``tfds.core.GeneratorBasedBuilder``): no "downloading"
    line before a build, one "built" line after it."""

    def _log_download_bytes(self) -> None:
        """TFDS prints "Downloading and preparing" here; the caller has said "building"."""

    def _log_download_done(self) -> None:
        logging.info("built %s in %s; later runs reuse it", self.name, self.data_dir)
