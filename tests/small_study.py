"""The one small SynthFaces study the end-to-end tests share (built once per test session).

SynthFaces ``small`` (150 identities, 32 px), N = 5, seed 0: pretrain and retrain (3 epochs at
a constant learning rate, enough for pretrain to fit the forget identities better than the
oracle does), MetaUnlearn (one meta-epoch, 3 simulated requests of 30 identities) and
support_ascent (4 selection requests). ``conftest.py`` runs it; tests that need other settings
copy ``config`` and change what they test.
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
    config = synthfaces_config.get_config("N=5,size=small")
    config.data.tfds_dir = tfds_dir
    config.workdir = os.path.join(root, "work")
    config.checkpoint_dir = os.path.join(root, "ckpt")
    config.stages = STAGES
    config.train.epochs = epochs
    config.train.warmup_epochs = 0
    config.train.lr = 3e-3
    config.meta_unlearn.epochs = 1
    config.meta_unlearn.num_identities_simulation = 30
    config.meta_unlearn.batch_size = 256  # one outer batch per request: one compilation
    config.support_ascent.batch_size = 256
    config.support_ascent.num_requests = 4
    config.data.num_threads = 0
    # The privacy attacks (on in the default study) have their own tests (test_privacy.py,
    # test_study.py), which turn them on where they test them.
    config.mia.loss_rf = False
    config.mia.rmia = False
    config.progress = False
    return config
