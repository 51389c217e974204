"""The sweep launcher (``launch/sweep.py``), its skip logic (``oneshui_jax.study.plan``) and the
SLURM script (``launch/slurm.sh``): the grid of the paper's comparison tables, expanded, run,
skipped when finished, submitted as a job array, collected into one table.

Grid, dry run, SLURM files and errors are checked in process (no study runs); the SLURM script
runs with stand-ins for ``srun``, ``scontrol`` and python on PATH (no SLURM needed). The skip
logic is checked against the fingerprints real runs stored (the shared small study), and end to
end on a two-seed SynthFaces sweep (``slow``).
"""

import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from oneshui_jax import checkpoints, config_lib
from oneshui_jax.cli import config_flags
from oneshui_jax.study import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_SH = os.path.join(REPO, "launch", "slurm.sh")
_spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "launch", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep"] = sweep  # dataclasses look their module up
_spec.loader.exec_module(sweep)

PAPER_GRID = {("celeba", 5), ("celeba", 10), ("celebahq", 20), ("celebahq", 50), ("mufac", 5),
              ("mufac", 10)}


def dry_run(capsys, *argv):
    """The commands ``--dry_run`` prints, each as its argument list after ``-m
    oneshui_jax.main``."""
    assert sweep.main(["--dry_run", *argv]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line and not line.startswith("#")]
    commands = [shlex.split(line) for line in lines]
    assert all(c[:3] == ["python", "-m", "oneshui_jax.main"] for c in commands)
    return [c[3:] for c in commands]


def config_of(args):
    """The config ``python -m oneshui_jax.main ARGS`` runs."""
    with sweep._in_repo():
        return config_flags.load_config([a for a in args if a.startswith("--config")])


def test_default_grid_is_the_papers(capsys, tmp_path):
    commands = dry_run(capsys, f"--root={tmp_path / 'sweep'}")
    configs = [config_of(c) for c in commands]
    assert len(configs) == len(PAPER_GRID) * 3
    points = {(c.dataset, c.num_identities) for c in configs}
    assert points == PAPER_GRID
    for dataset, n in PAPER_GRID:
        seeds = sorted(c.seed for c in configs if (c.dataset, c.num_identities) == (dataset, n))
        assert seeds == [0, 1, 2]
    assert sweep.TRAINING == config_lib.TRAINING == ("pretrain", "retrain", "retrain_2")
    for c in configs:  # every row of the paper's table, after pretrain and the two oracles
        assert c.stages == (*config_lib.TRAINING, *config_lib.ALL)
        assert c.workdir == str(tmp_path / "sweep" / f"{c.dataset}_N{c.num_identities}_seed"
                                                     f"{c.seed}")
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing


def test_filters_and_overrides_reach_every_command(capsys, tmp_path):
    commands = dry_run(capsys, "--datasets=mufac,synthfaces", "--num_identities=5",
                       "--seeds=1,3", "--methods=ssd,lipschitz,one_shot",
                       "--config_arg=mufac:profile=cpu", "--config.train.epochs=2",
                       "--config_args=--config.data.num_threads=1 --config.train.lr=0.5",
                       f"--config.workdir={tmp_path}/root")
    configs = [config_of(c) for c in commands]
    assert [(c.dataset, c.num_identities, c.seed) for c in configs] == [
        ("mufac", 5, 1), ("mufac", 5, 3), ("synthfaces", 5, 1), ("synthfaces", 5, 3)]
    for c in configs:
        # the named methods first, then the group's others, each once
        assert c.stages == (*config_lib.TRAINING, "ssd", "lipschitz", "meta_unlearn",
                            "support_ascent", "pgu")
        assert (c.train.epochs, c.data.num_threads, c.train.lr) == (2, 1, 0.5)
        assert c.workdir.startswith(f"{tmp_path}/root/{c.dataset}_N5_seed")  # the sweep root
    assert configs[0].model.name == "vit_small_demo"  # profile=cpu reached MUFAC only
    assert configs[2].data.synthfaces_config == "medium"
    only_training = dry_run(capsys, "--datasets=celeba", "--seeds=0", "--methods=none")
    assert [config_of(c).stages for c in only_training] == [config_lib.TRAINING] * 2


def test_slurm_mode_writes_an_array_of_every_unfinished_command(capsys, tmp_path):
    root = tmp_path / "sweep"
    argv = ["--datasets=celebahq,mufac", "--seeds=0,1", "--methods=lipschitz",
            f"--root={root}", f"--config.checkpoint_dir={tmp_path}/ckpt", "--mode=slurm"]
    expected = dry_run(capsys, *argv)
    assert len(expected) == 8
    assert sweep.main(argv) == 0  # no study has run: every command is a task; nothing submitted
    out = capsys.readouterr().out
    lines = (root / sweep.COMMANDS_FILE).read_text().splitlines()
    assert [shlex.split(line) for line in lines] == expected  # task i runs line i
    script = (root / sweep.SUBMIT_FILE).read_text()
    for args in expected:  # the script names every command
        assert shlex.join(["python", "-m", "oneshui_jax.main", *args]) in script
    assert f"--array=0-{len(expected) - 1}" in script
    assert f"launch/slurm.sh --commands={root / sweep.COMMANDS_FILE}" in script
    assert f"bash {root / sweep.SUBMIT_FILE}" in out
    assert os.stat(root / sweep.SUBMIT_FILE).st_mode & stat.S_IXUSR
    for path in (root / sweep.SUBMIT_FILE, SLURM_SH):
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert not (root / sweep.RESULTS_MD).exists()  # the table waits for --collect_only


def _stand_in(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def test_slurm_script_runs_its_array_task_on_every_node(tmp_path):
    """slurm.sh under stand-ins: srun runs its command once as process 0 (printing its own
    options), scontrol lists two hosts, python prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    _stand_in(bin_dir, "srun", f'echo "srun $*" >> {log}\nwhile [ "${{1#--}}" != "$1" ]; do '
              'shift; done\nSLURM_PROCID=0 exec "$@"\n')
    _stand_in(bin_dir, "scontrol", 'echo gpu-a17; echo gpu-a18\n')
    python = _stand_in(bin_dir, "python", f'printf "%s\\n" "$@" > {tmp_path}/argv\n')
    commands = tmp_path / "commands.txt"
    commands.write_text("--config=configs/mufac.py:N=5 --config.seed=0\n"
                        "--config=configs/mufac.py:N=5 --config.seed=1 "
                        "'--config.stages=(\"pretrain\", \"retrain\")'\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ONESHUI_PYTHON=str(python),
               SLURM_SUBMIT_DIR=REPO, SLURM_JOB_ID="12345", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES="2", SLURM_ARRAY_TASK_ID="1")
    subprocess.run(["bash", SLURM_SH, f"--commands={commands}", "--config.train.epochs=1"],
                   env=env, check=True, capture_output=True)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["-m", "oneshui_jax.main", "--distributed",
                    "--coordinator_address=gpu-a17:32345", "--num_processes=2",
                    "--process_id=0", "--config=configs/mufac.py:N=5", "--config.seed=1",
                    '--config.stages=("pretrain", "retrain")', "--config.train.epochs=1"]
    assert "--ntasks-per-node=1" in log.read_text()
    # Without an array task id, --commands is refused with one line.
    env.pop("SLURM_ARRAY_TASK_ID")
    result = subprocess.run(["bash", SLURM_SH, f"--commands={commands}"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --commands=")
    # A single study (no --commands): the arguments as given.
    subprocess.run(["bash", SLURM_SH, "--config=configs/celeba.py:N=10"], env=env, check=True,
                   capture_output=True)
    assert (tmp_path / "argv").read_text().splitlines()[-1] == "--config=configs/celeba.py:N=10"
    with open(SLURM_SH) as f:
        header = f.read()
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=", "sbatch --nodes=2"):
        assert line in header


@pytest.mark.parametrize("argv, flag, expected", [
    (["--datasets=celeba,imagenet"], "--datasets: unknown dataset 'imagenet'",
     "expected some of celeba, celebahq, mufac, synthfaces"),
    (["--methods=ssd,metaunlearn"], "--methods: unknown method 'metaunlearn'",
     "expected some of meta_unlearn"),
    (["--seeds=0,x"], "--seeds: 'x'", "expected a comma-separated list"),
    (["--num_identities=0"], "--num_identities: '0'", "integer >= 1"),
    (["--config.seed=3"], "--config.seed is set by the grid", "expected --seeds"),
    (["--config.stages=(\"pretrain\",)"], "--config.stages is set by the grid",
     "expected --methods"),
    (["--config_arg=mufac"], "--config_arg 'mufac'", "expected DATASET:KEY=VALUE"),
    (["--config_arg=celeba:N=5", "--datasets=mufac"], "celeba is not in --datasets", "mufac"),
    (["--verbose"], "unexpected argument '--verbose'", "--config.FIELD=VALUE"),
    (["--datasets=mufac", "--config.train.epochz=3"], "unknown config field 'epochz'",
     "Did you mean"),
    (["--datasets=mufac", "--config_arg=mufac:size=small"], "unknown config argument 'size'",
     "expected method"),
    (["--submit"], "--submit", "expected --mode=slurm"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, argv, flag, expected):
    status = sweep.main([*argv, f"--root={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert flag in err[0] and expected in err[0]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_plan_agrees_with_the_fingerprints_runs_stored(small_study):
    """Every stage of the shared small study would be reused (the plan computes the
    fingerprints the stages stored); another method setting refuses that method only."""
    config = small_study.config
    plans = plan.stage_plans(config)
    assert [(p.stage, p.decision) for p in plans] == [(s, "reuse") for s in config.stages]
    assert [p.run_dir for p in plans] == [small_study.run_dir(s) for s in config.stages]
    changed = config.copy_and_resolve_references()
    changed.meta_unlearn.lr *= 2
    decisions = {p.stage: (p.decision, p.reason) for p in plan.stage_plans(changed)}
    assert decisions["meta_unlearn"][0] == plan.REFUSED
    assert "meta_unlearn.lr" in decisions["meta_unlearn"][1]
    assert {s: d for s, (d, _) in decisions.items() if s != "meta_unlearn"} == {
        "pretrain": "reuse", "retrain": "reuse", "support_ascent": "reuse"}
    # Another training setting reaches pretrain, retrain and (through the parent's hash) no
    # further: the methods start from the stored pretrained model.
    changed = config.copy_and_resolve_references()
    changed.train.lr *= 2
    decisions = {p.stage: p.decision for p in plan.stage_plans(changed)}
    assert decisions["pretrain"] == decisions["retrain"] == plan.REFUSED


@pytest.mark.slow
def test_two_seed_sweep_runs_skips_when_finished_and_collects_one_table(
        synthfaces_tfds, tmp_path, capfd):
    root, ckpt = tmp_path / "sweep", tmp_path / "ckpt"
    argv = ["--datasets=synthfaces", "--num_identities=5", "--seeds=0,1", "--methods=none",
            "--config_arg=synthfaces:size=small", f"--root={root}",
            f"--config.checkpoint_dir={ckpt}", f"--config.data.tfds_dir={synthfaces_tfds}",
            # the tiny study of tests/small_study.py, smaller: 1 epoch of the tiny test ViT
            "--config.train.epochs=1", "--config.train.warmup_epochs=0",
            "--config.model.name=vit_tiny_test", "--config.data.num_threads=0",
            "--config.mia.loss_rf=False", "--config.mia.rmia=False", "--config.progress=False"]
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    assert "sweep: ran 2, skipped 0 finished" in out
    run_dirs = sorted(str(p.parent) for p in ckpt.rglob(checkpoints.METADATA_FILE))
    assert len(run_dirs) == 6  # pretrain, retrain and retrain_2 of each seed
    stamps = {p: os.stat(os.path.join(p, checkpoints.METADATA_FILE)).st_mtime_ns
              for p in run_dirs}
    results = [root / f"synthfaces_N5_seed{s}" / "results.json" for s in (0, 1)]
    result_stamps = [os.stat(p).st_mtime_ns for p in results]

    assert sweep.main(argv) == 0  # everything finished: nothing runs
    out = capfd.readouterr().out
    assert "sweep: ran 0, skipped 2 finished" in out
    assert out.count("skip synthfaces_N5_seed") == 2
    assert "] run " not in out
    assert stamps == {p: os.stat(os.path.join(p, checkpoints.METADATA_FILE)).st_mtime_ns
                      for p in run_dirs}
    assert result_stamps == [os.stat(p).st_mtime_ns for p in results]

    # The table: both seeds' runs, the aggregate over them and the paired differences.
    markdown = (root / sweep.RESULTS_MD).read_text()
    assert markdown in out  # printed too
    per_run = markdown.split("Per run:")[1]
    assert "| seed |" in per_run
    for seed in (0, 1):
        assert f"| pretrain | none | {seed} |" in per_run
        assert f"| retrain | oracle | {seed} |" in per_run
    table = json.loads((root / sweep.RESULTS_JSON).read_text())
    records = table["datasets"]["synthfaces"]["results"]
    assert sorted((r["method"], r["seed"]) for r in records) == [
        ("pretrain", 0), ("pretrain", 1), ("retrain", 0), ("retrain", 1), ("retrain_2", 0),
        ("retrain_2", 1)]
    paired = table["datasets"]["synthfaces"]["paired"]
    assert [(p["method"], p["seeds"]) for p in paired] == [("retrain", [0, 1]),
                                                          ("retrain_2", [0, 1])]
    assert table["missing"] == []

    # Skipping asks the stages' fingerprints, not whether files exist: a finished run whose
    # stored fingerprint is not the command's makes the command run (the study then refuses it).
    [command] = sweep.expand(["synthfaces"], [5], (), [1], str(root), argv[6:],
                             {"synthfaces": ["size=small"]})
    retrain = next(p for p in run_dirs if os.path.basename(p) == "retrain_5_1")
    with open(os.path.join(retrain, checkpoints.METADATA_FILE)) as f:
        metadata = json.load(f)
    metadata["fingerprint"]["hash"] = "0" * 64
    metadata["fingerprint"]["parts"]["seed"] = 7
    with open(os.path.join(retrain, checkpoints.METADATA_FILE), "w") as f:
        json.dump(metadata, f)
    done, why = sweep.finished(command)
    assert not done and "stage retrain would be refused" in why and "seed: 7 -> 1" in why
    # Another setting: the report was made with another config.
    [other] = sweep.expand(["synthfaces"], [5], (), [0], str(root),
                           [*argv[6:], "--config.train.lr=0.5"], {"synthfaces": ["size=small"]})
    done, why = sweep.finished(other)
    assert not done and "results.json was written with another config (differs in train)" in why


def test_sweep_is_runnable_as_a_script():
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sweep.py"),
                             "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and "--dry_run" in result.stdout
