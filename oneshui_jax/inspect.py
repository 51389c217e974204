"""Inspect checkpoints: parameter tree, run metadata, and per-layer differences of two runs.

The command line is ``python -m oneshui_jax.inspect`` (``oneshui_jax/cli/inspect.py``)::

    python -m oneshui_jax.inspect RUN_DIR                 # tree + metadata of a run
    python -m oneshui_jax.inspect RUN_DIR/train_state     # latest resumable training state
    python -m oneshui_jax.inspect --diff RUN_A RUN_B      # ||a - b|| / ||a|| per tensor
    python -m oneshui_jax.inspect RUN_DIR --json          # the same, machine-readable
    python -m oneshui_jax.inspect --verify RUN_DIR        # re-read params/, artifacts/ and
                                                          # metadata.json, check their sha256

``RUN_DIR`` is a folder written by ``oneshui_jax.checkpoints`` (``params/``, ``metadata.json``,
see that module). The tree is read from orbax metadata (names, shapes, dtypes), without loading
any array; ``--diff`` loads both parameter sets (verifying their hashes). ``--verify`` reads
every parameter and checks their sha256 against ``params_hash`` in ``metadata.json`` (and every
file of ``params/`` against the names and sizes recorded when it was saved), the method's
artifacts against ``artifacts_hash`` where the run has them, and ``metadata.json`` against the
hash of its own content it records (``metadata_hash``): a hand-edited metadata.json is refused.
A run written before metadata hashes were recorded is verified for its parameters, and the
output says its metadata.json could not be checked. A path that is not a checkpoint, or one
whose parameters, artifacts or metadata are unreadable or do not match their hash, prints one
``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oneshui_jax import checkpoints
from oneshui_jax.errors import CheckpointError


def _leaves_summary(leaves: list[checkpoints.LeafInfo]) -> dict[str, Any]:
    """Rows and totals of a parameter tree."""
    rows = [{"name": leaf.name, "shape": list(leaf.shape), "dtype": leaf.dtype.name,
             "count": leaf.count} for leaf in leaves]
    totals = {"tensors": len(leaves), "parameters": sum(leaf.count for leaf in leaves),
              "bytes": sum(leaf.nbytes for leaf in leaves)}
    return {"leaves": rows, "totals": totals}


def train_state_summary(run_dir: str) -> dict[str, Any]:
    """Latest step of ``run_dir/train_state``: its arrays (metadata only) and JSON state."""
    directory = os.path.join(run_dir, checkpoints.TRAIN_STATE_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no training state at {directory}: the directory does not exist")
    with checkpoints.TrainCheckpointer(run_dir) as checkpointer:
        info = checkpointer.info()
    if info is None:
        raise CheckpointError(f"{directory} holds no committed step (expected step folders "
                              "written by TrainCheckpointer.save)")
    step, leaves, state = info
    return {"path": directory, "kind": "train_state", "step": step, "state": state,
            **_leaves_summary(leaves)}


def run_summary(path: str) -> dict[str, Any]:
    """Metadata and parameter tree of a run folder (or of a ``train_state/`` folder)."""
    path = os.path.normpath(path)
    if os.path.basename(path) == checkpoints.TRAIN_STATE_DIR:
        return train_state_summary(os.path.dirname(path))
    metadata = checkpoints.read_metadata(path)  # its objects checked (config, splits, ...)
    splits, fingerprint = metadata.get("splits") or {}, metadata.get("fingerprint")
    summary = {
        "path": metadata["run_dir"], "kind": "run", "status": metadata["status"],
        "created": metadata.get("created"), "params_hash": metadata.get("params_hash"),
        "run": checkpoints.run_identity(metadata),
        "splits": {name: len(ids) for name, ids in splits.items() if isinstance(ids, list)},
        "metrics": metadata.get("metrics"), "versions": metadata.get("versions") or {},
        "data_audit": metadata.get("data_audit"),
        "stage": metadata.get("stage"), "method": metadata.get("method"),
        "access": metadata.get("access"), "method_config": metadata.get("method_config"),
        "fingerprint": fingerprint.get("hash") if isinstance(fingerprint, dict) else None,
        "artifacts_hash": metadata.get("artifacts_hash"),
    }
    artifacts = os.path.join(path, checkpoints.ARTIFACTS_DIR)
    if os.path.isdir(artifacts) and metadata.get("artifacts_hash"):
        tree = checkpoints.load_tree(path, checkpoints.ARTIFACTS_DIR)
        summary["artifacts"] = [{"name": name, "shape": list(np.shape(leaf)),
                                 "dtype": str(np.asarray(leaf).dtype)}
                                for name, leaf in checkpoints.named_leaves(tree)]
    if metadata["status"] == "done":
        return {**summary, **_leaves_summary(checkpoints.params_info(path))}
    return summary


def verify_summary(path: str) -> dict[str, Any]:
    """Checks the finished run ``path``: its ``metadata.json`` against the hash of its own
    content it records, then every parameter (and artifact) against the sha256 it records;
    CheckpointError when anything is unreadable or differs. ``metadata_verified`` is False for a
    run written before metadata hashes were recorded (its metadata.json is not checkable)."""
    if os.path.basename(os.path.normpath(path)) == checkpoints.TRAIN_STATE_DIR:
        raise CheckpointError(f"--verify checks a finished run's parameters; {path} is a "
                              "training state (give its run directory)")
    metadata = checkpoints.read_metadata(path)
    if not metadata.get("params_hash"):
        raise CheckpointError(f"{path} records no params_hash in {checkpoints.METADATA_FILE}: "
                              "there is nothing to verify against")
    metadata_verified = checkpoints.check_metadata_hash(metadata)  # first: what it records
    params = checkpoints.load_params(path, verify=True)
    leaves = checkpoints.named_leaves(params)
    # a method run's prepared artifacts, recorded by their hash (a request's output records the
    # hash of its method run's, which live there: method_run_dir)
    artifacts_hash = metadata.get("artifacts_hash")
    held = os.path.isdir(os.path.join(path, checkpoints.ARTIFACTS_DIR))
    if artifacts_hash and (held or not metadata.get("method_run_dir")):
        checkpoints.load_tree(path, checkpoints.ARTIFACTS_DIR, expected_hash=artifacts_hash)
    else:
        artifacts_hash = None
    return {"path": metadata["run_dir"], "kind": "verify", "verified": True,
            "params_hash": metadata["params_hash"], "tensors": len(leaves),
            "parameters": int(sum(np.size(leaf) for _, leaf in leaves)),
            "artifacts_hash": artifacts_hash,
            "metadata_verified": metadata_verified}


def _relative(diff_norm: float, ref_norm: float) -> float:
    """``diff / ref``; 0 when both are 0, infinity when only ``ref`` is 0."""
    if ref_norm > 0:
        return diff_norm / ref_norm
    return 0.0 if diff_norm == 0 else float("inf")


def diff_summary(path_a: str, path_b: str) -> dict[str, Any]:
    """Per-tensor relative change ``||a - b|| / ||a||`` (Frobenius), largest first, and global.

    The structures are compared first, from metadata; then both parameter sets are loaded.
    """
    differences = checkpoints.structure_differences(
        {leaf.name: leaf.shape for leaf in checkpoints.params_info(path_a)},
        {leaf.name: leaf.shape for leaf in checkpoints.params_info(path_b)}, path_a, path_b)
    if differences:
        raise CheckpointError("the parameter trees differ in structure; " + "; ".join(differences))
    a = dict(checkpoints.named_leaves(checkpoints.load_params(path_a)))
    b = dict(checkpoints.named_leaves(checkpoints.load_params(path_b)))
    rows, diff_sq, ref_sq = [], 0.0, 0.0
    for name in a:
        a_leaf, b_leaf = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        diff_norm = float(np.linalg.norm(a_leaf - b_leaf))
        ref_norm = float(np.linalg.norm(a_leaf))
        diff_sq, ref_sq = diff_sq + diff_norm**2, ref_sq + ref_norm**2
        rows.append({"name": name, "relative_change": _relative(diff_norm, ref_norm),
                     "norm_a": ref_norm, "norm_diff": diff_norm})
    rows.sort(key=lambda row: row["relative_change"], reverse=True)
    return {"a": os.path.abspath(path_a), "b": os.path.abspath(path_b), "layers": rows,
            "global_relative_change": _relative(diff_sq**0.5, ref_sq**0.5),
            "changed_tensors": sum(row["norm_diff"] > 0 for row in rows)}


def _table(header: Sequence[str], rows: list[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned text columns (``right``: indices of right-aligned columns)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(header), *map(line, rows)]


def _flat_scalars(value: Any, prefix: str = "") -> list[str]:
    """``name value`` for the scalars of a nested dict; lists as their length."""
    if isinstance(value, Mapping):
        return [item for key, sub in value.items()
                for item in _flat_scalars(sub, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, list):
        return [f"{prefix} [{len(value)} items]"]
    if isinstance(value, float):
        return [f"{prefix} {value:.4g}"]
    return [f"{prefix} {value}"]


def _format_leaves(summary: dict[str, Any]) -> list[str]:
    rows = [(leaf["name"], str(tuple(leaf["shape"])), leaf["dtype"], f"{leaf['count']:,}")
            for leaf in summary["leaves"]]
    totals = summary["totals"]
    return [*_table(("name", "shape", "dtype", "count"), rows, right={3}),
            f"total: {totals['tensors']} tensors, {totals['parameters']:,} parameters, "
            f"{totals['bytes']:,} bytes"]


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of ``run_summary``."""
    if summary["kind"] == "train_state":
        lines = [f"training state {summary['path']}", f"step       {summary['step']}",
                 "state      " + ", ".join(_flat_scalars(summary["state"])), "",
                 "arrays (orbax metadata, nothing loaded):"]
        return "\n".join([*lines, *_format_leaves(summary)])
    run = summary["run"]
    lines = [
        f"run        {summary['path']}",
        f"status     {summary['status']}",
        f"created    {summary['created']}",
        f"hash       sha256 {summary['params_hash'] or '-'}",
        f"config     dataset {run['dataset']}, model {run['model']}, "
        f"N {run['num_identities']}, seed {run['seed']}",
        "splits     " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
        + (" (identities; support: images)" if "support" in summary["splits"] else ""),
    ]
    if summary.get("method"):
        lines.append(f"method     {summary['method']} (access {summary.get('access')}): "
                     + ", ".join(_flat_scalars(summary.get("method_config") or {})))
    if summary.get("fingerprint"):
        lines.append(f"stage      {summary.get('stage')}, fingerprint sha256 "
                     f"{str(summary['fingerprint'])[:16]}...")
    if summary.get("artifacts"):
        lines.append(f"artifacts  sha256 {str(summary['artifacts_hash'])[:16]}...: " + ", ".join(
            f"{a['name']} {tuple(a['shape'])} {a['dtype']}" for a in summary["artifacts"]))
    if summary["metrics"]:
        lines.append("metrics    " + ", ".join(_flat_scalars(summary["metrics"])))
    lines.append("versions   " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    audit = summary.get("data_audit")
    if audit:
        lines.append(f"data       {audit.get('images')} images, {audit.get('missing')} "
                     f"missing, {audit.get('unreadable')} unreadable, "
                     f"{audit.get('duplicate_groups')} duplicate groups "
                     f"({audit.get('groups_spanning_identities')} spanning identities), "
                     f"dedup={audit.get('dedup', 'none')}")
    if "leaves" not in summary:
        state = os.path.join(summary["path"], checkpoints.TRAIN_STATE_DIR)
        hint = f"; see {state}" if os.path.isdir(state) else ""
        return "\n".join([*lines, "", f"parameters: not written yet (status training{hint})"])
    return "\n".join([*lines, "", "parameters (orbax metadata, nothing loaded):",
                      *_format_leaves(summary)])


def format_diff(diff: dict[str, Any]) -> str:
    """Human-readable text of ``diff_summary``."""
    rows = [(row["name"], f"{row['relative_change']:.3e}", f"{row['norm_a']:.4g}")
            for row in diff["layers"]]
    return "\n".join([
        f"a: {diff['a']}", f"b: {diff['b']}",
        "relative change ||a - b|| / ||a|| per tensor, largest first:",
        *_table(("name", "relative change", "||a||"), rows, right={1, 2}),
        f"global relative change: {diff['global_relative_change']:.3e} "
        f"({diff['changed_tensors']} of {len(rows)} tensors changed)",
    ])


def format_verify(summary: dict[str, Any]) -> str:
    """Human-readable lines of ``verify_summary``."""
    lines = [f"verified {summary['path']}: {summary['tensors']} tensors, "
             f"{summary['parameters']:,} parameters match sha256 {summary['params_hash']} "
             f"recorded in {checkpoints.METADATA_FILE}"]
    if summary.get("artifacts_hash"):
        lines.append(f"artifacts match sha256 {summary['artifacts_hash']}")
    if summary["metadata_verified"]:
        lines.append(f"{checkpoints.METADATA_FILE} matches the hash of its content it records")
    else:
        lines.append(f"{checkpoints.METADATA_FILE} not checkable: it records no "
                     f"{checkpoints.METADATA_HASH} (written by an older version); only the "
                     "parameters were verified")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m oneshui_jax.inspect: an alias of the command line
    import runpy  # run, not imported: this library module stays below the command lines

    runpy.run_module("oneshui_jax.cli.inspect", run_name="__main__")
