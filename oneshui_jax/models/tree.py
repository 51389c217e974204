"""Paths into nested-dict parameter trees (shared by the state-dict converters)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

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
