r"""MUFAC: the paper's 1-SHUI study on MUFAC (Korean faces, 8 age classes; SPEC.md 1.3).

MUFAC (Machine Unlearning for Facial Age Classifier) holds 13,068 face images (128x128 JPEG) of
1,216 people, labelled with one of 8 age groups: a classification task (metric: accuracy). Its
files must be under ``<data_dir>`` in the original layout::

    <data_dir>/mufac/{custom_train_dataset.csv, custom_val_dataset.csv, custom_test_dataset.csv,
                      train_images/, val_images/, test_images/}

The paper's grid on MUFAC is N in {5, 10} forget identities. Each command pretrains, retrains
without the forget identities (the oracle) and runs the method (run from the repository root)::

    python -m oneshui_jax.main --config=configs/mufac.py:method=meta_unlearn,N=5 \
        --config.data.data_dir=/path/to/data
    python -m oneshui_jax.main --config=configs/mufac.py:method=meta_unlearn,N=10 \
        --config.data.data_dir=/path/to/data

``profile=cpu`` is the same study shrunk to run on CPU (a small ViT from scratch on 32 px images;
``oneshui_jax.config_lib.CPU_PROFILE``); by default it runs every row of the paper's table
(``method=all``: meta_unlearn, support_ascent, ssd, lipschitz, pgu, scrub, bad_teacher) after one
pretrain and retrain, e.g. on the copy of MUFAC in ``../shared/data``::

    python -m oneshui_jax.main --config=configs/mufac.py:N=5,profile=cpu \
        --config.data.data_dir=../shared/data --config.seed=1

``get_config(arg)`` takes ``key=value`` pairs separated by commas: ``method`` (one of
``config_lib.METHODS``, ``one_shot`` (the servable methods) or ``all``; default
``meta_unlearn``, and ``all`` with ``profile=cpu``), ``N`` (forget identities, default 10),
``profile`` (``paper``, the default, or ``cpu``) and ``runlocal`` (``True``: the study shrunk to
seconds for a smoke test, a tiny ViT from scratch on 32 px images for one epoch, no attack;
``config_lib.RUNLOCAL``, ``RUNLOCAL_REAL_DATA``; after the profile).

The config is ``config_lib.base_config`` (the paper's setting) with the training values below
and every method block at the reference's ``const.py`` values for (method, mufac, N), listed in
``configs/HPARAMS.md``; the reference has none for other N and falls back to generic defaults (a
warning is logged).
"""

import ml_collections

from oneshui_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg, {"method": "default", "N": 10, "profile": "paper", "runlocal": False},
        choices={"method": ("default", *config_lib.METHOD_CHOICES),
                 "profile": ("paper", "cpu")})
    method = args["method"]
    if method == "default":
        method = "all" if args["profile"] == "cpu" else "meta_unlearn"
    config = config_lib.base_config("mufac", args["N"])
    config.stages = config_lib.study_stages(method)
    # Pretrain / retrain (SPEC.md 4.2; const.py, ViT on MUFAC): timm's ImageNet ViT-B/16
    # fine-tuned with SGD (momentum 0.9), 2 warmup epochs then per-epoch cosine, bf16 autocast.
    config.train.update(epochs=30, batch_size=32, lr=1e-3, weight_decay=1e-4)
    config_lib.reference_methods(config)  # configs/HPARAMS.md
    if args["profile"] == "cpu":
        config_lib.cpu_profile(config)
    if args["runlocal"]:
        config_lib.runlocal(config, config_lib.RUNLOCAL_REAL_DATA)
    return config
