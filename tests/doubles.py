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
