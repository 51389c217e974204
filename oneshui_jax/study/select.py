r"""Hyper-parameters chosen without looking at the request (the command line:
``python -m oneshui_jax.select``, ``oneshui_jax/cli/select.py``).

    python -m oneshui_jax.select --config=configs/synthfaces.py [--config.seed=0] [--out DIR]

Picks MetaUnlearn's settings (and shows support_ascent's step length) from simulated deletion
requests of TRAIN identities only, never from the people of the study's request or from any
test metric:

1. the pretrained model of the config (the study's ``pretrain`` stage: reused, or trained);
2. the data selection may read (``study.access.selection_data``): the TRAIN identities outside
   the request, their images, and VAL. The request's people are not readable at all (the
   guarded source refuses their images), so they take part in no meta-training and no score;
3. every candidate of ``config.selection.meta_unlearn`` (each a ``key=value,...`` string of
   overrides on ``config.meta_unlearn``) meta-trains on these identities minus the held-out ones
   (``meta_unlearn.training.validation_identities``) and is scored on the held-out simulated
   requests: the outer objective (SPEC.md 6.3, the one MetaUnlearn minimises) after its
   request-time step, with the factor its line search chose (``step_control`` line_search /
   normalize) or as is (none). Lower is better; the table also shows the objective with no
   step, the share removed, the step's relative size and the share of portraits that give no
   step;
4. support_ascent's ``prepare`` selects its step length on simulated requests of the same
   identities, as it does in the study;
5. the winners, overall and within the reference's family (``step_control`` none, no task
   ascent, one request per update), are written as config overrides.

Writes ``selection.json`` and ``selection.md`` to ``--out`` (default:
``<config.workdir>/selection``) and prints the table; each finished candidate is kept in
``--out/candidates/``, so an interrupted selection resumes with the next one. Refused before
any work, with one ``error:`` line: an ``--out`` inside the pretrained model's run directory,
and a ``config.selection.meta_unlearn`` with no candidate (or one that cannot be scored).

The candidates' scores come from the same held-out requests their line searches use, so a
line-searched candidate's score is slightly optimistic against one without; the study's ToW on
the real request, which no candidate saw, is the honest check.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
from absl import logging

from oneshui_jax import checkpoints, interrupts
from oneshui_jax.data import catalog
from oneshui_jax.errors import ConfigError
from oneshui_jax.files import atomic_open, atomic_set, to_json
from oneshui_jax.study import access, context
from oneshui_jax.study.stages import train_stage
from oneshui_jax.unlearn import api, meta_unlearn, registry, support_ascent

REFERENCE_FAMILY = {"step_control": "none", "task_ascent": 0.0, "requests_per_update": 1}


def parse_candidate(spec: str, where: str = "config.selection.meta_unlearn") -> dict[str, Any]:
    """``"lr=1e-3,meta_lr=3e-4"`` -> ``{"lr": "1e-3", ...}`` (typed later by the Config);
    ``""`` is the block as it is."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: {spec!r} is not a list of key=value pairs separated "
                              "by commas")
        out[key.strip()] = value.strip()
    return out


def _typed(module, overrides: dict[str, str]) -> dict[str, Any]:
    """Each value as its Config field's type (``"1e-3"`` -> 1e-3, ``"true"`` -> True)."""
    fields = {f.name: f for f in api.settings(module.Config)}
    out = {}
    for key, value in overrides.items():
        default = fields[key].default if key in fields else None
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"config.selection.meta_unlearn: {key}={value!r}; expected "
                                  "true or false")
            out[key] = value.lower() == "true"
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        elif isinstance(default, tuple):
            out[key] = tuple(float(v) for v in value.split("/"))
        else:
            out[key] = value
    return out


CANDIDATES = "config.selection.meta_unlearn"
_CANDIDATES_EXPECTED = ("expected a list of override strings of config.meta_unlearn, such as "
                        "('', 'meta_lr=1e-3') ('' is the block as it is)")


def candidate_configs(config, task: str) -> list[tuple[str, Any]]:
    """``(spec, meta_unlearn.Config)`` of every candidate, validated before any work: a
    selection with no candidate, a candidate that is not a string, or one that cannot be scored
    (no held-out requests) is one ConfigError naming ``config.selection.meta_unlearn``."""
    method, module = registry.resolve(config, "meta_unlearn")
    block = config.meta_unlearn.to_dict()
    specs = (config.get("selection") or {}).get("meta_unlearn")
    if isinstance(specs, str):
        raise ConfigError(f"{CANDIDATES} is the string {specs!r}; {_CANDIDATES_EXPECTED}")
    if not specs:
        raise ConfigError(f"{CANDIDATES} lists no candidates, so there is nothing to select "
                          f"from; {_CANDIDATES_EXPECTED}")
    out = []
    for spec in specs:
        if not isinstance(spec, str):
            raise ConfigError(f"{CANDIDATES}: candidate {spec!r} is not a string; "
                              f"{_CANDIDATES_EXPECTED}")
        overrides = _typed(module, parse_candidate(spec))
        cfg = api.make_config(method, module, {**block, **overrides}, task=task)
        if cfg.validation_requests < 1:  # score() would fail after the meta-training
            raise ConfigError(f"{CANDIDATES}: candidate {spec or '(as is)'!r} has "
                              f"validation_requests={cfg.validation_requests}; every candidate "
                              "is scored on held-out simulated requests: set "
                              "config.meta_unlearn.validation_requests >= 1")
        out.append((spec, cfg))
    return out


def pretrain_dir(config) -> str:
    """The run directory of the pretrained model the selection starts from (the study's
    ``pretrain`` stage of ``config``)."""
    return checkpoints.run_dir(os.path.expanduser(config.checkpoint_dir),
                               context.dataset_folder(config), config.model.name, "pretrain",
                               config.num_identities, config.seed, context.split_seed(config))


def family(cfg) -> str:
    """``reference`` for the reference's algorithm (any lr / meta_lr), else ``variant``."""
    same = all(getattr(cfg, k) == v for k, v in REFERENCE_FAMILY.items())
    return "reference" if same else "variant"


def score(info: dict[str, Any]) -> dict[str, Any]:
    """The held-out numbers of one prepared candidate (``meta_unlearn.prepare``'s info)."""
    last = info["meta_history"][-1]
    if "outer_learned" not in last:
        raise ConfigError("selection needs held-out requests: config.meta_unlearn."
                          "validation_requests must be >= 1")
    searched = info.get("line_search")
    if searched:
        chosen = next(r for r in searched if r["scale"] == info["step_scale"])
        outer = chosen["outer_loss"]
    else:
        outer = last["outer_learned"]
    none = last["outer_none"]
    return {"outer": outer, "outer_none": none, "removed": 1.0 - outer / max(none, 1e-30),
            "step_scale": info["step_scale"], "relative_step": last["relative_step"],
            "dead_share": last["dead_share"], "reduction_ascent": last["reduction_ascent"]}


def _key(config, cfg, base_hash: str) -> str:
    """What a candidate's result depends on: data, split, seed, the model it starts from and
    every MetaUnlearn setting."""
    text = json.dumps([config.dataset, config.data.get("synthfaces_config"), config.seed,
                       config.num_identities, base_hash, api.config_record(cfg)], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def select(config, out: str) -> dict[str, Any]:
    """Runs the procedure of the module docstring; returns what ``selection.json`` holds. Each
    finished candidate is kept in ``out/candidates/`` and reused by a rerun (an interrupted
    selection resumes at the first unfinished candidate)."""
    # the candidates first: a selection with nothing to select is refused before any data is
    # read or any model trained (the task is the dataset's, from the catalog)
    candidates = candidate_configs(config, catalog.spec(config.dataset).task)
    ctx = context.prepare(config)
    sa_cfg = ctx.method_config("support_ascent")
    _, params = train_stage(ctx, "pretrain", context.initial_params(ctx))
    data = access.selection_data(ctx)
    rng = jax.random.key(config.seed)
    base_hash = checkpoints.params_hash(params)
    rows = []
    for i, (spec, cfg) in enumerate(candidates):
        interrupts.check()
        done = os.path.join(out, "candidates", _key(config, cfg, base_hash) + ".json")
        if os.path.exists(done):  # a finished candidate of an earlier, interrupted run
            with open(done, encoding="utf-8-sig") as f:
                rows.append(json.load(f))
            logging.info("select: candidate %d/%d: %s (reused %s)", i + 1, len(candidates),
                         spec or "(as is)", done)
            continue
        logging.info("select: candidate %d/%d: %s", i + 1, len(candidates), spec or "(as is)")
        start = time.perf_counter()
        _, info = meta_unlearn.prepare(ctx.model, params, data, cfg, rng)
        rows.append({"candidate": spec or "(config.meta_unlearn as is)", "family": family(cfg),
                     "settings": {k: getattr(cfg, k) for k in (
                         "lr", "meta_lr", "epochs", "step_control", "relative_step",
                         "task_ascent", "requests_per_update")},
                     **score(info), "seconds": time.perf_counter() - start,
                     "history": info["meta_history"], "line_search": info.get("line_search")})
        os.makedirs(os.path.dirname(done), exist_ok=True)
        with atomic_open(done) as f:
            f.write(json.dumps(to_json(rows[-1])))
        meta_unlearn.clear_compiled()  # see its docstring: dozens of executables crash LLVM
    start = time.perf_counter()
    _, sa_info = support_ascent.prepare(ctx.model, params, data, sa_cfg, rng)
    sa_info["seconds"] = time.perf_counter() - start
    best = min(rows, key=lambda r: r["outer"])
    reference = [r for r in rows if r["family"] == "reference"]
    best_ref = min(reference, key=lambda r: r["outer"]) if reference else None
    return {
        "dataset": config.dataset, "num_identities": config.num_identities,
        "seed": config.seed, "model": config.model.name,
        "identities": {"read": len(data.train_identities),
                       "request (never read)": len(ctx.splits.forget)},
        "validation": {"requests": config.meta_unlearn.validation_requests,
                       "identities_per_request": config.meta_unlearn.num_identities_simulation},
        "meta_unlearn": rows, "best": best["candidate"],
        "best_reference": best_ref["candidate"] if best_ref else None,
        "overrides": _flags(best), "overrides_reference": _flags(best_ref) if best_ref else None,
        "support_ascent": {"alpha": sa_info["alpha"], "selection": sa_info["selection"],
                           "requests": sa_info["selection_requests"],
                           "seconds": sa_info["seconds"]},
    }


def _flags(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    return " ".join(f"--config.meta_unlearn.{k}={v}" for k, v in row["settings"].items())


def markdown(result: dict[str, Any]) -> str:
    """The selection table, best first, then the winners."""
    head = (f"# MetaUnlearn selection: {result['dataset']} N={result['num_identities']} "
            f"seed {result['seed']} ({result['model']})\n\n"
            f"Held-out simulated requests of TRAIN identities outside the request "
            f"({result['identities']['read']} identities readable; the "
            f"{result['identities']['request (never read)']} of the request are not). Outer "
            "objective after the request-time step (lower is better); removed: its share of "
            "the objective with no step; factor: the line search's; request step: ||Δθ|| / "
            "||θ|| of the request-time step; at the meta-training step's length (factor 1), "
            "the share a gradient-ascent step removes and the portraits that give no step.\n\n"
            "| candidate | family | outer | no step | removed | factor | request step | "
            "ascent removes (factor 1) | no-step portraits | seconds |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in sorted(result["meta_unlearn"], key=lambda r: r["outer"]):
        lines.append(f"| {r['candidate']} | {r['family']} | {r['outer']:.5f} | "
                     f"{r['outer_none']:.5f} | {100 * r['removed']:+.1f}% | "
                     f"{r['step_scale']:g} | "
                     f"{r['relative_step'] * r['step_scale']:.2e} | "
                     f"{100 * r['reduction_ascent']:+.1f}% | {100 * r['dead_share']:.0f}% | "
                     f"{r['seconds']:.0f} |")
    sa = result["support_ascent"]
    tail = (f"\n\nbest: `{result['best']}`: `{result['overrides']}`\n\n"
            f"best of the reference's family: `{result['best_reference']}`: "
            f"`{result['overrides_reference']}`\n\n"
            f"support_ascent: α = {sa['alpha']:g} on {sa['requests']} simulated requests "
            f"(outer objective per α: " + ", ".join(
                f"{s['alpha']:g}: {s['outer_loss']:.5f}" for s in sa["selection"]) + ")\n")
    return head + "\n".join(lines) + tail


def write(result: dict[str, Any], out: str) -> dict[str, str]:
    """``selection.json`` and ``selection.md`` in ``out``, as one set (both or neither)."""
    paths = {name: os.path.join(out, name) for name in ("selection.json", "selection.md")}
    with atomic_set(out) as fileset:
        with fileset.open("selection.json") as f:
            f.write(json.dumps(to_json(result), indent=1))
        with fileset.open("selection.md") as f:
            f.write(markdown(result))
    return paths
