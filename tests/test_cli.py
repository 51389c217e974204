"""The command lines of ``oneshui_jax/cli/`` on absl flags: ``--help`` of each (its docstring,
then every flag; exit status 0) and how a command's own flags are read (``cli/common.py``), in
process. Their error lines are tested in test_cli_errors."""

import importlib

import pytest
from absl import flags

from oneshui_jax.cli import common

COMMANDS = {  # module of oneshui_jax.cli: flags its --help must list
    "request": ("checkpoint", "portrait", "out", "artifacts", "method", "identity", "labels",
                "request_id", "overwrite"),
    "inspect": ("diff", "verify", "json"),
    "convert": ("model", "width", "depth", "num_heads", "patch_size", "mlp_ratio", "num_classes",
                "image_size"),
    "splits": ("dataset", "data_dir", "synthfaces_config", "num_identities", "seed", "out",
               "dedup"),
    "report": ("out", "group_by_config"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_docstring_and_every_flag_and_exits_0(name, flag, capsys):
    module = importlib.import_module(f"oneshui_jax.cli.{name}")
    assert module.FLAGS is not flags.FLAGS  # its own flags: --out of several commands in one
    with pytest.raises(SystemExit) as exit_info:
        module.main([flag, "--no_such_flag"])  # help first, before any other complaint
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(module.__doc__.strip().splitlines()[0]), captured.out
    for name_ in (*COMMANDS[name], "help"):
        assert f"--{name_}:" in captured.out or f"--[no]{name_}:" in captured.out, name_
    assert captured.err == ""


def _toy_flags():
    flag_values = common.command_flags()
    flags.DEFINE_string("out", None, "a new folder", flag_values=flag_values, required=True)
    flags.DEFINE_multi_integer("identity", None, "an identity", flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "replace --out", flag_values=flag_values)
    return flag_values


def test_parse_forgets_an_earlier_call_and_returns_the_positional_arguments():
    toy = _toy_flags()
    rest = common.parse(toy, ["a", "--out", "x", "--identity", "1", "--identity", "2",
                              "--overwrite", "b"], None)
    assert rest == ["a", "b"] and toy.identity == [1, 2] and toy.overwrite
    assert common.parse(toy, ["--out", "y"], None) == []
    assert (toy.out, toy.identity, toy.overwrite) == ("y", None, False)


@pytest.mark.parametrize("argv, line", [
    ([], "error: flag --out is required; expected a new folder"),
    (["--out"], "error: flag --out has no value; expected a new folder"),
    (["--out", "x", "--identity", "one"],
     "error: flag --identity=one: invalid literal for int() with base 10: 'one'; expected an "
     "integer"),
    (["--out", "x", "--overwrite=maybe"],
     "error: flag --overwrite=maybe: not true or false; expected --overwrite or --nooverwrite "
     "(true or false)"),
    (["--out", "x", "--identiy", "1"],
     "error: unknown flag --identiy (did you mean --identity?); expected --help, --identity, "
     "--out, --overwrite (see --help)"),
], ids=["required", "no_value", "not_an_int", "not_a_bool", "unknown"])
def test_a_flag_mistake_is_one_line_naming_the_flag_and_exit_2(argv, line, capsys):
    toy = _toy_flags()
    with pytest.raises(SystemExit) as exit_info:
        common.parse(toy, argv, None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
