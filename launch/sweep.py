r"""The 1-SHUI grid: every study of the paper's comparison tables, run, skipped or submitted.

The paper compares the unlearning methods on CelebA (N = 5, 10 forget identities), CelebA-HQ
(N = 20, 50) and MUFAC (N = 5, 10) (SPEC.md 6.6, "the experiment grid"), every row of its table
(pretrain, retrain = the oracle, MetaUnlearn, support_ascent, SSD, Lipschitz, PGU, SCRUB, Bad
Teacher) over seeds (each seed is another identity split; 0, 1, 2 here, as the repository's own
multi-seed studies). This script expands dataset x N x seed into study commands and runs them
one after another, or writes a SLURM job array, then collects every study's ``results.json``
into one comparison table (``oneshui_jax.report``: mean ± std [95% interval] over seeds, and
each method paired with the pretrained model of its own split)::

    python launch/sweep.py --dry_run                       # the paper's grid: print the commands
    python launch/sweep.py --config.data.data_dir=/data    # run it here, one study at a time
    python launch/sweep.py --datasets=synthfaces --num_identities=5 --seeds=0,1 \
        --methods=lipschitz --config_arg=synthfaces:size=small --config.train.epochs=1
    python launch/sweep.py --mode=slurm --config.data.data_dir=/data   # writes the job array
    python launch/sweep.py --collect_only                  # the table of what has finished

**One command per (dataset, N, seed).** A study runs pretrain and retrain once and then each
method on the same pretrained model, so the methods of a grid point are the stages of one
command, not commands of their own::

    python -m oneshui_jax.main --config=configs/<dataset>.py:method=all,N=<N> \
        --config.seed=<seed> --config.stages='("pretrain", "retrain", <methods>...)' \
        --config.workdir=<root>/<dataset>_N<N>_seed<seed> [overrides...]

(``configs/synthfaces.py`` takes ``N=<N>`` alone). Every command writes its
``results.{json,md,csv}`` and plots into its own workdir under the sweep root (``--root``,
default ``workdir/sweep``); the stages' checkpoints go where ``config.checkpoint_dir`` says
(default ``checkpoints/``, shared by the studies as the run folders are named by stage, N and
seed). Every command runs in the repository root, as ``launch/study.sh`` does: relative paths
in overrides are relative to it.

**Options.** ``--datasets`` (default celeba, celebahq, mufac; also synthfaces, the embedded CPU
data), ``--num_identities`` (default: the paper's N of each dataset; given, the same N for every
dataset), ``--methods`` (names of the method registry, ``meta_unlearn_reference``, or the
groups ``all`` (the default: the paper's rows), ``one_shot``, ``none`` (pretrain and retrain
only)), ``--seeds`` (default 0,1,2), ``--config_arg=DATASET:KEY=VALUE[,...]`` (added to that
dataset's config argument, e.g. ``mufac:profile=cpu``, ``synthfaces:size=small``), and config
overrides for every command, given as they are (``--config.train.epochs=1``) or in one string
(``--config_args='--config.train.epochs=1 --config.data.data_dir=/data'``).
``--config.workdir=DIR`` names the sweep root (as ``--root``); ``--config.seed``,
``--config.stages`` and ``--config.num_identities`` are the grid's and are refused.
Every command's config is loaded and validated (``study.validate``, no data read) before
anything runs: a typo stops the sweep with one ``error:`` line, exit status 2.

**Skipping finished studies.** Before a command runs, ``python -m oneshui_jax.cli.plan`` (in a
process of its own, on the platform the study would use) asks the study's own reuse logic
(``study.reuse``: fingerprint of data, model, split, seed, settings and parent parameters) about
every stage of the command, the RMIA reference models included: when every stage would be
reused and the workdir's ``results.json`` was written with this very config, the command is
skipped. The cheap checks come first (``results.json``, every stage's ``metadata.json``), so a
study that never ran costs nothing to check. Stages that would be resumed, or refused because
a run with other settings is in the way, make the command run (and the study resume, or stop
with its one-line error, which stops the sweep). On a login node without GPUs the initial
parameters' hash is computed on CPU; should it differ from the GPU's in the last bits, the
command runs again and reuses every stage.

**Modes.** ``--mode=local`` (default) runs the commands one after another in this terminal
(their output as they print it); a failing command stops the sweep with one line naming it and
its exit status (exit status 1; 130 after Ctrl-C). ``--mode=slurm`` writes
``<root>/commands.txt`` (one study's arguments per line, shell-quoted, only the studies that are
not finished) and ``<root>/submit.sh`` (the ``sbatch --array=0-<K-1> launch/slurm.sh
--commands=<root>/commands.txt`` call, every command listed in its comments) and prints how to
submit; ``--submit`` also submits it (``sbatch`` must be on PATH; nothing else needs SLURM).
Array task i runs line i through ``launch/slurm.sh`` on ``--nodes`` nodes x
``--gpus_per_node`` GPUs. When the array has finished, ``--collect_only`` with the same flags
writes the table. ``--dry_run`` prints the commands (and, with ``--mode=slurm``, the ``sbatch``
call) and writes nothing.

**The table.** After the runs (local) or with ``--collect_only``, every ``results.json`` of the
grid is read (``report.load_records``) and ``<root>/sweep_results.md`` (per dataset,
``report.markdown_report``: mean ± std [95% t-interval] over seeds per (method, N), the paired
differences with pretrain on the same split, every run) and ``<root>/sweep_results.json``
(records, ``report.aggregate`` and ``report.paired`` per dataset, the commands, the studies
still missing) are written atomically and the markdown is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # python launch/sweep.py from anywhere: the package of this checkout
    sys.path.insert(0, REPO)

PAPER_DATASETS = ("celeba", "celebahq", "mufac")
DATASETS = PAPER_DATASETS + ("synthfaces",)
# The paper's N per dataset (SPEC.md 6.6: CelebA {5, 10}, CelebA-HQ {20, 50}, MUFAC {5, 10});
# SynthFaces: its config's default.
PAPER_N = {"celeba": (5, 10), "celebahq": (20, 50), "mufac": (5, 10), "synthfaces": (10,)}
PAPER_SEEDS = (0, 1, 2)
TRAINING = ("pretrain", "retrain", "retrain_2")  # config_lib.TRAINING (test_sweep checks)
VARIANTS = ("meta_unlearn_reference",)  # the variant block every config defines
GRID_FIELDS = ("seed", "stages", "num_identities")  # set by the grid, never by an override
DEFAULT_ROOT = "workdir/sweep"
COMMANDS_FILE, SUBMIT_FILE = "commands.txt", "submit.sh"
RESULTS_MD, RESULTS_JSON = "sweep_results.md", "sweep_results.json"


class SweepError(Exception):
    """Bad input to the sweep: one line, exit status 2."""


class CommandFailed(Exception):
    """A study of the sweep failed: one line naming it and its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def method_groups() -> dict[str, tuple[str, ...]]:
    """``--methods`` groups: ``all`` (the paper's rows), ``one_shot`` (the servable methods),
    ``none`` (pretrain and retrain only)."""
    from oneshui_jax import config_lib

    return {"all": config_lib.ALL, "one_shot": config_lib.ONE_SHOT, "none": ()}


def method_names() -> tuple[str, ...]:
    """The methods ``--methods`` may name: the registry's, then the variants."""
    from oneshui_jax.unlearn import registry

    return tuple(registry.METHODS) + VARIANTS


@dataclasses.dataclass(frozen=True)
class Command:
    """One study of the grid: ``python -m oneshui_jax.main <args>``, run in the repository
    root, writing its report into ``workdir``."""

    dataset: str
    num_identities: int
    seed: int
    methods: tuple[str, ...]
    args: tuple[str, ...]
    workdir: str

    @property
    def label(self) -> str:
        return f"{self.dataset}_N{self.num_identities}_seed{self.seed}"

    @property
    def config_args(self) -> list[str]:
        """The ``--config*`` arguments (what the study's config is made of)."""
        return [a for a in self.args if re.match(r"^--config([.=]|$)", a)]

    def shell(self) -> str:
        """The command as a shell line."""
        return shlex.join(["python", "-m", "oneshui_jax.main", *self.args])


# ---------------------------------------------------------------------------------------------
# The grid


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(flag: str, text: str, minimum: int) -> tuple[int, ...]:
    values = []
    for item in _csv(text):
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise SweepError(f"--{flag}: {item!r} is not an integer >= {minimum}; expected a "
                             f"comma-separated list such as {'0,1,2' if minimum == 0 else '5,10'}")
        values.append(value)
    if not values:
        raise SweepError(f"--{flag} is empty; expected a comma-separated list of integers")
    return tuple(dict.fromkeys(values))


def parse_datasets(text: str | None) -> tuple[str, ...]:
    if text is None:
        return PAPER_DATASETS
    names = _csv(text)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        what = f"unknown dataset {unknown[0]!r}" if unknown else "empty"
        raise SweepError(f"--datasets: {what}; expected some of {', '.join(DATASETS)}")
    return tuple(dict.fromkeys(names))


def parse_methods(text: str | None) -> tuple[str, ...]:
    groups = method_groups()
    if text is None:
        return groups["all"]
    names, methods = _csv(text), []
    for name in names:
        if name in groups:
            methods += groups[name]
        elif name in method_names():
            methods.append(name)
        else:
            raise SweepError(f"--methods: unknown method {name!r}; expected some of "
                             f"{', '.join(method_names())} or a group ({', '.join(groups)})")
    if not names:
        raise SweepError("--methods is empty; expected method names or a group "
                         f"({', '.join(groups)})")
    return tuple(dict.fromkeys(m for m in methods if m not in TRAINING))


def parse_config_arg(items: Sequence[str], datasets: Sequence[str]) -> dict[str, list[str]]:
    """``--config_arg DATASET:KEY=VALUE[,KEY=VALUE]`` -> {dataset: ["KEY=VALUE", ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        dataset, sep, pairs = item.partition(":")
        if not sep or dataset not in DATASETS or not all("=" in p for p in _csv(pairs)):
            raise SweepError(f"--config_arg {item!r}: expected DATASET:KEY=VALUE[,KEY=VALUE] "
                             f"with DATASET one of {', '.join(DATASETS)}")
        if dataset not in datasets:
            raise SweepError(f"--config_arg {item!r}: {dataset} is not in --datasets "
                             f"({', '.join(datasets)})")
        out.setdefault(dataset, []).extend(_csv(pairs))
    return out


def parse_overrides(passed: Sequence[str], joined: Sequence[str]) -> tuple[list[str], str | None]:
    """Config overrides for every command (``passed`` as given, ``joined`` shell strings of
    ``--config_args``) -> (overrides, the sweep root when ``--config.workdir`` was given)."""
    items = list(passed)
    for text in joined:
        items += shlex.split(text)
    overrides, root = [], None
    for item in items:
        match = re.match(r"^--config\.([\w.]+)=(.*)$", item, re.S)
        if not match:
            raise SweepError(f"unexpected argument {item!r}; expected the sweep's flags (see "
                             "--help) and config overrides --config.FIELD=VALUE")
        field = match[1]
        if field in GRID_FIELDS:
            flag = {"seed": "--seeds", "stages": "--methods",
                    "num_identities": "--num_identities"}[field]
            raise SweepError(f"--config.{field} is set by the grid; expected {flag} instead")
        if field == "workdir":
            root = match[2]
        else:
            overrides.append(item)
    return overrides, root


def config_argument(dataset: str, n: int, extra: Sequence[str]) -> str:
    """The argument after ``configs/<dataset>.py:``: N (and ``method=all`` for the real
    datasets, so ``config.hparams_note`` covers every method of the table), then ``extra``."""
    items = ([f"N={n}"] if dataset == "synthfaces" else ["method=all", f"N={n}"]) + list(extra)
    return ",".join(items)


def stages_value(methods: Sequence[str]) -> str:
    """``config.stages`` as ``--config.stages=`` takes it: a Python tuple of strings."""
    return "(" + ", ".join(f'"{s}"' for s in (*TRAINING, *methods)) + ")"


def expand(datasets: Sequence[str], num_identities: Sequence[int] | None,
           methods: Sequence[str], seeds: Sequence[int], root: str,
           overrides: Sequence[str] = (), config_args: dict[str, list[str]] | None = None
           ) -> list[Command]:
    """The grid's commands, dataset by dataset, then N, then seed (module docstring).
    ``num_identities`` None: the paper's N of each dataset."""
    commands = []
    for dataset in datasets:
        for n in (num_identities or PAPER_N[dataset]):
            arg = config_argument(dataset, n, (config_args or {}).get(dataset, ()))
            for seed in seeds:
                workdir = os.path.join(root, f"{dataset}_N{n}_seed{seed}")
                args = (f"--config=configs/{dataset}.py:{arg}", f"--config.seed={seed}",
                        f"--config.stages={stages_value(methods)}",
                        f"--config.workdir={workdir}", *overrides)
                commands.append(Command(dataset, n, seed, tuple(methods), args, workdir))
    return commands


@contextlib.contextmanager
def _in_repo():
    """Paths as the commands see them: relative to the repository root."""
    with contextlib.chdir(REPO):
        yield


@contextlib.contextmanager
def _quiet_logs():
    """No INFO / WARNING lines while configs are loaded (e.g. the reference's fallback warning
    for an untuned (dataset, N), repeated per command; the study logs it when it runs)."""
    from absl import logging

    before = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(before)


def check_configs(commands: Sequence[Command]) -> None:
    """Loads and validates every command's config (nothing is read or written); SweepError
    naming the first command at fault."""
    from oneshui_jax.cli import config_flags
    from oneshui_jax.errors import ConfigError
    from oneshui_jax.study import validate

    with _in_repo(), _quiet_logs():
        for command in commands:
            try:
                validate.validate_config(config_flags.load_config(command.config_args))
            except (ValueError, ConfigError) as e:
                raise SweepError(f"{command.label}: {e} (command: {command.shell()})") from None


# ---------------------------------------------------------------------------------------------
# Skipping, running, submitting


def finished(command: Command) -> tuple[bool, str]:
    """``(True, "")`` when every stage of ``command`` would be reused and its results.json is
    current (``oneshui_jax.study.plan``), else ``(False, why)``. The cheap checks run here; the
    fingerprints in a process of its own."""
    from oneshui_jax.cli import config_flags
    from oneshui_jax.study import plan

    with _in_repo(), _quiet_logs():
        config = config_flags.load_config(command.config_args)
        problem = plan.results_problem(config)
        if problem:
            return False, problem
        unfinished = plan.unfinished_stages(config)
        if unfinished:
            return False, f"stage {unfinished[0].stage} has no finished run"
    result = subprocess.run([sys.executable, "-m", "oneshui_jax.cli.plan",
                             *command.config_args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return False, f"the plan failed: {lines[-1] if lines else result.returncode}"
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return bool(answer["done"]), answer["reason"]


def say(message: str) -> None:
    print(f"sweep: {message}", flush=True)


def run_local(commands: Sequence[Command], skip: bool = True) -> dict[str, list[str]]:
    """Runs the commands one after another (output inherited), skipping finished ones;
    ``{"ran": [labels], "skipped": [labels]}``. CommandFailed at the first failure."""
    done: dict[str, list[str]] = {"ran": [], "skipped": []}
    total = len(commands)
    for i, command in enumerate(commands, 1):
        if skip:
            is_done, why = finished(command)
            if is_done:
                say(f"[{i}/{total}] skip {command.label}: every stage finished with an equal "
                    "fingerprint and results.json is current")
                done["skipped"].append(command.label)
                continue
            say(f"[{i}/{total}] run {command.label} ({why}): {command.shell()}")
        else:
            say(f"[{i}/{total}] run {command.label}: {command.shell()}")
        try:
            status = subprocess.run([sys.executable, "-m", "oneshui_jax.main", *command.args],
                                    cwd=REPO).returncode
        except KeyboardInterrupt:
            status = 130
        if status != 0:
            raise CommandFailed(f"command {i}/{total} ({command.label}) failed with exit status "
                                f"{status}: {command.shell()}", status)
        done["ran"].append(command.label)
    return done


def sbatch_call(root: str, count: int, nodes: int, gpus_per_node: int | None,
                sbatch_args: Sequence[str]) -> list[str]:
    """The ``sbatch`` invocation of the job array: one task per line of commands.txt."""
    call = ["sbatch", f"--array=0-{count - 1}", f"--nodes={nodes}", "--job-name=oneshui_sweep",
            "--output=" + os.path.join(root, "slurm-%A_%a.out")]
    if gpus_per_node is not None:
        call.append(f"--gpus-per-node={gpus_per_node}")
    return [*call, *sbatch_args, "launch/slurm.sh",
            "--commands=" + os.path.join(root, COMMANDS_FILE)]


def submit_script(commands: Sequence[Command], call: Sequence[str], root: str) -> str:
    """``submit.sh``: goes to the repository root and submits the array; lists every command."""
    lines = ["#!/usr/bin/env bash",
             f"# Generated by launch/sweep.py: {len(commands)} studies of a 1-SHUI sweep, one "
             "SLURM array task each.",
             f"# Task i runs line i of {os.path.join(root, COMMANDS_FILE)} through "
             "launch/slurm.sh:",
             "#   srun python -m oneshui_jax.main --distributed <line i> (one process per node).",
             f"# Submit: bash {os.path.join(root, SUBMIT_FILE)} [more sbatch-free study "
             "overrides]",
             "# When the array has finished, the table: python launch/sweep.py <the same flags> "
             "--collect_only",
             "#"]
    lines += [f"# task {i} ({c.label}): {c.shell()}" for i, c in enumerate(commands)]
    lines += ["set -euo pipefail", f"cd {shlex.quote(REPO)}", shlex.join(call) + ' "$@"', ""]
    return "\n".join(lines)


def write_slurm(commands: Sequence[Command], root: str, call: Sequence[str]) -> dict[str, str]:
    """Writes commands.txt and submit.sh into ``root`` (atomically); their paths."""
    from oneshui_jax.files import atomic_open

    paths = {COMMANDS_FILE: os.path.join(root, COMMANDS_FILE),
             SUBMIT_FILE: os.path.join(root, SUBMIT_FILE)}
    with atomic_open(paths[COMMANDS_FILE]) as f:
        f.write("".join(shlex.join(c.args) + "\n" for c in commands))
    with atomic_open(paths[SUBMIT_FILE]) as f:
        f.write(submit_script(commands, call, root))
    os.chmod(paths[SUBMIT_FILE], 0o755)
    return paths


# ---------------------------------------------------------------------------------------------
# The table


def collect(commands: Sequence[Command], root: str) -> dict[str, Any] | None:
    """Reads every results.json of the grid and writes sweep_results.{md,json} into ``root``
    (atomically); None when no study has finished. ValueError naming a bad results.json."""
    from oneshui_jax import report
    from oneshui_jax.files import atomic_set, to_json

    found = [(c, os.path.join(c.workdir, "results.json")) for c in commands]
    missing = [c.label for c, path in found if not os.path.isfile(path)]
    found = [(c, path) for c, path in found if os.path.isfile(path)]
    if not found:
        return None
    paths_of: dict[str, list[str]] = {}
    for command, path in found:
        paths_of.setdefault(command.dataset, []).append(path)
    # one load per dataset: its studies' configs are compared (seeds and N may differ, nothing
    # else), so a stray study of other settings is refused, not averaged in
    by_dataset = {dataset: report.load_records(paths) for dataset, paths in paths_of.items()}
    parts = [f"# Sweep: {root}", "",
             f"{len(found)} of {len(commands)} studies of the grid "
             f"({', '.join(c.label for c, _ in found)}).", ""]
    if missing:
        parts += [f"Not finished yet: {', '.join(missing)}.", ""]
    datasets: dict[str, Any] = {}
    for dataset, records in by_dataset.items():
        text = report.markdown_report(records)
        parts += [re.sub(r"^# ", "## ", text, count=1), ""]
        datasets[dataset] = {"metric": report.metric_name(dataset), "results": records,
                             "aggregate": report.aggregate(records),
                             "paired": report.paired(records)}
    markdown = "\n".join(parts)
    payload = {"root": root, "missing": missing,
               "commands": [{"label": c.label, "command": c.shell(),
                             "results": path} for c, path in found],
               "datasets": datasets}
    with atomic_set(root) as fileset:  # both or neither
        with fileset.open(RESULTS_MD) as f:
            f.write(markdown)
        with fileset.open(RESULTS_JSON) as f:
            json.dump(to_json(payload), f, indent=1)
    return {"markdown": markdown, "missing": missing, "found": [c.label for c, _ in found]}


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python launch/sweep.py",
        description="Run (or submit) the 1-SHUI grid dataset x N x method x seed and collect "
                    "one comparison table. Config overrides (--config.FIELD=VALUE) go to every "
                    "study.",
        epilog="Examples: python launch/sweep.py --dry_run | python launch/sweep.py "
               "--datasets=synthfaces --num_identities=5 --seeds=0,1 --methods=lipschitz "
               "--config_arg=synthfaces:size=small --config.train.epochs=1")
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(DATASETS)} "
                        f"(default: {','.join(PAPER_DATASETS)})")
    parser.add_argument("--num_identities", help="comma-separated N for every dataset "
                        "(default: the paper's N of each: celeba 5,10; celebahq 20,50; "
                        "mufac 5,10; synthfaces 10)")
    parser.add_argument("--methods", help="comma-separated methods or groups all, one_shot, "
                        "none (default: all, the paper's rows; pretrain and retrain always run)")
    parser.add_argument("--seeds", default=",".join(map(str, PAPER_SEEDS)),
                        help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--config_arg", action="append", default=[],
                        metavar="DATASET:KEY=VALUE[,KEY=VALUE]",
                        help="added to the config argument of DATASET, e.g. mufac:profile=cpu "
                             "(repeatable)")
    parser.add_argument("--config_args", action="append", default=[], metavar="'OVERRIDES'",
                        help="config overrides for every study in one shell string "
                             "(repeatable); --config.FIELD=VALUE may also be given directly")
    parser.add_argument("--root", help=f"the sweep's folder (default: {DEFAULT_ROOT}, or "
                        "--config.workdir); each study writes into <root>/<dataset>_N<N>_seed<S>")
    parser.add_argument("--mode", choices=("local", "slurm"), default="local",
                        help="local: run here, one study after another; slurm: write a job "
                             "array (default: %(default)s)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands and write nothing")
    parser.add_argument("--no_skip", action="store_true",
                        help="run every command, finished or not (each study still reuses its "
                             "finished stages)")
    parser.add_argument("--collect_only", action="store_true",
                        help="run nothing; write the table of the studies that have finished")
    parser.add_argument("--submit", action="store_true",
                        help="--mode=slurm: also submit the array with sbatch")
    parser.add_argument("--nodes", type=int, default=1,
                        help="--mode=slurm: nodes per study (default: %(default)s)")
    parser.add_argument("--gpus_per_node", type=int,
                        help="--mode=slurm: GPUs per node (default: launch/slurm.sh's)")
    parser.add_argument("--sbatch_args", default="",
                        help="--mode=slurm: more sbatch options, one shell string")
    return parser


def _fail(message: str, status: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        datasets = parse_datasets(args.datasets)
        methods = parse_methods(args.methods)
        seeds = _ints("seeds", args.seeds, 0)
        num_identities = (None if args.num_identities is None
                          else _ints("num_identities", args.num_identities, 1))
        config_args = parse_config_arg(args.config_arg, datasets)
        overrides, workdir = parse_overrides(rest, args.config_args)
        if args.root and workdir and os.path.abspath(args.root) != os.path.abspath(workdir):
            raise SweepError(f"--root {args.root} and --config.workdir={workdir} disagree; "
                             "expected one sweep root")
        if args.nodes < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
            raise SweepError("--nodes and --gpus_per_node must be >= 1")
        if args.submit and args.mode != "slurm":
            raise SweepError("--submit submits a job array; expected --mode=slurm with it")
        root = os.path.abspath(os.path.expanduser(args.root or workdir or DEFAULT_ROOT))
        commands = expand(datasets, num_identities, methods, seeds, root, overrides,
                          config_args)
        check_configs(commands)
        sbatch_extra = shlex.split(args.sbatch_args)
    except SweepError as e:
        return _fail(str(e))

    if args.dry_run:
        for command in commands:
            print(command.shell())
        if args.mode == "slurm":
            call = sbatch_call(root, len(commands), args.nodes, args.gpus_per_node, sbatch_extra)
            print(f"# then, from {REPO}: {shlex.join(call)}")
        return 0

    from oneshui_jax import files

    problem = files.cannot_write_in(root)
    if problem:
        return _fail(f"--root {root} cannot be written: {problem}; expected a writable folder")
    say(f"{len(commands)} studies ({', '.join(datasets)}; seeds "
        f"{', '.join(map(str, seeds))}; stages {', '.join((*TRAINING, *methods))}) -> {root}")
    if args.mode == "local" and not args.collect_only:
        try:
            outcome = run_local(commands, skip=not args.no_skip)
        except CommandFailed as e:
            return _fail(str(e), 130 if e.status in (130, -2) else 1)
        say(f"ran {len(outcome['ran'])}, skipped {len(outcome['skipped'])} finished")
    elif args.mode == "slurm" and not args.collect_only:
        todo = []
        for command in commands:
            is_done, why = (False, "") if args.no_skip else finished(command)
            if is_done:
                say(f"skip {command.label}: finished")
            else:
                todo.append(command)
        if todo:
            call = sbatch_call(root, len(todo), args.nodes, args.gpus_per_node, sbatch_extra)
            paths = write_slurm(todo, root, call)
            say(f"{len(todo)} array tasks written: {paths[COMMANDS_FILE]}")
            say(f"submit from any folder: bash {paths[SUBMIT_FILE]}  (runs: {shlex.join(call)})")
            if args.submit:
                if shutil.which("sbatch") is None:
                    return _fail(f"--submit: sbatch is not on PATH; expected a SLURM login "
                                 f"node (or run bash {paths[SUBMIT_FILE]} on one)")
                status = subprocess.run(["bash", paths[SUBMIT_FILE]]).returncode
                if status != 0:
                    return _fail(f"sbatch failed with exit status {status}", 1)
            say("when the array has finished: python launch/sweep.py <the same flags> "
                "--collect_only")
            return 0
        say("every study is finished; nothing to submit")
    try:
        table = collect(commands, root)
    except ValueError as e:
        return _fail(str(e))
    if table is None:
        say("no study of the grid has finished yet: no table")
        return 0
    print(table["markdown"])
    say(f"table: {os.path.join(root, RESULTS_MD)} and {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
