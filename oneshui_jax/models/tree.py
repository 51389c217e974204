"""Paths into nested-dict parameter trees (shared by the state-dict converters)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

Path = tuple[str | int, ...]


def get_path(tree: Mapping[Any, Any], path: Path) -> Any:
    """``tree[path[0]][path[1]]...``."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict[Any, Any], path: Path, value: Any) -> None:
    """Sets ``tree[path[0]]...[path[-1]] = value``, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flat_paths(tree: Mapping[Any, Any], prefix: Path = ()) -> Iterator[Path]:
    """The path of every leaf, depth first, in insertion order."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flat_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


Rules = Mapping[str, tuple[Path, tuple[int, ...] | None]]
"""torch key -> (our path, axis permutation from our layout to torch's, or None)."""


def from_torch_layout(abstract: Mapping[Any, Any], rules: Rules, state_dict: Mapping[str, Any],
                      what: str) -> dict[Any, Any]:
    """Our float32 params from a torch-layout state dict, after checking every key at once.

    ``abstract`` gives our shapes (e.g. ``jax.eval_shape`` of an init). One ``ValueError`` lists
    every missing, unexpected and mis-shaped key of ``what``.
    """
    missing, mis_shaped = [], []
    for key, (path, perm) in rules.items():
        shape = get_path(abstract, path).shape
        torch_shape = shape if perm is None else tuple(shape[a] for a in perm)
        if key not in state_dict:
            missing.append(key)
        elif tuple(np.shape(state_dict[key])) != torch_shape:
            mis_shaped.append(f"{key}: got {tuple(np.shape(state_dict[key]))}, "
                              f"expected {torch_shape}")
    unexpected = sorted(set(state_dict) - set(rules))
    if missing or unexpected or mis_shaped:
        raise ValueError(f"{what} does not match: missing keys {missing}; unexpected keys "
                         f"{unexpected}; mis-shaped keys {mis_shaped}")
    params: dict[Any, Any] = {}
    for key, (path, perm) in rules.items():
        array = np.asarray(state_dict[key], dtype=np.float32)
        if perm is not None:
            array = np.transpose(array, np.argsort(perm))
        set_path(params, path, jnp.asarray(array))
    return params


def to_torch_layout(params: Mapping[Any, Any], rules: Rules) -> dict[str, np.ndarray]:
    """The torch-layout state dict of ``params`` (numpy), in ``rules``' key order.

    Every leaf of ``params`` must have a rule; a leaf without one is an error.
    """
    extra = set(flat_paths(params)) - {path for path, _ in rules.values()}
    if extra:
        raise ValueError(f"params have unknown entries: {sorted(map(str, extra))}")
    state_dict = {}
    for key, (path, perm) in rules.items():
        array = np.asarray(get_path(params, path))
        state_dict[key] = array if perm is None else np.transpose(array, perm)
    return state_dict
