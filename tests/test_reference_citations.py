"""Every "SPEC" citation in the repository names a section or quirk of docs/reference.md.

Docstrings, comments and pages cite the original code's behaviour as ``SPEC.md 5.5``,
``SPEC.md section 3``, ``SPEC §7.3-7.5``, ``SPEC Q24``, ``SPEC.md 4.2, 6.6, 7 and 8``,
``SPEC.md 5.5, quirks Q5 and Q6``, ``SPEC.md preamble`` or a bare ``(Q6)``. docs/reference.md
("The reference's behaviour") carries the same numbering as headings (``## 5. Metrics``,
``### 5.5 ...``, ``### Q6 ...``, ``## Preamble``); this test checks that every cited number is one
of them. Plain text only: no JAX.
"""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "reference.md")
THIS = os.path.abspath(__file__)
SCANNED_DIRS = ("oneshui_jax", "configs", "launch", "bench", "tools", "tests", "docs")
SCANNED_FILES = ("README.md",)
SKIPPED_DIRS = (os.path.join("bench", "results"),)
EXTENSIONS = (".py", ".md", ".sh", ".yml", ".yaml", ".toml")

# The headings the page must have: the numbering of the reference's specification.
EXPECTED_SECTIONS = frozenset(
    ["preamble"]
    + [str(n) for n in range(1, 11)]
    + [f"1.{i}" for i in range(1, 5)] + [f"2.{i}" for i in range(1, 6)]
    + [f"4.{i}" for i in range(1, 5)] + [f"5.{i}" for i in range(1, 7)]
    + [f"6.{i}" for i in range(1, 7)] + [f"7.{i}" for i in range(1, 6)])
EXPECTED_QUIRKS = frozenset(f"Q{n}" for n in range(1, 33))

# --- the citation parser --------------------------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?"
_QUIRK = r"Q\d+"
# One cited item: a section or a range of sections, a quirk or a range of quirks.
_ITEM = rf"(?:{_QUIRK}(?:\s*-\s*Q?\d+)?|{_NUMBER}(?:\s*-\s*{_NUMBER})?)"
# What may introduce an item: "§", "section(s)", "quirk(s)".
_LEAD = r"(?:§\s*|sections?\s+|quirks?\s+)?"
# A list item after the first must end where a list can go on or stop, so that
# "SPEC.md 6.6, 5 outer batches" cites 6.6 only.
_END = r"(?=[ \t]*(?:[,;/:.)\]|]|\n|$|and\b|or\b))"
_SEP = r"\s*(?:,|;|/|\band\b|\bor\b)\s*(?:and\s+|or\s+)?"
SPEC_CITATION = re.compile(
    rf"\bSPEC(?:\.md)?(?![\w'’])[ \t]*(?:\n[ \t#]*)?"
    rf"(?P<items>preamble\b|{_LEAD}{_ITEM}(?:{_SEP}{_LEAD}{_ITEM}{_END})*)")
BARE_QUIRK = re.compile(r"(?<![\w.])Q(\d+)(?:\s*-\s*Q?(\d+))?(?![\w.])")
ITEM = re.compile(rf"{_QUIRK}(?:\s*-\s*Q?\d+)?|{_NUMBER}(?:\s*-\s*{_NUMBER})?|preamble")


def _expand(item: str) -> set[str]:
    """``"5.1-5.3"`` -> {5.1, 5.2, 5.3}; ``"3-5"`` -> {3, 4, 5}; ``"Q2-Q6"`` -> Q2..Q6."""
    item = re.sub(r"\s+", "", item)
    if item == "preamble":
        return {"preamble"}
    if item.startswith("Q"):
        first, _, last = item[1:].partition("-")
        last = last.lstrip("Q") or first
        if int(last) < int(first):
            raise ValueError(f"descending quirk range {item!r}")
        return {f"Q{n}" for n in range(int(first), int(last) + 1)}
    first, _, last = item.partition("-")
    if not last:
        return {first}
    a, b = first.split("."), last.split(".")
    if len(a) == len(b) == 1 and int(a[0]) <= int(b[0]):
        return {str(n) for n in range(int(a[0]), int(b[0]) + 1)}
    if len(a) == len(b) == 2 and a[0] == b[0] and int(a[1]) <= int(b[1]):
        return {f"{a[0]}.{n}" for n in range(int(a[1]), int(b[1]) + 1)}
    raise ValueError(f"cannot expand the range {item!r}")


def citations(text: str) -> list[tuple[int, set[str]]]:
    """Every citation in ``text``: (offset, the sections / quirks / "preamble" it cites).

    ``SPEC`` / ``SPEC.md`` followed by a list of items, and every bare ``Qn`` (or ``Qa-Qb``)
    outside such a list."""
    found, spans = [], []
    for m in SPEC_CITATION.finditer(text):
        cited = set()
        for item in ITEM.findall(m.group("items")):
            cited |= _expand(item)
        found.append((m.start(), cited))
        spans.append(m.span("items"))
    for m in BARE_QUIRK.finditer(text):
        if any(start <= m.start() < end for start, end in spans):
            continue
        found.append((m.start(), _expand(m.group(0))))
    return sorted(found, key=lambda c: c[0])


def cited(text: str) -> set[str]:
    """The union of everything ``text`` cites."""
    return set().union(*(c for _, c in citations(text)))


@pytest.mark.parametrize("text, expected", [
    ("(SPEC.md 5.5).", {"5.5"}),
    ("(SPEC.md 4.2, 6.6, 7 and 8). This module", {"4.2", "6.6", "7", "8"}),
    ("(SPEC.md section 3: timm", {"3"}),
    ("(SPEC.md sections 4, 5 and 10) as library", {"4", "5", "10"}),
    ("| (SPEC §7.3) |", {"7.3"}),
    ("Numerics (SPEC §3-5, Q2-Q6, Q10, Q25). bf16",
     {"3", "4", "5", "Q2", "Q3", "Q4", "Q5", "Q6", "Q10", "Q25"}),
    ("keeps the values above (SPEC Q24); then", {"Q24"}),
    ("SPEC.md 7.4 and Q21). The model", {"7.4", "Q21"}),
    ("(SPEC.md 5.5, quirks Q5 and Q6).", {"5.5", "Q5", "Q6"}),
    ("per-sample **losses** (not probabilities, Q5) from", {"Q5"}),
    ("run as TF32 on its GPU (SPEC.md preamble); here", {"preamble"}),
    ("**Evaluation batch** (SPEC 5.1-5.2, Q28). A split's", {"5.1", "5.2", "Q28"}),
    ("(SPEC.md 7.1-7.2), ACCESS full", {"7.1", "7.2"}),
    ("They follow SPEC.md 7.3 / 7.4 / 7.5 and take", {"7.3", "7.4", "7.5"}),
    ("(SPEC.md 6.6, 5 outer batches of 64 forget", {"6.6"}),
    ("(SPEC.md 4.4, the ``args``", {"4.4"}),
    ("(SPEC.md 4.2; const.py, ViT", {"4.2"}),
    ("(SPEC.md 6.6: CelebA {5, 10}, CelebA-HQ {20, 50})", {"6.6"}),
    ('(SPEC.md\n4.4), with orbax', {"4.4"}),
    ("(SPEC.md 5.1, 6.2, 6.3, Q18).", {"5.1", "6.2", "6.3", "Q18"}),
    ("SPEC.md 7.2, Q20) on a tiny ViT", {"7.2", "Q20"}),
    ("Where the SPEC is silent, this port chooses", set()),
    ("a naive re-computation of the SPEC's formula:", set()),
    ("[--labels SPEC ...] --out DIR", set()),
])
def test_citation_parser(text, expected):
    assert cited(text) == expected


@pytest.mark.parametrize("bad", ["SPEC §4.2-5.1", "SPEC Q9-Q3"])
def test_citation_parser_refuses_ranges_it_cannot_expand(bad):
    with pytest.raises(ValueError):
        cited(bad)


# --- the page and the repository -------------------------------------------------------------

def _without_fences(text: str) -> str:
    """``text`` with fenced code blocks blanked out (their ``#`` lines are no headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def page_headings(text: str) -> set[str]:
    """The section numbers, quirks and "preamble" that are headings of the page."""
    heads = set()
    for line in _without_fences(text).splitlines():
        m = re.match(r"^#{2,3}\s+(?:(\d+(?:\.\d+)?)\.?\s|(Q\d+)\b|(Preamble)\b)", line)
        if m:
            heads.add(m.group(1) or m.group(2) or "preamble")
    return heads


def scanned_files() -> list[str]:
    """The repository's text files whose citations must resolve (relative paths)."""
    paths = list(SCANNED_FILES)
    for top in SCANNED_DIRS:
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            rel_root = os.path.relpath(root, REPO)
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__"))
                             and os.path.join(rel_root, d) not in SKIPPED_DIRS)
            paths += [os.path.join(rel_root, f) for f in sorted(files) if f.endswith(EXTENSIONS)]
    return [p for p in paths if os.path.abspath(os.path.join(REPO, p)) != THIS]


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8", errors="replace") as f:
        return f.read()


def _texts_but_the_page():
    """``(file, text)`` of every scanned file but the page itself."""
    page = os.path.relpath(PAGE, REPO)
    return [(rel, _read(rel)) for rel in scanned_files() if rel != page]


def repository_citations() -> list[tuple[str, int, set[str]]]:
    """(file, line, cited) of every citation outside the page itself (the page's own
    cross-references are checked by ``test_the_page_cross_references_resolve``)."""
    out = []
    for rel, text in _texts_but_the_page():
        for offset, items in citations(text):
            out.append((rel, text.count("\n", 0, offset) + 1, items))
    return out


@pytest.fixture(scope="module")
def page() -> str:
    with open(PAGE, encoding="utf-8") as f:
        return f.read()


def test_the_page_has_every_section_and_quirk(page):
    heads = page_headings(page)
    assert EXPECTED_SECTIONS - heads == set(), "sections missing from docs/reference.md"
    assert EXPECTED_QUIRKS - heads == set(), "quirks missing from docs/reference.md"


def test_every_citation_resolves_to_a_heading_of_the_page(page):
    heads = page_headings(page)
    found = repository_citations()
    unresolved = [f"{rel}:{line}: {', '.join(sorted(items - heads))}"
                  for rel, line, items in found if items - heads]
    assert not unresolved, "citations of no heading in docs/reference.md:\n" + "\n".join(
        unresolved)
    # The scan really finds the citations (a broken pattern would find none and pass).
    distinct = set().union(*(items for _, _, items in found))
    sections = {c for c in distinct if not c.startswith("Q")}
    quirks = distinct - sections
    assert len(found) >= 150, f"only {len(found)} citations found"
    assert len(sections) >= 30, sorted(sections)
    assert len(quirks) >= 15, sorted(quirks)
    assert {"preamble", "2.5", "5.5", "7.3", "Q6", "Q24"} <= distinct


def test_every_spec_md_mention_names_a_section():
    """``SPEC.md`` is a citation, never a file to open: a section must follow it."""
    dangling = []
    for rel, text in _texts_but_the_page():
        resolved = {m.start() for m in SPEC_CITATION.finditer(text)}
        dangling += [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}"
                     for m in re.finditer(r"\bSPEC\.md\b", text) if m.start() not in resolved]
    assert not dangling, "SPEC.md without a section: " + ", ".join(dangling)


def test_the_page_cross_references_resolve(page):
    body = "\n".join(line for line in page.splitlines() if not line.startswith("#"))
    assert cited(body) <= page_headings(page)


def test_the_page_points_at_no_file_outside_the_repository(page):
    assert "shared/" not in page and "/work/" not in page
    assert not re.search(r"\]\([^)]*SPEC", page), "a link to the specification file"
    # "SPEC.md" appears only as the citation form the opening paragraph explains.
    flat = re.sub(r"\s+", " ", page)
    rest = re.sub(r"`SPEC\.md (?:section )?x`", "", flat)
    assert "SPEC.md" not in rest
