"""The range of every numeric setting, checked before any work, through the real command lines.

One schema (``study.validate.declared_ranges``: the study's ``SETTINGS``, ``TrainConfig.RANGES``
and every method ``Config``'s ``RANGES``, each an ``api.Range``) gives every numeric setting of
every shipped config a range. ``python -m oneshui_jax.main`` (``parse_flags`` then ``main``, in
process) refuses a value outside it with one ``error:`` line naming ``config.<path>``, the value
and the range, exit status 2, before any data is read or anything is written; so does
``python -m oneshui_jax.splits`` for its ``--seed``. A config file that raises, defines no
``get_config()`` or returns no ConfigDict is one line too; a training loss that becomes NaN stops
the study with one line naming the stage, the epoch and what was kept.
"""

import dataclasses
import importlib.util
import math
import os
import re
import types

import ml_collections
import pytest

from oneshui_jax import checkpoints, optim, splits
from oneshui_jax import main as main_cli
from oneshui_jax import train as train_lib
from oneshui_jax.cli import splits as splits_cli
from oneshui_jax.errors import ConfigError
from oneshui_jax.study import validate
from oneshui_jax.unlearn import api, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(REPO, "configs", "synthfaces.py")
STUDY = f"{SYNTH}:N=5,size=small"  # the config the command-line cases start from
MAX_SEED = 2**31 - 1
# Every config file with the arguments that change its blocks (each file's default included).
SHIPPED = {"synthfaces": ("", "size=small", "size=large,N=50"),
           "mufac": ("", "profile=cpu", "method=all,N=5"),
           "celeba": ("method=all,N=5",), "celebahq": ("method=all,N=50",)}


def load_config(name: str, arg: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_ranges_config_{name}",
                                                  os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def numeric_paths(block, prefix: str = ""):
    """Every dotted path of ``block`` holding a number, a tuple of numbers or a numeric
    placeholder (None until set, such as ``split_seed``)."""
    for key in block.keys():
        value, path = block[key], f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from numeric_paths(value, path + ".")
        elif (_is_number(value) or (value is None and block.get_type(key) in (int, float))
              or (isinstance(value, tuple) and value and all(map(_is_number, value)))):
            yield path


# --------------------------------------------------------------------------------------------
# The schema: every numeric setting has a range, and every shipped config is inside them


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in SHIPPED.items() for a in args])
def test_every_numeric_setting_of_every_shipped_config_has_a_range(name, arg):
    config = load_config(name, arg)
    declared = validate.declared_ranges(config)
    paths = list(numeric_paths(config))
    assert {"seed", "split_seed", "train.lr", "data.eval_batch_size", "mia.passes",
            "meta_unlearn.batch_size", "scrub.alpha"} <= set(paths)
    missing = [p for p in paths if p not in declared]
    assert not missing, f"configs/{name}.py:{arg}: no range declared for {missing}"
    validate.validate_config(config)  # its defaults are inside every range


def test_every_numeric_field_of_every_config_class_has_a_range():
    classes = {"train.TrainConfig": train_lib.TrainConfig,
               **{f"{name}.Config": m.Config for name, m in registry.METHODS.items()}}
    for name, cls in classes.items():
        numeric = api.numeric_settings(cls)
        assert numeric, name
        missing = [f for f in numeric if f not in cls.RANGES]
        assert not missing, f"{name}: no range declared for {missing}"
        assert all(isinstance(r, api.Range) for r in cls.RANGES.values()), name


def test_a_method_with_a_numeric_setting_without_a_range_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Config:
        task: str = dataclasses.field(default="multilabel", metadata={"bound": "task"})
        steps: int = 3
        lr: float = 0.1
        RANGES = {"lr": api.LEARNING_RATE}

    module = types.ModuleType("fake_method")
    module.ACCESS, module.Config, module.unlearn = api.SUPPORT, Config, lambda *a, **k: None
    with pytest.raises(TypeError, match=r"Config.RANGES must give a Range for every numeric "
                                        r"setting; missing: \['steps'\]"):
        api.check_method("fake", module)
    Config.RANGES = {"lr": api.LEARNING_RATE, "steps": api.COUNT}
    api.check_method("fake", module)


@pytest.mark.parametrize("allowed, inside, outside", [
    (api.COUNT, [1, 2**40], [0, -1, 1.0, True, None, "3"]),
    (api.COUNT_OR_ZERO, [0, 7], [-1, 0.5]),
    (api.SEED, [0, MAX_SEED], [-1, MAX_SEED + 1, 2**32, 1.5]),
    (api.LEARNING_RATE, [1e-12, 3, 10.0], [0.0, -1e-3, math.nan, math.inf, False]),
    (api.NON_NEGATIVE, [0.0, 0, 5e-4], [-1e-9, math.nan, math.inf]),
    (api.MOMENTUM, [0.0, 0.999], [1.0, -0.1]),
    (api.FRACTION, [0.0, 1.0], [1.0001, -0.1]),
    (api.NON_NEGATIVE_LIST, [(0.0,), (0.0, 1e-4, 2)], [(), (-1.0,), (math.nan,), 1.0, ("a",)]),
    (validate.SETTINGS["mesh.data"], [-1, 1, 8], [0, -2]),
    (validate.SETTINGS["mia.passes"], [1, 255], [0, 256]),
    (validate.SETTINGS["split_seed"], [None, 0, MAX_SEED], [-1, MAX_SEED + 1]),
    (validate.SETTINGS["mia.rmia_point"], [(), (2, 0.5), (1, 1.0)],
     [(0, 0.5), (2,), (-1.0, 0.5), (2, 0.5, 1), (math.nan, 1)]),
    (validate.SETTINGS["data.crop_scale"], [(0.08, 1.0), (1.0, 1.0), [0.5, 0.5]],
     [(0.0, 1.0), (0.9, 0.5), (0.5, 1.5), (0.5,), (0.1, 0.5, 1.0)]),
])
def test_range_kinds_accept_their_edges_and_nothing_outside(allowed, inside, outside):
    assert [v for v in inside if not allowed.accepts(v)] == []
    assert [v for v in outside if allowed.accepts(v)] == []


def test_edge_values_of_the_study_validate():
    config = load_config("synthfaces", "N=5,size=small")
    for path, value in (("seed", 0), ("seed", MAX_SEED), ("split_seed", 0),
                        ("train.warmup_epochs", 0), ("train.momentum", 0.0),
                        ("train.weight_decay", 0.0), ("data.eval_batch_size", 1),
                        ("data.num_threads", 0), ("data.crop_scale", (1.0, 1.0)),
                        ("mia.passes", 255), ("mesh.data", -1), ("checkpoint_every_s", 0.0),
                        ("scrub.alpha", 0.0), ("meta_unlearn.num_layers", 0)):
        edited = config.copy_and_resolve_references()
        *parents, leaf = path.split(".")
        block = edited
        for key in parents:
            block = block[key]
        block[leaf] = value
        validate.validate_config(edited)


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.main in process: one line, exit 2, nothing read or written


@pytest.fixture
def study_cli(tmp_path, capsys, monkeypatch):
    """``run(*overrides, tfds_dir=None)``: ``parse_flags`` + ``main`` of ``python -m
    oneshui_jax.main --config=configs/synthfaces.py:N=5,size=small`` writing under tmp_path;
    returns ``(status, stdout, stderr)``. The absl handler's filters are restored afterwards."""
    handler = main_cli.logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", list(handler.filters))

    def run(*overrides, config=STUDY, tfds_dir=None):
        argv = ["oneshui_jax.main", f"--config={config}",
                f"--config.workdir={tmp_path / 'work'}",
                f"--config.checkpoint_dir={tmp_path / 'ckpt'}",
                f"--config.data.tfds_dir={tfds_dir or tmp_path / 'tfds'}",
                "--config.progress=False", "--config.data.num_threads=0",
                "--config.mia.loss_rf=False", "--config.mia.rmia=False", *overrides]
        capsys.readouterr()
        try:
            main_cli.main(main_cli.parse_flags(argv))
            status = 0
        except SystemExit as e:
            status = e.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def assert_one_error(outcome, line: str) -> None:
    status, out, err = outcome
    assert (status, out, err.splitlines()) == (2, "", [f"error: {line}"]), outcome


def assert_nothing_written(tmp_path) -> None:
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def _override(path: str, value) -> str:
    return f"--config.{path}={value!r}" if isinstance(value, tuple) else f"--config.{path}={value}"


def _stages_for(path: str) -> list[str]:
    block = path.split(".")[0]
    if block in registry.METHODS or block == "meta_unlearn_reference":
        return [f"--config.stages=('pretrain', '{block}')"]
    return []


# The cases and the other settings one at a time: what each reported before (a crash
# after a stage or a run that exits 0) is now one line naming it, before any work.
CASES = [
    ("seed", -1, f"an int seed in [0, {MAX_SEED}]"),
    ("seed", MAX_SEED + 1, f"an int seed in [0, {MAX_SEED}]"),
    ("split_seed", -1, f"an int seed in [0, {MAX_SEED}] or None (the split follows "
                       "config.seed)"),
    ("num_identities", 0, "an int >= 1"),
    ("train.epochs", 0, "an int >= 1"),
    ("train.batch_size", 0, "an int >= 1"),
    ("train.lr", -0.1, "a finite number > 0"),
    ("train.lr", 0.0, "a finite number > 0"),
    ("train.lr", math.nan, "a finite number > 0"),
    ("train.lr", math.inf, "a finite number > 0"),
    ("train.weight_decay", -0.0001, "a finite number >= 0"),
    ("train.momentum", 1.0, "a number in [0, 1)"),
    ("train.warmup_epochs", -1, "an int >= 0"),
    ("data.eval_batch_size", 0, "an int >= 1"),
    ("data.image_size", 0, "an int >= 1"),
    ("data.num_threads", -1, "an int >= 0 (0: read in the calling thread)"),
    ("data.crop_scale", (0.9, 0.5), "two numbers 0 < low <= high <= 1 (RandomResizedCrop's "
                                    "area range)"),
    ("mia.passes", 0, "an int >= 1 and <= 255 (votes are counted in uint8)"),
    ("mia.passes", 256, "an int >= 1 and <= 255 (votes are counted in uint8)"),
    ("mia.batch_size", 0, "an int >= 1"),
    ("mia.subsample_z", 0, "an int >= 1"),
    ("mia.cache_mb", -1, "a finite number of MB >= 0"),  # an int field of the config
    ("checkpoint_every_s", math.inf, "a finite number of seconds >= 0 (0: save at every epoch "
                                     "or request)"),
    ("mesh.data", 0, "-1 (every device) or a number of devices >= 1"),
    ("meta_unlearn.batch_size", 0, "an int >= 1"),
    ("meta_unlearn.lr", -0.0001, "a finite number >= 0"),
    ("meta_unlearn_reference.epochs", 0, "an int >= 1"),  # a variant: named by its own block
    ("support_ascent.alphas", (-1.0,), "finite numbers >= 0 (a non-empty tuple)"),
    ("ssd.dampening_constant", -0.1, "a finite number >= 0"),
    ("lipschitz.weighting", 0.0, "a finite number > 0"),
    ("pgu.gamma", 1.5, "a number in [0, 1]"),
    ("scrub.alpha", -1.0, "a finite number >= 0"),
    ("scrub.temperature", 0.0, "a finite number > 0"),
    ("bad_teacher.lr", -0.1, "a finite number >= 0"),
    ("bad_teacher.momentum", 1.0, "a number in [0, 1)"),
]


@pytest.mark.parametrize("path, value, expected", CASES,
                         ids=[f"{p}={v!r}" for p, v, _ in CASES])
def test_main_refuses_a_setting_out_of_range(study_cli, tmp_path, path, value, expected):
    outcome = study_cli(*_stages_for(path), _override(path, value))
    assert_one_error(outcome, f"config.{path} must be {expected}, got {value!r}")
    assert_nothing_written(tmp_path)


def _outside(allowed: api.Range, integer: bool) -> list:
    """Values just outside ``allowed`` (below its low end, above its high end; NaN for a float
    that is not in a tuple), ints where the config's field is an int."""
    kind = int if integer else float
    edges = []
    if allowed.low is not None:
        edges.append(kind(allowed.low) if allowed.low_open else kind(allowed.low) - 1)
    if allowed.high is not None:
        edges.append(kind(allowed.high) if allowed.high_open else kind(allowed.high) + 1)
    values = [v for v in edges if v not in allowed.also]
    if allowed.sequence:  # one bad element among good ones
        good = allowed.high if allowed.high is not None else allowed.low + 1.0
        return [(v,) + (float(good),) * ((allowed.length or 1) - 1) for v in values]
    return values if integer else [*values, math.nan]


def _every_declared_case():
    config = load_config("synthfaces", "N=5,size=small")
    cases = []
    for path, allowed in validate.declared_ranges(config).items():
        *parents, leaf = path.split(".")
        block = config
        for key in parents:
            block = block[key]
        integer = allowed.integer or (block.get_type(leaf) is int)
        cases += [(path, value) for value in _outside(allowed, integer)]
    return cases


def test_main_refuses_every_declared_range_at_its_edges(study_cli, tmp_path):
    """Generated from the schema: every declared setting, just outside its range, is one line
    naming it (so a range declared but not checked fails here)."""
    cases = _every_declared_case()
    assert len(cases) > 60
    ranges = validate.declared_ranges(load_config("synthfaces", "N=5,size=small"))
    for path, value in cases:
        outcome = study_cli(*_stages_for(path), _override(path, value))
        assert_one_error(outcome, f"config.{path} must be {ranges[path].expected}, got "
                                  f"{value!r}")
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------------------------
# A config file that fails: one line naming it and what it raised


@pytest.mark.parametrize("source, line", [
    ("def get_config(arg=None):\n    raise RuntimeError('no such study: ' + str(arg))\n",
     "--config {path}: get_config() raised RuntimeError: no such study: None (line 2)"),
    ("def get_config():\n    return {}['dataset']\n",
     "--config {path}: get_config() raised KeyError: 'dataset' (line 2)"),
    ("import not_a_module_anywhere\n",
     "--config {path}: loading it raised ModuleNotFoundError: No module named "
     "'not_a_module_anywhere' (line 1)"),
    ("SEED = 1\n", "--config {path} defines no get_config(); expected a Python file defining "
                   "get_config() that returns an ml_collections.ConfigDict, such as "
                   "configs/synthfaces.py"),
    ("def get_config():\n    pass\n",
     "--config {path}: get_config() returned None; expected an ml_collections.ConfigDict"),
], ids=["raises", "raises_key_error", "import_fails", "no_get_config", "returns_none"])
def test_main_names_a_config_file_that_fails(study_cli, tmp_path, source, line):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "mine.py"
    path.write_text(source)
    assert_one_error(study_cli(config=str(path)), line.format(path=path))
    assert sorted(os.listdir(tmp_path)) == ["configs"]


@pytest.mark.parametrize("source,line", [
    ("def get_config(arg=None):\n    raise RuntimeError('no such study: ' + str(arg))\n",
     "--config {path}: get_config() raised RuntimeError: no such study: None (line 2)"),
    ("import not_a_module_anywhere\n",
     "--config {path}: loading it raised ModuleNotFoundError: No module named "
     "'not_a_module_anywhere' (line 1)"),
], ids=["raises", "import_fails"])
def test_the_sweep_plan_names_a_config_file_that_fails(tmp_path, source, line):
    """``cli.config_flags.load_config`` (the sweep's skip check) says what ``main`` says."""
    from oneshui_jax.cli import config_flags

    path = tmp_path / "mine.py"
    path.write_text(source)
    with pytest.raises(ValueError) as caught:
        config_flags.load_config([f"--config={path}"])
    assert str(caught.value) == line.format(path=path)


def test_main_names_a_config_file_that_returns_no_config_dict(capsys, tmp_path):
    """Without overrides (with one, the override finds no field to set and says so)."""
    path = tmp_path / "mine.py"
    path.write_text("def get_config():\n    return [1]\n")
    with pytest.raises(SystemExit) as exit_info:
        main_cli.parse_flags(["oneshui_jax.main", f"--config={path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --config {path}: get_config() returned a list; expected an "
        "ml_collections.ConfigDict"]


def test_parse_flags_can_run_twice_with_the_same_override(study_cli, tmp_path):
    """A second command line in the same process (these tests) forgets the first's overrides
    instead of failing on a flag defined twice."""
    for value in (-1, -2):
        assert_one_error(study_cli(f"--config.seed={value}"),
                         f"config.seed must be an int seed in [0, {MAX_SEED}], got {value}")


# --------------------------------------------------------------------------------------------
# python -m oneshui_jax.splits: the seed


SMALL = ["--dataset", "synthfaces", "--synthfaces_config", "small", "--num_identities", "5"]


def test_splits_refuses_a_seed_out_of_range(capsys, tmp_path):
    """``random.Random(-1)`` replays seed 1: the command wrote seed 1's split labelled -1."""
    out = tmp_path / "split.json"
    for seed in (-1, MAX_SEED + 1):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            splits_cli.main([*SMALL, "--seed", str(seed), "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.splitlines() == [f"error: --seed must be an int seed in [0, {MAX_SEED}], got "
                                    f"{seed}"], err
        assert not out.exists()
    splits_cli.main([*SMALL, "--seed", str(MAX_SEED), "--out", str(out)])
    assert out.exists()


def test_make_splits_refuses_a_negative_seed():
    from oneshui_jax.data.annotations import read_identities

    ann = read_identities("synthfaces", None, "small")
    with pytest.raises(ConfigError, match=rf"^seed must be an int seed in \[0, {MAX_SEED}\], "
                                          r"got -1$"):
        splits.make_splits(ann, 5, -1)
    assert splits.make_splits(ann, 5, 1).forget  # the seed the negative one used to replay


# --------------------------------------------------------------------------------------------
# A training loss that becomes NaN: one line naming the stage, the epoch and what was kept


TINY = ["--config.model.name=vit_tiny_test", "--config.stages=('pretrain',)",
        "--config.train.epochs=3", "--config.train.batch_size=256",
        "--config.data.eval_batch_size=256", "--config.train.warmup_epochs=0",
        "--config.checkpoint_every_s=0.0"]


def test_main_stops_at_a_nan_loss_with_nothing_saved(study_cli, synthfaces_tfds, tmp_path):
    """A planted huge learning rate: the loss is NaN in the first epoch, before any save."""
    status, out, err = study_cli(*TINY, "--config.train.lr=1e30", tfds_dir=synthfaces_tfds)
    assert (status, out) == (2, ""), err
    assert len(err.splitlines()) == 1, err  # one line: no traceback, no log
    last = err.strip()
    assert re.fullmatch(
        r"error: pretrain: the training loss became (nan|inf) in epoch 0 \(epochs 0-2\); "
        r"training stopped and nothing was saved\. Lower the learning rate "
        r"\(config\.train\.lr=1e\+30\) or check the data", last), last
    run_dir = os.path.join(str(tmp_path / "ckpt"), "synthfaces_small", "vit_tiny_test",
                           "pretrain_5_0")
    with checkpoints.TrainCheckpointer(run_dir) as saved:
        assert saved.latest_step() is None


def test_main_stops_at_a_nan_loss_and_names_the_last_save(study_cli, synthfaces_tfds, tmp_path,
                                                          monkeypatch):
    """A huge learning rate planted from epoch 1 on, after epoch 0 was saved: the error names
    that save, which holds epoch 0's finite state."""
    real_lr = optim.reference_lr

    def huge_from_epoch_1(step, *, steps_per_epoch, **kwargs):
        lr = real_lr(step, steps_per_epoch=steps_per_epoch, **kwargs)
        return 1e30 if step >= steps_per_epoch else lr

    monkeypatch.setattr(optim, "reference_lr", huge_from_epoch_1)
    status, out, err = study_cli(*TINY, "--config.train.lr=1e-3", tfds_dir=synthfaces_tfds)
    assert (status, out) == (2, ""), err
    assert len(err.splitlines()) == 1, err  # one line: no traceback, no log
    last = err.strip()
    state = os.path.join(str(tmp_path / "ckpt"), "synthfaces_small", "vit_tiny_test",
                         "pretrain_5_0", checkpoints.TRAIN_STATE_DIR)
    assert re.fullmatch(
        r"error: pretrain: the training loss became (nan|inf) in epoch 1 \(epochs 0-2\); "
        r"training stopped and the last good checkpoint was kept: the last save at epoch 0 in "
        + re.escape(state) + r"\. Lower the learning rate \(config\.train\.lr=0\.001\) or "
        r"check the data", last), last
    with checkpoints.TrainCheckpointer(os.path.dirname(state)) as saved:
        step, _, meta = saved.info()
    assert meta["epoch"] == 1 and step == meta["step"] and len(meta["history"]) == 1
    assert math.isfinite(meta["history"][0]["train_loss"])
