"""``tools/mutation_check.py``'s list stays live: every mutation's text is found exactly once in its
file and every test it names exists, so a refactor cannot silently turn a mutant ``stale`` (the
full check is minutes and not part of CI; this is milliseconds)."""

import ast
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "mutation_check_tool", os.path.join(ROOT, "tools", "mutation_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MUTATIONS = _load().MUTATIONS


def _test_names(path: str) -> set[str]:
    """Names of the test functions (and ``Class::method``) defined in a test file."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return names


def test_mutation_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)) and len(names) >= 40


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_mutation_text_is_found_once_and_changes_it(m):
    with open(os.path.join(ROOT, m.path)) as f:
        source = f.read()
    count = source.count(m.old)
    assert count == 1, f"{m.name}: its text occurs {count} times in {m.path}"
    assert m.new != m.old


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_mutation_tests_exist(m):
    args, k_expr = list(m.tests), False
    for arg in args:
        if arg == "-k":
            k_expr = True
            continue
        if k_expr:  # the expression of -k: it must select some test of the files named
            files = [a.split("::")[0] for a in args if a.startswith("tests/")]
            names = set().union(*(_test_names(f) for f in files))
            words = [w for w in arg.replace("(", " ").replace(")", " ").split()
                     if w not in ("and", "or", "not")]
            assert any(w in n for w in words for n in names), f"{m.name}: -k {arg} selects nothing"
            k_expr = False
            continue
        path, _, node = arg.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), f"{m.name}: no test file {path}"
        if node:
            name = node.split("[")[0]
            assert name in _test_names(path), f"{m.name}: no test {name} in {path}"
