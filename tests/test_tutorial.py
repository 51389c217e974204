"""The tutorial "Add your own unlearning method" (docs/add-a-method.md) runs as written: its
method (``docs/examples/head_ascent.py``) and config (``docs/examples/head_ascent_config.py``),
which the page includes verbatim, run as a study stage on the shared small study, appear in the
results table and serve a deletion request in a process that had never imported them."""

import os
import re
import shutil

import jax
import numpy as np
import pytest

from oneshui_jax import checkpoints, study
from oneshui_jax.cli import config_flags
from oneshui_jax.errors import ConfigError
from oneshui_jax.unlearn import api, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "add-a-method.md")
MODULE = "docs.examples.head_ascent"


def test_the_page_includes_the_example_files_that_the_test_runs():
    with open(PAGE, encoding="utf-8") as f:
        included = re.findall(r'^--8<-- "([^"]+)"$', f.read(), flags=re.M)
    assert included == ["docs/examples/head_ascent.py", "docs/examples/head_ascent_config.py"]
    assert all(os.path.isfile(os.path.join(REPO, p)) for p in included)


def test_a_method_module_that_cannot_be_loaded_is_one_config_error(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    config = {"head_ascent": {"method": "docs.examples.no_such_method"}}
    with pytest.raises(ConfigError, match=r"config.head_ascent.method names the method module "
                                          r"'docs.examples.no_such_method', which cannot be"):
        registry.resolve(config, "head_ascent")
    config = {"x": {"method": "oneshui_jax.losses"}}  # importable, but not a method
    with pytest.raises(ConfigError, match=r"config.x.method: method 'oneshui_jax.losses'.*"
                                          r"ACCESS must be one of"):
        registry.resolve(config, "x")
    assert "oneshui_jax.losses" not in registry.METHODS
    with pytest.raises(ConfigError, match="'ssd' is taken by oneshui_jax.unlearn.ssd"):
        registry.register("ssd", registry.METHODS["lipschitz"])


def test_the_tutorial_method_runs_in_a_study_appears_in_the_table_and_serves(
        small_study, tmp_path, monkeypatch):
    from PIL import Image

    from oneshui_jax import serve

    monkeypatch.chdir(REPO)  # as the page runs it: from the repository root
    monkeypatch.syspath_prepend(REPO)
    monkeypatch.delitem(registry.METHODS, MODULE, raising=False)
    config = config_flags.load_config([
        "--config=docs/examples/head_ascent_config.py:runlocal=True",
        "--config.stages=('pretrain', 'retrain', 'head_ascent')"])
    # The shared small study's data and training settings, so that its pretrained and retrained
    # runs, copied here, are reused; the new stage is the only one that runs.
    shared = small_study.config
    for key in ("data.tfds_dir", "train.epochs", "train.warmup_epochs", "train.lr"):
        section, field = key.split(".")
        config[section][field] = shared[section][field]
    config.workdir, config.checkpoint_dir = str(tmp_path / "work"), str(tmp_path / "ckpt")
    for stage in ("pretrain", "retrain"):
        source = small_study.run_dir(stage)
        shutil.copytree(source, source.replace(shared.checkpoint_dir, config.checkpoint_dir))

    records = study.run(config)

    by_stage = {r["method"]: r for r in records}
    assert by_stage["pretrain"]["reused"] and by_stage["retrain"]["reused"]
    record = by_stage["head_ascent"]
    assert not record.get("reused") and record["access"] == api.SUPPORT
    assert registry.METHODS[MODULE].ACCESS == api.SUPPORT  # imported by path and registered
    with open(os.path.join(config.workdir, "results.md"), encoding="utf-8") as f:
        assert re.search(r"^\| head_ascent \| support \| [0-9.]+ \| [0-9.]+ \|", f.read(), re.M)

    run_dir = small_study.run_dir("head_ascent").replace(shared.checkpoint_dir,
                                                         config.checkpoint_dir)
    metadata = checkpoints.read_metadata(run_dir)
    assert metadata["method"] == MODULE and metadata["variant"] == "head_ascent"
    assert metadata["method_config"]["steps"] == 5
    pretrained = checkpoints.load_params(small_study.run_dir("pretrain"))
    unlearned = checkpoints.load_params(run_dir)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), pretrained, unlearned)
    assert changed.pop("head") == {"kernel": True, "bias": True}  # the head moved...
    assert not any(jax.tree.leaves(changed))  # ...and nothing else

    # Served as a fresh server would: the method is found again from the path its run records.
    monkeypatch.delitem(registry.METHODS, MODULE)
    portrait = str(tmp_path / "portrait.png")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(portrait)
    receipt = serve.serve_request(run_dir, [portrait], str(tmp_path / "request"))
    assert receipt.method == MODULE and receipt.hyperparameters["portrait_loss_after"] > 0
    served = checkpoints.load_params(str(tmp_path / "request"))
    assert checkpoints.params_hash(served) != checkpoints.params_hash(pretrained)
