"""The shape of the package (README "Layout"): a short study command, every command line in
``oneshui_jax/cli/``, and the historical ``python -m`` names as aliases that only run it.
Layers and import cycles are checked by ``lint-imports`` in the test command (pyproject.toml)."""

from __future__ import annotations

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "oneshui_jax")
COMMAND_PARSERS = ("argparse", "absl.app", "app.run(", "flags.DEFINE_")


def _modules() -> list[str]:
    out = []
    for folder, _, names in os.walk(PACKAGE):
        out += [os.path.relpath(os.path.join(folder, n), REPO) for n in names if n.endswith(".py")]
    return sorted(out)


def _main_block(tree: ast.Module) -> ast.If | None:
    """The module's ``if __name__ == "__main__":`` block, if any (the last one)."""
    blocks = [node for node in tree.body if isinstance(node, ast.If)
              and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)]
    return blocks[-1] if blocks else None


def test_the_study_command_is_short():
    with open(os.path.join(PACKAGE, "main.py"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 100  # flags -> study.run -> the report's summary


@pytest.mark.parametrize("path", [p for p in _modules() if not p.startswith(
    os.path.join("oneshui_jax", "cli")) and p != os.path.join("oneshui_jax", "main.py")])
def test_no_library_module_defines_a_command_line(path):
    """Outside ``cli/`` and ``main.py`` a module parses no command line; where it keeps a
    ``python -m`` name, its ``__main__`` block only runs the command of ``oneshui_jax.cli``."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    block = _main_block(tree)
    body = source if block is None else source.replace(ast.get_source_segment(source, block), "")
    assert not [p for p in COMMAND_PARSERS if p in body], f"{path} parses a command line"
    assert "def main(" not in source, f"{path} defines main(): it belongs in oneshui_jax/cli/"
    if block is not None:
        calls = [ast.unparse(n) for n in ast.walk(block) if isinstance(n, ast.Call)]
        runs = [c for c in calls if c.startswith("runpy.run_module('oneshui_jax.cli.")]
        assert runs and len(calls) == len(runs), (
            f"{path}: its __main__ block should only run a command of oneshui_jax.cli, got "
            f"{calls}")


def test_the_readme_is_one_screenful_that_points_into_the_docs():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 200  # the rest lives in docs/ (mkdocs.yml)
    with open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8") as f:
        nav = f.read().split("\nnav:\n", 1)[1]
    pages = re.findall(r":\s+(\S+\.md)\s*$", nav, flags=re.M)
    assert len(pages) >= 20 and "reference.md" in pages  # the parse found the navigation
    assert [p for p in pages if p != "index.md" and f"(docs/{p})" not in readme] == []


def test_every_command_is_listed_in_the_readme():
    commands = sorted(n[:-3] for n in os.listdir(os.path.join(PACKAGE, "cli"))
                      if n.endswith(".py") and n not in ("__init__.py", "common.py",
                                                          "config_flags.py"))
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert [c for c in commands if f"cli/{c}.py" not in readme] == []


def test_the_reproduction_page_has_a_valid_command_for_every_table():
    """``docs/reproduce.md``: one row per (dataset, N) of the paper's grid, whose study command
    loads (as ``python -m oneshui_jax.main`` would) and validates (no data read)."""
    import re

    from oneshui_jax import config_lib
    from oneshui_jax.cli import config_flags
    from oneshui_jax.cli.estimate import DEFAULT_RATES
    from oneshui_jax.study import estimate, validate

    with open(os.path.join(REPO, "docs", "reproduce.md"), encoding="utf-8") as f:
        page = f.read()
    rates = estimate.Rates.from_results(os.path.join(REPO, DEFAULT_RATES))
    gpu_cells = {}
    commands = re.findall(r"`python -m oneshui_jax\.main ([^`]+)`", page)
    found = {}
    for command in commands:
        args = [a.replace("=S", "=0") for a in command.split()]  # seed S: 0
        args = ["--config=" + os.path.join(REPO, a[len("--config="):])
                if a.startswith("--config=configs/") else a for a in args]
        config = config_flags.load_config(args)
        validate.validate_config(config)
        assert config.mia.rmia  # the paper's MIA column
        found[(config.dataset, config.num_identities)] = config.stages
        seconds = estimate.estimate(config, rates)["total"]
        gpu_cells[(config.dataset, config.num_identities)] = f"{estimate.hours(seconds)} (estimate)"
    wanted = {(d, n) for d, ns in config_lib.PAPER_GRID.items() for n in ns}
    assert set(found) == wanted
    assert all(stages == config_lib.TRAINING + config_lib.ALL  # every row of the paper's table
               for stages in found.values())
    # The GPU column is the estimate from the newest GPU check (cli/estimate.py's default).
    names = {"CelebA-HQ": "celebahq", "CelebA": "celeba", "MUFAC": "mufac"}
    shown = {(names[m[0]], int(m[1])): m[2] for m in re.findall(
        r"^\| (CelebA-HQ|CelebA|MUFAC) \| (\d+) \| `[^`]+` \| `[^`]+` \| ([^|]+) \|", page,
        flags=re.M)}
    assert {k: v.strip() for k, v in shown.items()} == gpu_cells


def test_the_method_settings_page_is_generated_from_the_code():
    """``docs/method-settings.md`` is ``settings_doc.settings_reference()``: every setting of
    every method with its default, range and comment (regenerate with
    ``python tools/settings_doc.py``)."""
    from oneshui_jax.unlearn import registry, settings_doc

    with open(os.path.join(REPO, "docs", "method-settings.md"), encoding="utf-8") as f:
        assert f.read() == settings_doc.settings_reference()
    comments = settings_doc.field_comments(registry.METHODS["lipschitz"].Config)
    assert comments["lr"] == "plain SGD: no momentum, no weight decay"  # trailing comment
    assert comments["n_samples"] == "Perturbed copies of each batch whose K_s the loss averages."
