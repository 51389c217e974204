"""The unlearning methods: one explicit dict from a method's name to its module.

Every module declares the interface of ``unlearn/api.py`` (``ACCESS``, ``Config``, optional
``prepare``, ``unlearn``); ``check_method`` verifies it when this module is imported.
"""

from __future__ import annotations

import types

from oneshui_jax.unlearn import (
    api,
    bad_teacher,
    lipschitz,
    meta_unlearn,
    pgu,
    scrub,
    ssd,
    support_ascent,
)

METHODS: dict[str, types.ModuleType] = {
    "meta_unlearn": meta_unlearn,
    "support_ascent": support_ascent,
    "ssd": ssd,
    "lipschitz": lipschitz,
    "pgu": pgu,
    "scrub": scrub,
    "bad_teacher": bad_teacher,
}

for _name, _module in METHODS.items():
    api.check_method(_name, _module)


def method(name: str) -> types.ModuleType:
    """The module of method ``name``; ConfigError naming the available ones."""
    from oneshui_jax.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
