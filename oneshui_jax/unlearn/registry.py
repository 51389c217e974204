"""The unlearning methods: one explicit dict from a method's name to its module.

Every module declares the interface of ``unlearn/api.py`` (``ACCESS``, ``Config``, optional
``prepare``, ``unlearn``); ``check_method`` verifies it when this module is imported.

A study may also run a *variant* of a method: a stage whose config block names the method it
runs, e.g. ``config.meta_unlearn_ls = {"method": "meta_unlearn", "step_control":
"line_search", ...}`` with ``"meta_unlearn_ls"`` in ``config.stages``. The variant has its own
run directory and its own row in the results, next to the method with its own settings.
``resolve`` maps a stage to its method.
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


VARIANT_KEY = "method"  # the key of a variant's config block that names its method


def resolve(config, name: str) -> tuple[str, types.ModuleType]:
    """``(method, module)`` of stage ``name``: a registered method, or a variant (``config.<name>``
    with ``method`` set to a registered method). ConfigError otherwise."""
    from oneshui_jax.errors import ConfigError

    if name in METHODS:
        return name, METHODS[name]
    block = config.get(name) if config is not None and hasattr(config, "get") else None
    base = block.get(VARIANT_KEY) if hasattr(block, "get") else None
    if base is None:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}, or a "
                          f"variant: a block config.{name} with {VARIANT_KEY}=<one of them>")
    if base not in METHODS:
        raise ConfigError(f"config.{name}.{VARIANT_KEY} is {base!r}; expected one of "
                          f"{', '.join(METHODS)}")
    return base, METHODS[base]


def is_method(config, name: str) -> bool:
    """Whether stage ``name`` is a method or a variant of one (see ``resolve``)."""
    block = config.get(name) if hasattr(config, "get") else None
    return name in METHODS or (hasattr(block, "get") and block.get(VARIANT_KEY) is not None)
