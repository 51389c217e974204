"""Test doubles shared by several test files: a source that records what is read, and ViT
parameters drawn in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


class Recording:
    """A dataset source that logs every index read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self.source[index]


def random_params(init, cfg, seed):
    """Parameters of ``init(cfg, key)``'s layout drawn in numpy: kernels scaled by fan-in, norm
    scales near 1, other vectors small (larger than a fresh init, so outputs move; faster than
    an eager init on 2 cores)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if leaf.ndim >= 2:
            x = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif getattr(path[-1], "key", None) == "scale":
            x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:
            x = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(x, jnp.float32)

    shapes = jax.eval_shape(functools.partial(init, cfg), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(draw, shapes)


TINY_SPLITS = {"train": [1, 2, 3, 4, 5], "val": [6, 7], "test": [8, 9], "support": [40, 41],
               "forget": [1, 2], "retain": [3, 4, 5]}


def request_chain(root: str, splits=TINY_SPLITS):
    """The cheapest servable request under ``root``: a pretrained ``vit_tiny_test`` run (3
    attributes), a support_ascent method run prepared on it (artifacts and metadata, no
    parameters) and a grey PNG portrait. Returns ``(pretrain, method, portrait)`` paths."""
    import dataclasses
    import os

    from PIL import Image

    from oneshui_jax import checkpoints
    from oneshui_jax.models import vit
    from oneshui_jax.unlearn import api, support_ascent

    cfg = vit.ViTConfig.preset("vit_tiny_test", num_classes=3)
    base = {"config": {"dataset": "synthfaces", "model": {"name": "vit_tiny_test"},
                       "num_identities": 2, "seed": 0},
            "splits": splits, "model_config": dataclasses.asdict(cfg)}
    pretrain = os.path.join(root, "pretrain")
    digest = checkpoints.save_params(pretrain, vit.init_params(cfg, jax.random.key(0)),
                                     {**base, "stage": "pretrain"})
    method = os.path.join(root, "support_ascent")
    artifacts_hash = checkpoints.save_tree(method, checkpoints.ARTIFACTS_DIR,
                                           {"alpha": np.asarray(0.1, np.float32)})
    checkpoints.write_metadata(method, {
        **base, "stage": "support_ascent", "method": "support_ascent", "access": "stats",
        "method_config": api.config_record(support_ascent.Config(task="multilabel")),
        "base_run_dir": pretrain, "base_params_hash": digest, "artifacts_hash": artifacts_hash,
    }, status="done")
    portrait = os.path.join(root, "portrait.png")
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(portrait)
    return pretrain, method, portrait
