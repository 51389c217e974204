"""Serving one deletion request end to end (paper section 3: the test-time half of 1-SHUI).

:func:`serve_request` is the work: read and hash the portraits, load the :class:`Engine`
(``serve/engine.py``: which model and method run), unlearn, write the output run directory and
``receipt.json`` (``serve/request.py``). An ``--out`` inside a run it reads (the model, the
method run), or holding one, is refused naming both paths. Every error a user can cause is one
:class:`DataError` / :class:`ConfigError` / :class:`CheckpointError` raised before anything is
written (``--out`` included: its folder is checked before any work). :func:`summary` is the few
lines the command line prints (``python -m oneshui_jax.unlearn``: ``oneshui_jax/cli/request.py``).

The output directory is a run directory like the study's: the source's ``config``, ``splits``
and ``model_config``, ``stage: "request"``, ``method``, ``access``, ``method_config``,
``request_id``, ``requests`` (the ids of every request in the chain), ``source_checkpoint``,
``source_params_hash``, ``method_run_dir``, ``artifacts_hash``, and ``base_run_dir`` /
``base_params_hash`` of the pretrained model at the start of the chain.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import uuid
from collections.abc import Sequence

import jax

from oneshui_jax import checkpoints, locks
from oneshui_jax.errors import ConfigError, DataError
from oneshui_jax.serve import request as request_lib
from oneshui_jax.serve.engine import Engine
from oneshui_jax.serve.request import RECEIPT_FILE, REQUEST_STAGE, Receipt


def serve_request(checkpoint: str, portraits: Sequence[str], out: str, *,
                  artifacts_dir: str | None = None, identities: Sequence[int] | None = None,
                  labels: Sequence[str] | None = None, request_id: str | None = None,
                  method: str | None = None, overwrite: bool = False) -> Receipt:
    """Serves one request end to end and returns its receipt (also written to ``out``).

    ``method``, if given, only asserts that the method run was made by that method. ``out`` is
    locked (``locks.hold``) for the whole request: a second request on the same ``out`` waits,
    then finds it written and is refused unless ``overwrite``.
    """
    with locks.hold(out, what="a deletion request", warn=_warn, lock_dir=locks.host_lock_dir()):
        start = time.perf_counter()
        if not portraits:
            raise DataError("an empty request: give at least one --portrait")
        request_lib.check_output(out, overwrite, ())
        given_runs = (("the run of --checkpoint", checkpoint), ("the run of --artifacts",
                                                                artifacts_dir))
        checkpoints.check_apart(out, given_runs, strict=True)  # inside or around: before any work
        read = [request_lib.read_portrait(path) for path in portraits]
        engine = Engine.from_checkpoint(checkpoint, artifacts_dir)
        model_meta, method_meta = engine.model_metadata, engine.method_metadata
        if method is not None and method != engine.method:
            raise ConfigError(f"--method {method} was given, but the method run "
                              f"{method_meta['run_dir']} was made by {engine.method}")
        request_lib.check_output(out, overwrite,
                                 (model_meta["run_dir"], method_meta["run_dir"], checkpoint))
        checkpoints.check_apart(out, (("the model run", model_meta["run_dir"]),
                                      ("the method run", method_meta["run_dir"])), strict=True)
        given = None if labels is None else request_lib.parse_labels(
            labels, engine.model.task, engine.model.num_classes)
        load_s = time.perf_counter() - start
        prepared = engine.prepare([image for image, _ in read], identities or None, given)
        params, unlearned = engine.unlearn(prepared)
        request_id = request_id or str(uuid.uuid4())
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        hash_before = model_meta["params_hash"]
        method_config = method_meta["method_config"]
        metadata = {
            "config": model_meta["config"], "splits": model_meta["splits"],
            "model_config": model_meta["model_config"], "stage": REQUEST_STAGE,
            "method": engine.method, "access": engine.access, "method_config": method_config,
            "request_id": request_id, "requests": [*model_meta.get("requests", []), request_id],
            "source_checkpoint": model_meta["run_dir"], "source_params_hash": hash_before,
            "method_run_dir": method_meta["run_dir"],
            "artifacts_hash": method_meta.get("artifacts_hash"),
            "base_run_dir": method_meta.get("base_run_dir"),
            "base_params_hash": method_meta["base_params_hash"],
        }
        save_start = time.perf_counter()

        def make_receipt(hash_after: str) -> Receipt:
            timings = {"load_s": load_s + prepared.timings["prepare_s"],
                       "h2d_s": prepared.timings["h2d_s"],
                       "predict_s": prepared.timings["predict_s"],
                       "compile_s": prepared.timings["compile_s"] + unlearned["compile_s"],
                       "compute_s": unlearned["compute_s"], "digest_s": unlearned["digest_s"],
                       "save_s": time.perf_counter() - save_start}
            timings["total_s"] = time.perf_counter() - start
            return Receipt(
                request_id=request_id, created=created, method=engine.method, access=engine.access,
                portraits=[{"sha256": digest, "width": int(image.shape[1]),
                            "height": int(image.shape[0])} for image, digest in read],
                identities=prepared.identities, labels=request_lib.json_labels(prepared.labels),
                labels_predicted=prepared.labels_predicted, params_hash_before=hash_before,
                params_hash_after=hash_after, params_digest_before=engine.params_digest,
                params_digest_after=unlearned["params_digest"],
                source_checkpoint=model_meta["run_dir"],
                artifacts_run_dir=method_meta["run_dir"],
                artifacts_hash=method_meta.get("artifacts_hash"),
                base_params_hash=method_meta["base_params_hash"], output=os.path.abspath(out),
                method_config=dict(method_config),
                hyperparameters={**method_config, **unlearned["method_info"]},
                seeds={"study": model_meta["config"].get("seed"),
                       "method": method_meta["config"].get("seed"), "request": engine.seed},
                versions=checkpoints.library_versions(), device=str(jax.devices()[0].platform),
                timings=timings)

        return request_lib.write_output(out, params, metadata, make_receipt,
                                        overwrite=overwrite)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(receipt: Receipt) -> str:
    """A few lines for the terminal, naming the method and its access."""
    t = receipt.timings
    ids = sorted({i for i in receipt.identities if i is not None})
    labels = "predicted by the model" if receipt.labels_predicted else "given"
    shown = {k: v for k, v in receipt.hyperparameters.items()
             if k not in receipt.method_config or k in ("meta_lr", "forget_epochs")}
    return "\n".join([
        f"request {receipt.request_id}: forgot {len(receipt.portraits)} portrait(s) of "
        f"identity {', '.join(map(str, ids)) or '-'} with {receipt.method} "
        f"(access {receipt.access}"
        + "".join(f", {k} {_short(v)}" for k, v in shown.items()) + ")",
        f"model      {receipt.source_checkpoint}",
        f"method run {receipt.artifacts_run_dir}",
        f"params     sha256 {receipt.params_hash_before[:16]}... -> "
        f"{receipt.params_hash_after[:16]}... (device digest {receipt.params_digest_after})",
        f"labels     {labels}",
        f"time       load {t['load_s']:.2f} s, compile {t['compile_s']:.2f} s, labels "
        f"{t['predict_s'] * 1e3:.1f} ms, copy {t['h2d_s'] * 1e3:.1f} ms, unlearn "
        f"{t['compute_s'] * 1e3:.1f} ms, digest {t['digest_s'] * 1e3:.1f} ms, save "
        f"{t['save_s']:.2f} s",
        f"wrote      {receipt.output} (params/, {checkpoints.METADATA_FILE}, {RECEIPT_FILE})",
    ])
