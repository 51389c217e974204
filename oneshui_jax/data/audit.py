"""Integrity audit of a real dataset's image files, run before anything is built or trained.

The reference opens images lazily and trusts its annotation files. This audit checks every
annotated image once, before any run:

* **missing**: an annotation row whose image file does not exist;
* **unreadable**: a file that is not a regular file, is above ``images``' byte or pixel cap, or
  that ``images`` cannot decode to the end (e.g. a truncated JPEG, a float image out of range);
* **byte-identical images**: groups of files with the same sha256, whether a group spans several
  identities (the same picture filed under two people) and whether it crosses the forget /
  retain / val / test boundary of the current split (a "forgotten" picture still trained on, or
  a test picture seen in training).

MUFAC has 3,144 such groups (7,093 images), every one spanning two or more identity labels: the
same person filed under two families. The default keeps the reference's raw labels (parity);
``--config.data.dedup=merge`` merges the identities of each group before splitting
(``merge_identities``), a documented deviation.

Per-file results (size, mtime, sha256, decode error) are cached in a JSON-lines file that is
appended to as files are checked, so an interrupted audit resumes where it stopped and a repeated
one only re-checks files whose size or mtime changed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from oneshui_jax.data import images
from oneshui_jax.data.annotations import IdentityAnnotations

_CACHE_FLUSH_EVERY = 2000
_CHECK_VERSION = 2
"""Cached results of another version of ``_check_file`` are checked again (2: ``images``'
regular-file, byte and pixel caps and pixel ranges)."""


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """What the audit learned about one file."""

    size: int
    mtime_ns: int
    sha256: str | None  # None when missing
    error: str | None  # why the file cannot be used, None when it decodes


def _check_file(path: str) -> FileCheck:
    """The file's size, mtime, sha256 and why it cannot be used (``images.read_bytes`` and
    ``images.check``: a regular file within the byte and pixel caps that decodes to RGB)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return FileCheck(-1, -1, None, "missing")
    except OSError as e:  # e.g. permission denied on a folder above it
        return FileCheck(-1, -1, None, e.strerror or f"{type(e).__name__}: {e}")
    try:
        data = images.read_bytes(path, name=path)
    except images.ImageError as e:  # not a regular file, too large, unreadable: never read
        return FileCheck(stat.st_size, stat.st_mtime_ns, None, e.reason)
    digest = hashlib.sha256(data).hexdigest()
    try:
        # Decoding a JPEG at 1/8 scale still reads every entropy-coded byte, so truncation and
        # corruption are caught at a fraction of the cost of a full decode.
        images.check(data, path)
    except images.ImageError as e:
        return FileCheck(stat.st_size, stat.st_mtime_ns, digest, e.reason)
    return FileCheck(stat.st_size, stat.st_mtime_ns, digest, None)


def _read_cache(path: str | None) -> dict[str, FileCheck]:
    cache: dict[str, FileCheck] = {}
    if not path or not os.path.exists(path):
        return cache
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
                if entry.get("check") != _CHECK_VERSION:
                    continue
                cache[entry["file"]] = FileCheck(entry["size"], entry["mtime_ns"],
                                                 entry["sha256"], entry["error"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupt
    return cache


def check_files(data_dir: str, files: Sequence[str], cache_path: str | None = None,
                num_threads: int = 8,
                progress: Callable[[int], None] | None = None) -> list[FileCheck]:
    """Checks ``files`` (relative to ``data_dir``), reusing and extending the cache file."""
    cache = _read_cache(cache_path)
    out: list[FileCheck | None] = [None] * len(files)
    todo = []
    for i, rel in enumerate(files):
        cached = cache.get(rel)
        if cached is not None and cached.error != "missing":
            try:
                stat = os.stat(os.path.join(data_dir, rel))
            except FileNotFoundError:
                stat = None
            if stat is not None and (stat.st_size, stat.st_mtime_ns) == (cached.size,
                                                                       cached.mtime_ns):
                out[i] = cached
                continue
        todo.append(i)
    if progress:
        progress(len(files) - len(todo))
    if todo:
        sink = _open_cache(cache_path)
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
                results = pool.map(lambda i: _check_file(os.path.join(data_dir, files[i])), todo)
                for n, (i, check) in enumerate(zip(todo, results, strict=True), start=1):
                    out[i] = check
                    if sink and check.error != "missing":
                        try:
                            sink.write(json.dumps({"file": files[i], "check": _CHECK_VERSION,
                                                   **dataclasses.asdict(check)}) + "\n")
                            if n % _CACHE_FLUSH_EVERY == 0:
                                sink.flush()
                        except OSError as e:  # a full disk: the audit goes on uncached
                            _cache_warning(cache_path, e)
                            sink = _close_quietly(sink)
                    if progress:
                        progress(1)
        finally:
            _close_quietly(sink)
    return out  # type: ignore[return-value]


def _open_cache(path: str | None):
    """The cache file opened for appending, or None (with one warning) when it cannot be
    written: a read-only or full TFDS folder costs a re-check next time, not the run."""
    if not path:
        return None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return open(path, "a")  # noqa: SIM115
    except OSError as e:
        _cache_warning(path, e)
        return None


def _cache_warning(path: str, error: OSError) -> None:
    logging.warning("audit: cannot write its cache %s (%s); the images will be checked again "
                    "next time", path, error.strerror or error)


def _close_quietly(sink) -> None:
    if sink is not None:
        try:
            sink.close()
        except OSError as e:  # the last lines could not be flushed: the cache stays valid
            _cache_warning(sink.name, e)
    return None


def content_hash(files: Sequence[str], digests: Sequence[str | None]):
    """A running sha256 over every (file name, content sha256) pair, in order."""
    h = hashlib.sha256()
    for rel, digest in zip(files, digests, strict=True):
        h.update(f"{rel}\0{digest}\n".encode())
    return h


@dataclasses.dataclass(frozen=True)
class Audit:
    """The audit of one dataset: per-image checks plus duplicate groups (image indices)."""

    dataset: str
    data_dir: str
    files: tuple[str, ...]
    identities: np.ndarray
    checks: tuple[FileCheck, ...]

    @property
    def missing(self) -> list[int]:
        return [i for i, c in enumerate(self.checks) if c.error == "missing"]

    @property
    def unreadable(self) -> list[int]:
        return [i for i, c in enumerate(self.checks) if c.error not in (None, "missing")]

    @functools.cached_property
    def duplicate_groups(self) -> list[list[int]]:
        """Groups (two or more images) of byte-identical files, in dataset order."""
        by_hash: dict[str, list[int]] = {}
        for i, c in enumerate(self.checks):
            if c.sha256 is not None:
                by_hash.setdefault(c.sha256, []).append(i)
        return [g for g in by_hash.values() if len(g) > 1]

    def spanning_groups(self) -> list[list[int]]:
        """Duplicate groups whose images carry more than one identity label."""
        return [g for g in self.duplicate_groups if len(set(self.identities[g].tolist())) > 1]

    def fingerprint(self) -> str:
        """sha256 over every (file, content hash): names the exact image set."""
        return content_hash(self.files, [c.sha256 for c in self.checks]).hexdigest()

    def problems(self) -> str | None:
        """One message naming every missing or unreadable image (first ten), or None."""
        lines = []
        for what, idx in (("missing", self.missing), ("unreadable", self.unreadable)):
            if not idx:
                continue
            shown = ", ".join(
                os.path.join(self.data_dir, self.files[i])
                + ("" if what == "missing" else f" ({self.checks[i].error})") for i in idx[:10])
            more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
            lines.append(f"{len(idx)} {what} image(s): {shown}{more}")
        return "; ".join(lines) or None

    def crossing(self, roles: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """Duplicate groups whose images fall into more than one role of a split.

        ``roles`` maps a role (forget, retain, val, test, support) to image indices. Returns the
        number of groups per sorted role combination, e.g. ``{"retain+test": 3}``.
        """
        role_of = {}
        for role, indices in roles.items():
            for i in np.asarray(indices).tolist():
                role_of[i] = role
        counts: dict[str, int] = {}
        for group in self.duplicate_groups:
            seen = sorted({role_of[i] for i in group if i in role_of})
            if len(seen) > 1:
                key = "+".join(seen)
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self, roles: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
        """What goes into run metadata: counts plus a few examples."""
        groups = self.duplicate_groups
        spanning = self.spanning_groups()
        out: dict[str, Any] = {
            "dataset": self.dataset, "data_dir": os.path.abspath(self.data_dir),
            "images": len(self.files), "missing": len(self.missing),
            "unreadable": len(self.unreadable),
            "duplicate_groups": len(groups),
            "duplicate_images": int(sum(len(g) for g in groups)),
            "groups_spanning_identities": len(spanning),
            "images_in_spanning_groups": int(sum(len(g) for g in spanning)),
            "examples": [[self.files[i] for i in g] for g in spanning[:3]],
            "fingerprint": self.fingerprint(),
        }
        if roles is not None:
            out["groups_crossing_split"] = self.crossing(roles)
        return out


def format_summary(summary: Mapping[str, Any], dedup: str) -> str:
    """The audit as a few printable lines."""
    s = summary
    lines = [f"data audit: {s['dataset']}, {s['images']:,} images under {s['data_dir']}",
             f"  missing {s['missing']}, unreadable {s['unreadable']}",
             f"  byte-identical groups: {s['duplicate_groups']:,} ({s['duplicate_images']:,} "
             f"images); spanning several identities: {s['groups_spanning_identities']:,} "
             f"({s['images_in_spanning_groups']:,} images)"]
    if s["examples"]:
        lines.append("  e.g. " + " = ".join(s["examples"][0]))
    crossing = s.get("groups_crossing_split")
    if crossing is not None:
        shown = ", ".join(f"{k}: {v}" for k, v in crossing.items()) or "none"
        lines.append(f"  groups crossing the split's roles: {shown}")
    if s["groups_spanning_identities"]:
        lines.append("  identities merged across these groups (config.data.dedup=merge)"
                     if dedup == "merge" else
                     "  kept the raw identity labels (parity); config.data.dedup=merge merges them")
    return "\n".join(lines)


def audit(dataset: str, data_dir: str, ann: IdentityAnnotations, cache_path: str | None = None,
          num_threads: int = 8, progress: bool = False) -> Audit:
    """Checks every image of ``ann`` under ``data_dir`` (cached in ``cache_path``)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ann.num_images, desc=f"audit {dataset}", unit="img", leave=False)
    try:
        checks = check_files(data_dir, ann.files, cache_path, num_threads,
                             progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    return Audit(dataset, data_dir, ann.files, ann.identities, tuple(checks))


def merge_identities(ann: IdentityAnnotations, groups: Sequence[Sequence[int]]
                     ) -> tuple[IdentityAnnotations, int]:
    """Identities that share a byte-identical image become one (``config.data.dedup=merge``).

    Connected identities (union-find over the duplicate groups) take the smallest id among them.
    For list-keyed datasets (CelebA-HQ, MUFAC) ids are then renumbered ``0..K-1`` keeping their
    order, so ``identity_to_images`` has no empty entries. Returns the new annotations and the
    number of identities removed.
    """
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for group in groups:
        ids = sorted({int(ann.identities[i]) for i in group})
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    merged = np.asarray([find(int(i)) for i in ann.identities.tolist()], np.int64)
    if ann.keyed == "list":  # renumber 0..K-1 in order; unannotated images (-1) stay -1
        known = merged >= 0
        _, dense = np.unique(merged[known], return_inverse=True)
        merged[known] = dense
    removed = len(np.unique(ann.identities)) - len(np.unique(merged))
    return dataclasses.replace(ann, identities=merged), removed
