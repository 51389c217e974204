"""Declared ranges of numeric settings: what every number of a study's config accepts.

Every numeric setting of the study (``config.train``, ``config.mesh``, ...) and of each method's
``Config`` (its ``RANGES``; see ``unlearn/api.py``) names a :class:`Range` (``COUNT``,
``LEARNING_RATE``, ``SEED``, ...); a value outside it is one ConfigError that names the setting,
the value and the range, before any work (README "Faults"). A leaf module (it imports only
``errors``), so the identity splits (``splits.py``) and the method API share it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import numpy as np

from oneshui_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts, declared once and checked generically.

    A number (an int with ``integer``; never a bool) that is finite and within ``low`` /
    ``high`` (excluded with ``low_open`` / ``high_open``), or one of ``also``; None with
    ``optional`` (and, for a ``sequence``, the empty tuple: "none"); with ``sequence``, a
    non-empty tuple of such numbers (``length`` of them, ``ordered`` non-decreasing, where
    given). ``expected`` says it in words for the error.
    """

    expected: str
    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[int, ...] = ()  # accepted outside [low, high] (config.mesh.data's -1)
    optional: bool = False
    sequence: bool = False
    length: int | None = None
    ordered: bool = False

    def _number(self, value: Any) -> bool:
        if isinstance(value, bool | np.bool_):
            return False
        kinds = int | np.integer if self.integer else int | float | np.integer | np.floating
        if not isinstance(value, kinds):
            return False
        if value in self.also:
            return True
        if not isinstance(value, int | np.integer) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is in the range."""
        if value is None:
            return self.optional
        if not self.sequence:
            return self._number(value)
        if isinstance(value, tuple | list) and not value:
            return self.optional
        if not isinstance(value, tuple | list):
            return False
        if self.length is not None and len(value) != self.length:
            return False
        if not all(self._number(v) for v in value):
            return False
        return not self.ordered or all(a <= b for a, b in zip(value, value[1:], strict=False))

    def check(self, where: str, value: Any) -> None:
        """ConfigError naming the setting ``where``, its value and the range, unless accepted."""
        if not self.accepts(value):
            raise ConfigError(f"{where} must be {self.expected}, got {value!r}")


MAX_SEED = 2**31 - 1
"""The largest seed: every consumer (Python's ``random``, numpy, ``jax.random.key``, which
silently wraps seeds of 2**32 and more to small ones) takes it, and ``seed + 1`` too (RMIA's
reference models)."""

COUNT = Range("an int >= 1", integer=True, low=1)  # epochs, batch sizes, sizes, steps
COUNT_OR_ZERO = Range("an int >= 0", integer=True, low=0)
SEED = Range(f"an int seed in [0, {MAX_SEED}]", integer=True, low=0, high=MAX_SEED)
LEARNING_RATE = Range("a finite number > 0", low=0.0, low_open=True)
POSITIVE = LEARNING_RATE  # a scale that must not vanish (a temperature, a noise σ)
NON_NEGATIVE = Range("a finite number >= 0", low=0.0)  # weight decay, loss weights, 0: no step
BELOW_ONE = Range("a number in [0, 1)", low=0.0, high=1.0, high_open=True)  # a dropout rate
MOMENTUM = BELOW_ONE
FRACTION = Range("a number in [0, 1]", low=0.0, high=1.0)
NON_NEGATIVE_LIST = Range("finite numbers >= 0 (a non-empty tuple)", low=0.0, sequence=True)


def numeric_settings(config_cls: type) -> list[str]:
    """The settings of a Config dataclass that hold numbers (int, float, a tuple of them; None
    allowed or not): each needs a :class:`Range` in ``config_cls.RANGES``."""
    numbers = {int, float}
    names = []
    for name, hint in typing.get_type_hints(config_cls).items():
        if name not in {f.name for f in dataclasses.fields(config_cls)}:
            continue
        args = set(typing.get_args(hint)) - {type(None), Ellipsis}
        if hint in numbers or (args and args <= numbers):
            names.append(name)
    return names


def check_ranges(cfg: Any, where: str) -> None:
    """Every setting ``cfg`` declares in ``type(cfg).RANGES`` checked (``where``: its config
    path, e.g. ``config.train``); one ConfigError for the first one out of range."""
    for name, allowed in type(cfg).RANGES.items():
        allowed.check(f"{where}.{name}", getattr(cfg, name))
