"""The unlearning methods: one explicit dict from a method's name to its module.

Every module declares the interface of ``unlearn/api.py`` (``ACCESS``, ``Config``, optional
``prepare``, ``unlearn``); ``check_method`` verifies it when this module is imported.

A study may also run a *variant* of a method: a stage whose config block names the method it
runs, e.g. ``config.meta_unlearn_ls = {"method": "meta_unlearn", "step_control":
"line_search", ...}`` with ``"meta_unlearn_ls"`` in ``config.stages``. The variant has its own
run directory and its own row in the results, next to the method with its own settings.
``resolve`` maps a stage to its method.

A method outside this package (your own; docs/add-a-method.md) is a variant whose ``method`` is
the dotted path of its module, e.g. ``config.head_ascent = {"method":
"docs.examples.head_ascent", ...}``: ``resolve`` imports it, checks its interface and registers
it under that path, which its runs record, so that serving finds it again (``method``). The
module must be importable where the study and the server run (on ``sys.path``; the current
folder is, for ``python -m``).
"""

from __future__ import annotations

import importlib
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


def register(name: str, module: types.ModuleType) -> types.ModuleType:
    """Adds ``module`` to :data:`METHODS` as ``name`` after checking its interface
    (``api.check_method``); ConfigError if ``name`` is taken by another module."""
    from oneshui_jax.errors import ConfigError

    if METHODS.get(name, module) is not module:
        raise ConfigError(f"method name {name!r} is taken by {METHODS[name].__name__}; "
                          f"cannot register {module.__name__} under it")
    api.check_method(name, module)
    METHODS[name] = module
    return module


def is_module_path(name: str) -> bool:
    """Whether ``name`` names a method by its module's dotted path (a method outside this
    package) rather than by a registered name."""
    return "." in name


def load(path: str, where: str) -> types.ModuleType:
    """The method whose module is at dotted ``path``, imported and registered under ``path``
    (once). ``where`` names the setting or file that asked for it, for the error: one
    ConfigError if the module cannot be imported or lacks the method interface."""
    from oneshui_jax.errors import ConfigError

    if path in METHODS:
        return METHODS[path]
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ConfigError(f"{where} names the method module {path!r}, which cannot be imported "
                          f"({e}); it must be on sys.path (run from the folder that holds its "
                          "package, or set PYTHONPATH)") from e
    try:
        return register(path, module)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def method(name: str, where: str = "the method") -> types.ModuleType:
    """The module of method ``name`` (a registered name, or a module path: :func:`load`);
    ConfigError naming the available ones."""
    from oneshui_jax.errors import ConfigError

    if name in METHODS:
        return METHODS[name]
    if is_module_path(name):
        return load(name, where)
    raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")


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
    if base in METHODS:
        return base, METHODS[base]
    if is_module_path(str(base)):
        return base, load(base, f"config.{name}.{VARIANT_KEY}")
    raise ConfigError(f"config.{name}.{VARIANT_KEY} is {base!r}; expected one of "
                      f"{', '.join(METHODS)}, or the dotted path of a method's module")


def is_method(config, name: str) -> bool:
    """Whether stage ``name`` is a method or a variant of one (see ``resolve``)."""
    block = config.get(name) if hasattr(config, "get") else None
    return name in METHODS or (hasattr(block, "get") and block.get(VARIANT_KEY) is not None)
