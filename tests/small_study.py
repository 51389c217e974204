"""The one small SynthFaces study the end-to-end tests share (built once per test session).

``configs/synthfaces.py:runlocal=True``: SynthFaces ``small`` (150 identities, 32 px), N = 5,
seed 0, MetaUnlearn (one meta-epoch, 3 simulated requests of 30 identities) and support_ascent
(4 selection requests), no privacy attack (test_privacy.py and test_study.py turn them on where
they test them); pretrain and retrain here train 3 epochs at a constant learning rate, enough
for pretrain to fit the forget identities better than the oracle does. ``conftest.py`` runs it;
tests that need other settings copy ``config`` and change what they test.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import synthfaces as synthfaces_config  # noqa: E402

STAGES = ("pretrain", "retrain", "meta_unlearn", "support_ascent")


def config(tfds_dir: str, root: str, epochs: int = 3):
    """The shared study's config, writing under ``root`` and reading SynthFaces from
    ``tfds_dir``."""
    config = synthfaces_config.get_config("runlocal=True")  # size=small, N=5, STAGES
    config.data.tfds_dir = tfds_dir
    config.workdir = os.path.join(root, "work")
    config.checkpoint_dir = os.path.join(root, "ckpt")
    config.stages = STAGES
    config.train.epochs = epochs
    config.train.warmup_epochs = 0
    config.train.lr = 3e-3
    return config
