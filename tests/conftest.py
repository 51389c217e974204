"""Shared fixtures. Tests run on CPU, offline; real annotation files come from ../shared/data."""

import os

import pytest
from absl import flags

# grain reads absl flags; tests never parse a command line.
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("ONESHUI_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data() -> str:
    """The real data folder (MUFAC, CelebA / CelebA-HQ annotations) in the original layout."""
    if not os.path.isdir(os.path.join(SHARED_DATA, "mufac")):
        pytest.fail(f"real data not found at {SHARED_DATA}; set ONESHUI_SHARED_DATA")
    return SHARED_DATA
