"""The reference's hyper-parameter table (hparams) and the config files built on it."""

import glob
import importlib.util
import logging
import os

import pytest

from oneshui_jax import config_lib, hparams, study
from oneshui_jax.errors import ConfigError
from oneshui_jax.unlearn import api, registry
from oneshui_jax.unlearn import meta_unlearn as mu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_N = {"celeba": (5, 10), "celebahq": (20, 50), "mufac": (5, 10)}  # SPEC.md 6.6
DEFAULT_N = {"celeba": 10, "celebahq": 20, "mufac": 10}
STUDY_BLOCKS = ("data", "model", "train", "meta_unlearn")


def load_config_file(name: str):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_oneshui_test_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[key] = value
    return out


def ref(method, dataset, n):
    return hparams.reference(method, dataset, n).values


# ---------------------------------------------------------------------------------------------
# hparams: spot checks against SPEC.md 4.2, 6.6, 7


def test_pretrain_and_retrain_values():
    for method in ("pretrain", "retrain"):
        for dataset, wd in (("celebahq", 1e-3), ("celeba", 1e-4), ("mufac", 1e-4)):
            h = hparams.reference(method, dataset, 7)
            assert h.tuned
            v = h.values
            assert (v["optimizer"], v["epochs"], v["batch_size"], v["lr"], v["momentum"]) == (
                "sgd", 30, 32, 1e-3, 0.9)
            assert v["weight_decay"] == wd
            assert (v["scheduler"], v["t_max"], v["warmup_epochs"], v["clip_grad"]) == (
                "cosine", 30, 2, 0.0)


def test_meta_unlearn_values():
    v = ref("meta_unlearn", "mufac", 5)
    assert (v["epochs"], v["lr"], v["meta_lr"], v["num_identities_simulation"]) == (
        10, 1e-2, 1e-3, 5)
    v = ref("meta_unlearn", "mufac", 10)
    assert (v["epochs"], v["lr"], v["meta_lr"]) == (3, 1e-3, 1e-3)
    for dataset in ("celeba", "celebahq"):
        v = ref("meta_unlearn", dataset, 20)
        assert (v["epochs"], v["lr"], v["meta_lr"], v["num_identities_simulation"]) == (
            3, 1e-4, 0.1, 20)
    assert ref("meta_unlearn", "celebahq", 1)["num_identities_simulation"] == 50
    assert ref("meta_unlearn", "celebahq", 1)["lr"] == 1e-4
    assert ref("meta_unlearn", "celeba", 1)["num_identities_simulation"] == 10
    assert ref("meta_unlearn", "celeba", 1)["lr"] == 1e-3
    v = ref("meta_unlearn", "mufac", 10)
    assert (v["batch_size"], v["optimizer"], v["amsgrad"], v["weight_decay"]) == (
        64, "adamw", True, 0.0)
    assert (v["scheduler"], v["warmup_epochs"], v["use_train_aug"]) == ("cosine", 0, True)
    assert (v["hidden_size"], v["num_layers"], v["prob_dropout"], v["forget_epochs"]) == (
        512, 0, 0.5, 1)


def test_baseline_values():
    v = ref("scrub", "celeba", 5)
    assert (v["lr"], v["use_train_aug"], v["forgetting_epochs"]) == (5e-3, False, 5)
    assert (v["epochs"], v["momentum"], v["weight_decay"], v["batch_size_retain"]) == (
        10, 0.9, 5e-4, 32)
    assert (v["alpha_scrub"], v["gamma_scrub"], v["temperature_scrub"]) == (0.001, 0.99, 4.0)
    v = ref("scrub", "mufac", 10)
    assert (v["lr"], v["use_train_aug"], v["forgetting_epochs"]) == (1e-3, True, 5)
    v = ref("ssd", "mufac", 10)
    assert (v["ssd_dampening_constant"], v["ssd_selection_weighting"], v["batch_size"]) == (
        0.1, 1.0, 128)
    assert ref("ssd", "celebahq", 50)["ssd_dampening_constant"] == 0.5
    assert isinstance(ref("ssd", "celeba", 5)["ssd_dampening_constant"], float)  # const: int 2
    v = ref("pgu", "mufac", 10)
    assert (v["lr"], v["epochs"], v["pgu_gamma"], v["batch_size"]) == (0.1, 10, 0.75, 128)
    assert ref("pgu", "celeba", 200)["lr"] == 0.01
    v = ref("lipschitz", "celebahq", 20)
    assert (v["lipschitz_weighting"], v["lr"], v["lipschitz_n_samples"]) == (30.0, 0.01, 25)
    v = ref("bad_teacher", "celebahq", 500)
    assert (v["batch_size"], v["lr"], v["use_train_aug"], v["epochs"]) == (256, 1e-5, False, 5)
    assert ref("bad_teacher", "mufac", 5)["use_train_aug"] is True


def test_untuned_pairs():
    untuned = [("meta_unlearn", "mufac", 7), ("meta_unlearn", "mufac", 1),
               ("scrub", "celeba", 20), ("scrub", "celeba", 50), ("ssd", "mufac", 7),
               ("pgu", "mufac", 20), ("pgu", "celeba", 30), ("bad_teacher", "celeba", 20)]
    for args in untuned:
        h = hparams.reference(*args)
        assert not h.tuned, args
        assert h.note.startswith(f"no tuned {args[0]} values for {args[1]} N={args[2]}")
    v = ref("scrub", "celeba", 20)  # SPEC Q24: pure fine-tuning on the retain set
    assert (v["lr"], v["forgetting_epochs"], v["use_train_aug"]) == (0.1, 0, True)
    assert isinstance(v["forgetting_epochs"], int)
    v = ref("meta_unlearn", "mufac", 7)
    assert (v["epochs"], v["lr"], v["meta_lr"], v["num_identities_simulation"]) == (
        8, 0.1, 0.1, 7)
    assert "epochs 8, lr 0.1, meta_lr 0.1" in hparams.reference("meta_unlearn", "mufac", 7).note
    v = ref("meta_unlearn", "mufac", 1)
    assert (v["epochs"], v["lr"], v["meta_lr"], v["num_identities_simulation"]) == (
        8, 1e-3, 0.1, 10)
    assert (ref("ssd", "mufac", 7)["ssd_dampening_constant"],
            ref("ssd", "mufac", 7)["ssd_selection_weighting"]) == (0.1, 0.1)
    assert (ref("pgu", "mufac", 20)["lr"], ref("pgu", "mufac", 20)["pgu_gamma"]) == (0.1, 0.8)
    assert ref("bad_teacher", "celeba", 20)["lr"] == 0.1
    tuned = [("pretrain", "mufac", 7), ("lipschitz", "mufac", 7), ("ssd", "celeba", 7),
             ("meta_unlearn", "celeba", 7), ("scrub", "celebahq", 50)]
    for args in tuned:
        h = hparams.reference(*args)
        assert h.tuned and h.note.startswith("const.py: "), args
    assert hparams.reference("meta_unlearn", "mufac", 5).note == (
        "const.py: meta_unlearn, mufac, N=5")


def test_warning_only_for_untuned(caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        hparams.warn_if_untuned(hparams.reference("meta_unlearn", "mufac", 10))
        assert not caplog.records
        hparams.warn_if_untuned(hparams.reference("meta_unlearn", "mufac", 7))
    assert len(caplog.records) == 1 and "mufac N=7" in caplog.records[0].getMessage()


def test_errors():
    with pytest.raises(ConfigError, match="method 'fancy'"):
        hparams.reference("fancy", "mufac", 5)
    with pytest.raises(ConfigError, match="dataset 'synthfaces'"):
        hparams.reference("meta_unlearn", "synthfaces", 5)
    with pytest.raises(ConfigError, match="N"):
        hparams.reference("meta_unlearn", "mufac", 0)


def test_meta_unlearn_module_reads_the_same_table(caplog):
    for dataset, n in (("mufac", 5), ("mufac", 10), ("celeba", 1), ("celebahq", 20)):
        got = mu.reference_hyperparameters(dataset, n)
        h = hparams.reference("meta_unlearn", dataset, n)
        assert got == {**{k: h.values[k] for k in ("batch_size", "num_identities_simulation",
                                                   "epochs", "lr", "meta_lr")}, "tuned": True}
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert not mu.reference_hyperparameters("mufac", 20)["tuned"]
    assert len(caplog.records) == 1


# ---------------------------------------------------------------------------------------------
# config files


def test_parse_arg():
    allowed = {"N": 10, "size": "default", "flag": False, "x": 0.5}
    assert config_lib.parse_arg(None, allowed) == allowed
    assert config_lib.parse_arg(" N=5 , flag=true,x=2", allowed) == {
        "N": 5, "size": "default", "flag": True, "x": 2.0}
    for arg, key in (("N=five", "N"), ("bogus=1", "bogus"), ("N", "N"), ("flag=maybe", "flag")):
        with pytest.raises(ValueError, match=key):
            config_lib.parse_arg(arg, allowed)
    with pytest.raises(ValueError, match="size"):
        config_lib.parse_arg("size=huge", allowed, choices={"size": ("default", "small")})
    local = {"N": 10, "size": "medium", "runlocal": False}
    shrink = {"N": 5, "size": "small"}
    assert config_lib.parse_arg("runlocal=True", local, runlocal_defaults=shrink) == {
        "N": 5, "size": "small", "runlocal": True}
    assert config_lib.parse_arg("N=7,runlocal=1", local, runlocal_defaults=shrink) == {
        "N": 7, "size": "small", "runlocal": True}  # a given key keeps its value
    assert config_lib.parse_arg("N=7", local, runlocal_defaults=shrink) == {
        "N": 7, "size": "medium", "runlocal": False}


def real_config_names():
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs",
                                                                               "*.py")))
    assert {"celeba", "celebahq", "mufac", "synthfaces"} <= set(names)
    return [n for n in names if n != "synthfaces"]


def test_every_config_loads_for_every_method_and_paper_n():
    synth = load_config_file("synthfaces").get_config()
    assert synth.data.dedup == "none"
    assert synth.stages == config_lib.TRAINING + config_lib.ALL  # the default study: 10 rows
    study.validate_config(synth)
    # SCRUB and Bad Teacher: the reference's CelebA values for N (epochs included), float32.
    for name in ("scrub", "bad_teacher"):
        block, _ = api.reference_block(registry.METHODS[name], name, "celeba", 10)
        changed = {k for k in block if block[k] != synth[name][k]}
        assert changed == {"compute_dtype"} and synth[name].compute_dtype == "float32"
    assert (synth.scrub.epochs, synth.scrub.lr, synth.scrub.forgetting_epochs) == (10, 5e-3, 5)
    assert (synth.bad_teacher.epochs, synth.bad_teacher.lr) == (5, 1e-4)
    # every attack on every row, on the medium SynthFaces (the size that fits 10 CPU minutes)
    assert synth.mia.loss_rf and synth.mia.rmia and synth.mia.passes == 8
    assert (synth.mia.subsample, synth.data.synthfaces_config) == ("none", "medium")
    assert load_config_file("synthfaces").get_config("size=large").data.synthfaces_config == \
        "large"
    for name in real_config_names():
        module = load_config_file(name)
        default = module.get_config()
        assert default.dataset == name and default.num_identities == DEFAULT_N[name]
        # Q6: the reference subsamples z and val in every RMIA pass on CelebA only
        assert (default.mia.subsample, default.mia.subsample_z, default.mia.subsample_val) == (
            "per_pass" if name == "celeba" else "none", 30_000, 7_000)
        for method in config_lib.METHODS:
            for n in PAPER_N[name]:
                config = module.get_config(f"method={method},N={n}")
                assert config.num_identities == n
                stages = config_lib.TRAINING + (
                    () if method in ("pretrain", "retrain") else (method,))
                assert config.stages == stages
                assert len(config.hparams_note) == len(stages)
                for b in config_lib.ONE_SHOT_BASELINES + config_lib.FULL_DATA_BASELINES:
                    method_module = registry.METHODS[b]  # always there, the reference's values
                    block, _ = api.reference_block(method_module, b, name, n)
                    assert dict(config[b]) == dict(block)
                if method not in ("pretrain", "retrain"):
                    study.validate_config(config)  # every configured method is implemented
                assert set(synth) <= set(config)
                for block in STUDY_BLOCKS:
                    assert set(synth[block]) <= set(config[block]), (name, block)
                assert config.support_ascent.num_identities_simulation == n
                m = ref("meta_unlearn", name, n)
                assert (config.meta_unlearn.epochs, config.meta_unlearn.lr,
                        config.meta_unlearn.meta_lr) == (m["epochs"], m["lr"], m["meta_lr"])
        one_shot = module.get_config("method=one_shot")
        assert one_shot.stages == config_lib.TRAINING + config_lib.ONE_SHOT
        assert len(one_shot.hparams_note) == len(one_shot.stages)
        assert set(config_lib.ONE_SHOT) <= set(one_shot)
        assert not set(config_lib.FULL_DATA_BASELINES) & set(one_shot.stages)  # not servable
        assert all(registry.METHODS[m].ACCESS in api.SERVABLE for m in config_lib.ONE_SHOT)
        every = module.get_config("method=all")  # the paper's table: all nine rows
        assert every.stages == config_lib.TRAINING + config_lib.ONE_SHOT + (
            "scrub", "bad_teacher")
        assert len(every.hparams_note) == len(every.stages)
        study.validate_config(every)


def test_real_config_values():
    config = load_config_file("celebahq").get_config("method=scrub,N=20")
    assert (config.workdir, config.data.data_dir, config.data.image_size) == (
        "workdir/celebahq", "datasets/", 224)
    assert tuple(config.data.crop_scale) == (0.08, 1.0) and config.data.dedup == "none"
    assert config.model.name == "vit_base_patch16_224"
    assert config.model.init.endswith("vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors")
    t = config.train
    assert (t.optimizer, t.epochs, t.batch_size, t.lr, t.weight_decay, t.momentum,
            t.warmup_epochs, t.compute_dtype) == ("sgd", 30, 32, 1e-3, 1e-3, 0.9, 2, "bfloat16")
    assert config.meta_unlearn.compute_dtype == "bfloat16"
    assert t.ap_scores == "reference"  # bf16-rounded sigmoid scores, as the reference (Q4)
    # The reference evaluates at batch 32 (its split losses are means of batch means).
    for name, arg in (("celeba", ""), ("celebahq", ""), ("mufac", ""), ("mufac", "profile=cpu")):
        assert load_config_file(name).get_config(arg).data.eval_batch_size == 32, (name, arg)
    assert (config.scrub.lr, config.scrub.forgetting_epochs, config.scrub.alpha,
            config.scrub.temperature, config.scrub.batch_size_retain) == (1e-2, 5, 0.001, 4.0, 32)
    assert (config.scrub.gamma, config.scrub.epochs, config.scrub.momentum,
            config.scrub.weight_decay, config.scrub.use_train_aug, config.scrub.kl) == (
        0.99, 10, 0.9, 5e-4, True, "softmax")
    # SPEC Q24: celeba N=20 has no SCRUB branch: lr 0.1, augmentation on, no max-step at all.
    fallback = load_config_file("celeba").get_config("method=scrub,N=20").scrub
    assert (fallback.lr, fallback.use_train_aug, fallback.forgetting_epochs) == (0.1, True, 0)
    big = load_config_file("celebahq").get_config("method=bad_teacher,N=500").bad_teacher
    assert (big.batch_size, big.lr, big.epochs, big.use_train_aug, big.weight_decay) == (
        256, 1e-5, 5, False, 5e-4)
    mufac = load_config_file("mufac")
    assert mufac.get_config().train.weight_decay == 1e-4
    assert (mufac.get_config("method=ssd,N=10").ssd.selection_weighting,
            mufac.get_config("method=pgu,N=10").pgu.gamma,
            mufac.get_config("method=lipschitz,N=5").lipschitz.weighting,
            mufac.get_config("method=bad_teacher,N=5").bad_teacher.lr) == (1.0, 0.75, 30.0, 1e-3)


def test_untuned_config_warns(caplog):
    mufac = load_config_file("mufac")
    with caplog.at_level(logging.WARNING, logger="absl"):
        config = mufac.get_config("N=7")
    assert [r.getMessage().startswith("meta_unlearn: no tuned") for r in caplog.records] == [True]
    assert config.hparams_note[-1].startswith("no tuned meta_unlearn values for mufac N=7")


@pytest.mark.parametrize("name,arg,key", [
    ("mufac", "method=fancy", "method"), ("mufac", "N=ten", "N"), ("mufac", "profile=gpu",
                                                                   "profile"),
    ("mufac", "bogus=1", "bogus"), ("celeba", "N=0", "N"), ("celebahq", "profile=cpu", "profile"),
    ("celeba", "N", "N"), ("synthfaces", "size=huge", "size"), ("synthfaces", "method=scrub",
                                                                "method"),
    ("synthfaces", "runlocal=maybe", "runlocal"), ("celebahq", "runlocal=2", "runlocal"),
])
def test_bad_config_args(name, arg, key):
    with pytest.raises(ValueError, match=key):
        load_config_file(name).get_config(arg)


def test_cpu_profile_changes_only_what_it_says():
    mufac = load_config_file("mufac")
    paper = flat(mufac.get_config("N=5,method=all"))
    cpu_config = mufac.get_config("N=5,profile=cpu")  # every row of the table by default
    assert cpu_config.stages == config_lib.TRAINING + config_lib.ALL
    assert mufac.get_config("N=5,profile=cpu,method=ssd").stages == (*config_lib.TRAINING, "ssd")
    assert mufac.get_config("N=5").stages == (*config_lib.TRAINING, "meta_unlearn")
    cpu = flat(cpu_config)
    assert set(paper) == set(cpu)
    changed = {k for k in paper if paper[k] != cpu[k]}
    # the profile, the same for the reference variant, and MetaUnlearn's selected values
    best, reference = config_lib.CPU_SELECTED_META_UNLEARN.get(("mufac", 5), ({}, {}))
    allowed = set(config_lib.CPU_PROFILE) | {
        k.replace("meta_unlearn.", "meta_unlearn_reference.") for k in config_lib.CPU_PROFILE}
    allowed |= {f"meta_unlearn.{k}" for k in best}
    allowed |= {f"meta_unlearn_reference.{k}" for k in reference}
    assert changed <= allowed
    assert cpu["meta_unlearn_reference.method"] == "meta_unlearn"
    for key, value in best.items():
        assert cpu[f"meta_unlearn.{key}"] == value
    assert {"model.name", "model.init", "train.optimizer", "workdir"} <= changed
    for key, value in config_lib.CPU_PROFILE.items():
        expected = value.format(dataset="mufac") if isinstance(value, str) else value
        assert cpu[key] == expected, key
    assert cpu["workdir"] == "workdir/mufac_cpu" and cpu["model.init"] == ""
    # MetaUnlearn keeps the reference's (mufac, N=5) values; only the dtype changes.
    assert (cpu["meta_unlearn.epochs"], cpu["meta_unlearn.num_identities_simulation"]) == (10, 5)
    assert (cpu["meta_unlearn.lr"], cpu["meta_unlearn.meta_lr"]) == (1e-2, 1e-3)
    assert all(cpu[f"{m}.compute_dtype"] == "float32" for m in config_lib.ONE_SHOT)
    study.validate_config(cpu_config)
    study.validate_config(mufac.get_config("N=10"))  # the paper setting validates too


def test_every_method_of_the_reference_is_implemented():
    """Every method of the reference's table but pretrain / retrain is on the method API, so a
    study never meets a configured-but-unimplemented baseline."""
    assert set(hparams.METHODS) - {"pretrain", "retrain"} <= set(registry.METHODS)
    assert {registry.METHODS[m].ACCESS for m in config_lib.FULL_DATA_BASELINES} == {api.FULL}
    config = load_config_file("celebahq").get_config("method=scrub,N=20")
    config.stages = ("pretrain", "retrain", "scrub", "bad_teacher")
    study.validate_config(config)
    config.scrub.kl = "bernoulli"
    study.validate_config(config)  # CelebA-HQ is multi-label
    config.bad_teacher.kl = "bernouli"
    with pytest.raises(ConfigError, match=r"config.bad_teacher.kl must be one of"):
        study.validate_config(config)
    mufac = load_config_file("mufac").get_config("method=scrub,N=5")
    mufac.scrub.kl = "bernoulli"
    with pytest.raises(ConfigError, match=r"config.scrub.kl='bernoulli' is the per-label KL"):
        study.validate_config(mufac)


# ---------------------------------------------------------------------------------------------
# One base config; the real-data files show their values; runlocal in every file


def test_every_config_is_the_base_config_with_its_changes():
    """Every config has every key of ``config_lib.base_config`` (the blocks every study has);
    a real-data file is exactly ``real_data_config`` (so its train values, spelled in the file,
    are the reference's ``const.py`` values, hparams.py), for every method and N."""
    base = flat(config_lib.base_config("x", 1))
    for name in ("synthfaces", *real_config_names()):
        config = flat(load_config_file(name).get_config())
        assert set(base) <= set(config), (name, set(base) - set(config))
        assert set(config) - set(base) <= ({"hparams_note"} if name != "synthfaces" else set())
    for name in real_config_names():
        module = load_config_file(name)
        for method in config_lib.METHOD_CHOICES:
            for n in (*PAPER_N[name], 1, 7, 200):
                got = module.get_config(f"method={method},N={n}").to_dict()
                assert got == config_lib.real_data_config(name, method, n).to_dict(), (
                    name, method, n)
        h = hparams.reference("pretrain", name, DEFAULT_N[name])
        train = module.get_config().train
        assert {k: train[k] for k in config_lib.TRAIN_SETTINGS} == {
            k: h.values[k] for k in config_lib.TRAIN_SETTINGS}
        assert type(train.lr) is float and type(train.epochs) is int


def test_hparams_table_is_current():
    """configs/HPARAMS.md is ``config_lib.hparams_table()`` (from hparams.py): regenerate it with
    ``python tools/hparams_table.py`` after a change to the reference's table."""
    with open(os.path.join(REPO, "configs", "HPARAMS.md"), encoding="utf-8") as f:
        assert f.read() == config_lib.hparams_table(), "run: python tools/hparams_table.py"
    table = config_lib.hparams_table()
    assert "| mufac | 5 | 10 | 0.01 | 1e-3 | 5 |" in table  # meta_unlearn: epochs, lr, meta_lr
    assert "| celebahq | 50 | 0.5 | 10.0 |" in table  # ssd: dampening, selection weighting


def _typed(block) -> dict:
    return {k: (type(v).__name__, v) for k, v in block.items()}


def test_default_study_values_that_fingerprints_depend_on():
    """The default study (configs/synthfaces.py) as its checkpoints were fingerprinted
    (study/reuse.py: dataset, seed, split, model, the stage's settings, the augmentation): a
    change here makes every stored SynthFaces stage train again."""
    config = load_config_file("synthfaces").get_config()
    assert (config.dataset, config.num_identities, config.seed, config.split_seed) == (
        "synthfaces", 10, 0, None)
    assert (config.data.synthfaces_config, config.data.image_size, config.data.crop_scale,
            config.data.dedup) == ("medium", 32, (0.35, 1.0), "none")
    assert config.model.to_dict() == {"name": "vit_small_demo", "init": "",
                                      "init_scheme": "lecun"}
    assert _typed(config.train) == _typed(dict(
        optimizer="adamw", epochs=20, batch_size=64, lr=1e-3, weight_decay=1e-4, momentum=0.9,
        warmup_epochs=2, compute_dtype="float32", ap_scores="reference", attention="xla",
        remat=False))
    steps = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    meta = dict(batch_size=64, compute_dtype="float32", dropout=0.5, epochs=3, forget_epochs=1,
                forget_loss="smooth_l1", hidden_size=512, loss_type="full", lr=1e-3,
                meta_lr=1e-3, num_identities_simulation=10, num_layers=0, relative_step=1e-3,
                remat=False, requests_per_update=1, simulated_draws_per_epoch=2,
                step_control="normalize", step_scales=steps, task_ascent=100.0, use_accs=True,
                use_feats=True, use_ids=True, use_retain=False, use_targets=True,
                use_train_aug=True, validation_requests=4, weight_decay=0.0)
    expected = {
        "meta_unlearn": meta,
        "meta_unlearn_reference": {**meta, "method": "meta_unlearn", "step_control": "none",
                                   "task_ascent": 0.0},
        "support_ascent": dict(alphas=(0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
                               batch_size=64, compute_dtype="float32", forget_loss="smooth_l1",
                               loss_type="full", num_identities_simulation=10, num_requests=16,
                               simulated_draws=2, use_accs=True),
        "ssd": dict(batch_size=128, compute_dtype="float32", dampening_constant=0.1,
                    selection_weighting=0.1),
        "lipschitz": dict(batch_size=128, compute_dtype="float32", lr=0.01, n_samples=25,
                          weighting=30.0, zero_grad_between_batches=False),
        "pgu": dict(batch_size=128, compute_dtype="float32", epochs=5, gamma=0.8, lr=0.1,
                    patch_covariance="stride1", reverse_bce="index"),
        "scrub": dict(alpha=1e-3, batch_size=32, batch_size_retain=32, compute_dtype="float32",
                      epochs=10, forgetting_epochs=5, gamma=0.99, kl="softmax", lr=5e-3,
                      momentum=0.9, temperature=4.0, use_train_aug=False, weight_decay=5e-4),
        "bad_teacher": dict(batch_size=32, compute_dtype="float32", epochs=5, kl="softmax",
                            lr=1e-4, momentum=0.9, use_train_aug=False, weight_decay=5e-4),
    }
    for block, values in expected.items():
        assert _typed(config[block]) == _typed(values), block


def test_runlocal_in_every_config_is_small_and_valid():
    """``runlocal=True`` in every config file: the same study (dataset, split seed) with only
    the settings of ``config_lib.RUNLOCAL`` (and the file's or the real data's own) changed,
    one epoch, no attack; it validates."""
    synth = load_config_file("synthfaces")
    local = synth.get_config("runlocal=True")
    assert local.to_dict() == synth.get_config("N=5,size=small,runlocal=True").to_dict()
    assert synth.get_config("N=7,runlocal=True").num_identities == 7
    assert local.stages == ("pretrain", "retrain", "meta_unlearn", "support_ascent")
    # what tests/small_study.py starts from
    assert (local.data.synthfaces_config, local.num_identities, local.train.epochs) == (
        "small", 5, 1)
    assert (local.meta_unlearn.epochs, local.meta_unlearn.num_identities_simulation,
            local.meta_unlearn.batch_size) == (1, 30, 256)
    assert (local.support_ascent.batch_size, local.support_ascent.num_requests) == (256, 4)
    assert (local.mia.loss_rf, local.mia.rmia, local.progress, local.data.num_threads) == (
        False, False, False, 0)
    study.validate_config(local)
    full, small = flat(synth.get_config("N=5,size=small")), flat(local)
    changed = {k for k in full if full[k] != small[k]}
    assert set(full) == set(small) and changed == set(config_lib.RUNLOCAL) | set(synth.RUNLOCAL)
    for name in real_config_names():
        module = load_config_file(name)
        args = ("", "method=all", "method=ssd,N=5") + (("profile=cpu",) if name == "mufac" else ())
        for arg in args:
            paper = flat(module.get_config(arg))
            config = module.get_config(f"{arg},runlocal=True")
            tiny = flat(config)
            assert set(paper) == set(tiny)
            changed = {k for k in paper if paper[k] != tiny[k]}
            assert changed <= set(config_lib.RUNLOCAL) | set(config_lib.RUNLOCAL_REAL_DATA)
            assert (config.dataset, config.num_identities, config.stages) == (
                paper["dataset"], paper["num_identities"], paper["stages"])
            assert (config.model.name, config.train.epochs, config.mia.loss_rf) == (
                "vit_tiny_test", 1, False)
            study.validate_config(config)
