"""The method settings reference (``docs/method-settings.md``), generated from each method's
``Config`` dataclass (``unlearn/api.py``), never written by hand: every setting of
``config.<method>`` with its default, its declared range and the comment beside it in the code.
``python tools/settings_doc.py`` writes the page; ``tests/test_layout.py`` checks it is current.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types

from oneshui_jax.unlearn import api, registry


def field_comments(config_cls: type) -> dict[str, str]:
    """``{field: comment}``: the comment at the end of a field's lines, else the comment lines
    right above it, joined (``#`` and spaces stripped)."""
    source = textwrap.dedent(inspect.getsource(config_cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        out[node.target.id] = " ".join(trailing or above)
    return out


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "(required)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def method_table(name: str, module: types.ModuleType) -> str:
    """One method's section: its access level and a row per setting."""
    cls = module.Config
    comments = field_comments(cls)
    ranges = getattr(cls, "RANGES", {})
    doc = (inspect.getdoc(cls) or "").splitlines()[0]
    rows = [f"## {name}", "", f"ACCESS `{module.ACCESS}`. {doc}", "",
            "| setting | default | accepted | what it does |", "|---|---|---|---|"]
    for f in api.settings(cls):
        accepted = ranges[f.name].expected if f.name in ranges else ""
        rows.append(f"| `{f.name}` | `{_cell(_default(f))}` | {_cell(accepted)} | "
                    f"{_cell(comments.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def settings_reference() -> str:
    """The whole page: every method of the registry, in its order."""
    head = ("# Method settings\n\n"
            "Every setting of each method's config block (`config.<method>`, e.g.\n"
            "`--config.meta_unlearn.lr=1e-3`), generated from the methods' `Config` dataclasses\n"
            "by `python tools/settings_doc.py` (`tests/test_layout.py` checks that this page is\n"
            "current). The defaults are the code's; the real-data configs set the reference's\n"
            "values per dataset and N (`configs/HPARAMS.md`). A value outside its accepted range\n"
            "is one error before any work.\n")
    return "\n".join([head, *(method_table(n, m) for n, m in registry.METHODS.items())])
