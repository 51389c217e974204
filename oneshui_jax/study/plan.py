"""What a study would do with each of its stages, decided without running any: the sweep's skip.

``launch/sweep.py`` runs a grid of studies (dataset x N x seed, each with the methods of the
paper's table) and skips a study whose work is all done. "Done" must mean what the study itself
would decide, not that some files exist: ``stage_plans(config)`` asks ``study.reuse`` about every
stage of ``config`` (pretrain, retrain, each method in ``config.stages`` and, with
``config.mia.rmia``, each method's RMIA reference model), with the fingerprint the stage would be
run with: the dataset's content, the model, the split, the seed, the stage's settings and the
hash of the parameters it starts from (``reuse.fingerprint``). Each stage gets the decision
``reuse.check`` gives (``reuse``, ``resume``, ``fresh``) or ``refused`` (a finished or unfinished
run made with other settings; the reason is ``reuse``'s list of differences).

``is_done(config)`` is True when every stage would be reused and the study's
``<workdir>/results.json`` was written with this very config (so the report, the attacks and
ToW were made from these stages). It checks the cheap things first, so a study that never ran
reads no data: ``results.json`` and every stage's ``metadata.json`` (status ``done``); only then
does it open the dataset and make the split (as the study does; a few seconds on CPU) and
compare fingerprints.

As a command line (``oneshui_jax/cli/plan.py``) it takes the arguments of ``python -m
oneshui_jax.main`` (``--config=FILE[:ARG]`` and ``--config.FIELD=VALUE`` overrides, parsed the same
way: ``cli.config_flags.load_config``) and prints one JSON line,
``{"done": bool, "reason": str, "stages": [{"stage", "run_dir", "decision", "reason",
"reference"}]}``; bad input is one ``error:`` line, exit status 2::

    python -m oneshui_jax.cli.plan --config=configs/synthfaces.py --config.seed=1

The sweep runs it in a process of its own, on the platform the study would use, because the
initial parameters' hash (the parent of pretrain and retrain) is computed on it.

The fingerprint inputs mirror ``study.stages`` (``train_stage``: ``config.train`` and the
initial parameters; ``method_stage``: the method's validated ``Config`` and the pretrained
parameters' hash from the pretrain run's metadata; ``study.attack_models``: the reference context
and the retrained parameters' hash). ``tests/test_sweep.py`` checks them against the fingerprints
real runs stored, so a change there that is not made here fails a test. A reused stage's
parameters are not read (the study verifies them against their hash when it loads them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from oneshui_jax import checkpoints, files
from oneshui_jax.errors import CheckpointError
from oneshui_jax.study import privacy, reuse
from oneshui_jax.study.context import Context
from oneshui_jax.study.validate import SECOND_ORACLE, TRAINING_STAGES

REFUSED = "refused"  # a run with other settings is in the way; the study would stop
RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage's fate: ``decision`` is ``reuse``, ``resume``, ``fresh`` or ``refused``."""

    stage: str
    run_dir: str
    decision: str
    reason: str = ""
    reference: bool = False  # an RMIA reference model (study/privacy.py)


def _bare_context(config) -> Context:
    """A Context that only knows the config: enough for ``run_dir`` (which reads nothing else)."""
    return Context(config, None, None, None, None)  # type: ignore[arg-type]


def run_dirs(config) -> list[tuple[str, str, bool]]:
    """``(stage, run_dir, is_reference)`` of every stage the study of ``config`` runs, in order:
    its ``config.stages`` (methods after pretrain, which they start from) and, with
    ``config.mia.rmia``, each non-training stage's reference model."""
    ctx = _bare_context(config)
    stages = list(config.stages)
    if any(s not in TRAINING_STAGES for s in stages) and "pretrain" not in stages:
        stages.insert(0, "pretrain")  # study.run trains it for the methods
    ref = privacy.reference_context(ctx)
    out = [(s, ref.run_dir("retrain") if s == SECOND_ORACLE else ctx.run_dir(s), False)
           for s in stages]
    if privacy.wants_rmia(config):
        if privacy.wants_held_out(config):
            out.append((privacy.CALIBRATION, ctx.run_dir(privacy.CALIBRATION), True))
        out += [(s, ref.run_dir(s), True) for s in stages if s not in TRAINING_STAGES]
    return out


def results_problem(config) -> str | None:
    """Why ``<workdir>/results.json`` is not the report of this config's study, or None."""
    path = os.path.join(os.path.expanduser(config.workdir), RESULTS_FILE)
    try:
        with open(path, encoding="utf-8-sig") as f:
            stored = json.load(f).get("config")
    except FileNotFoundError:
        return f"{path} does not exist"
    except (OSError, ValueError, AttributeError) as e:
        return f"{path} is not a study's results.json ({e})"
    wanted = json.loads(json.dumps(files.to_json(config.to_dict())))
    if stored != wanted:
        changed = sorted(k for k in set(stored or {}) | set(wanted)
                         if (stored or {}).get(k) != wanted.get(k))
        return f"{path} was written with another config (differs in {', '.join(changed)})"
    return None


def unfinished_stages(config) -> list[StagePlan]:
    """The stages whose run directory holds no finished run (from metadata alone)."""
    return [StagePlan(stage, rdir, reuse.FRESH, "no finished run", ref)
            for stage, rdir, ref in run_dirs(config) if not checkpoints.is_finished(rdir)]


def _decide(ctx, stage: str, rdir: str, settings_name: str, settings: dict[str, Any],
            parent_hash: str | None, augmented: bool, ref: bool) -> StagePlan:
    fp = reuse.fingerprint(ctx, stage, settings_name, settings, parent_hash, augmented)
    try:
        decision, _ = reuse.check(ctx, rdir, fp, settings_name, augmented)
    except CheckpointError as e:
        return StagePlan(stage, rdir, REFUSED, str(e), ref)
    return StagePlan(stage, rdir, decision, "", ref)


def stage_plans(config) -> list[StagePlan]:
    """Every stage's decision (module docstring). Opens the dataset and makes the split;
    ConfigError / DataError as the study would raise them. A method whose parent run (pretrain,
    or retrain for a reference model) is not finished is ``fresh``: it would start from
    parameters that do not exist yet."""
    from oneshui_jax.study import context
    from oneshui_jax.unlearn import api, registry

    ctx = context.prepare(config)
    ref_ctx = privacy.reference_context(ctx)
    init_hashes: dict[str, str] = {}
    plans = []
    for stage, rdir, ref in run_dirs(config):
        if stage == privacy.CALIBRATION:
            if "own" not in init_hashes:
                init_hashes["own"] = checkpoints.params_hash(context.initial_params(ctx))
            plans.append(_decide(ctx, stage, rdir, "train", privacy.calibration_settings(ctx),
                                 init_hashes["own"], True, ref))
            continue
        if stage in TRAINING_STAGES:
            # retrain_2 is the reference context's retrain (stages.train_stage)
            stage_ctx, name = (ref_ctx, "retrain") if stage == SECOND_ORACLE else (ctx, stage)
            key = "ref" if stage == SECOND_ORACLE else "own"
            if key not in init_hashes:
                init_hashes[key] = checkpoints.params_hash(context.initial_params(stage_ctx))
            plan = _decide(stage_ctx, name, rdir, "train", config.train.to_dict(),
                           init_hashes[key], True, ref)
            plans.append(dataclasses.replace(plan, stage=stage))
            continue
        parent_dir = ctx.run_dir("retrain" if ref else "pretrain")
        if not checkpoints.is_finished(parent_dir):
            plans.append(StagePlan(stage, rdir, reuse.FRESH, f"{parent_dir} is not finished",
                                   ref))
            continue
        parent_hash = checkpoints.read_metadata(parent_dir).get("params_hash")
        _, module = registry.resolve(config, stage)
        settings = api.config_record(ctx.method_config(stage))
        augmented = module.ACCESS in (api.STATS, api.FULL)
        plans.append(_decide(ref_ctx if ref else ctx, stage, rdir, stage, settings,
                             parent_hash, augmented, ref))
    return plans


def check(config) -> tuple[bool, str, list[StagePlan]]:
    """``(done, why not, the stages' plans)`` of the study of ``config`` (module docstring):
    ``done`` when every stage would be reused and ``results.json`` is this config's; ``why
    not`` is the first reason found. The plans list is empty when a cheap check already
    failed (no data was read)."""
    problem = results_problem(config)
    if problem:
        return False, problem, []
    unfinished = unfinished_stages(config)
    if unfinished:
        return (False, f"stage {unfinished[0].stage}: {unfinished[0].run_dir} is not finished",
                unfinished)
    plans = stage_plans(config)
    for plan in plans:
        if plan.decision != reuse.REUSE:
            what = f"stage {plan.stage}" + (" (RMIA reference model)" if plan.reference else "")
            return False, f"{what} would be {plan.decision}: {plan.reason or plan.run_dir}", plans
    return True, "", plans


def is_done(config) -> tuple[bool, str]:
    """``check(config)`` without the plans: ``(True, "")`` or ``(False, why)``."""
    done, reason, _ = check(config)
    return done, reason


if __name__ == "__main__":  # python -m oneshui_jax.study.plan: an alias of the command line
    import runpy  # run, not imported: this library module stays below the command lines

    runpy.run_module("oneshui_jax.cli.plan", run_name="__main__")
