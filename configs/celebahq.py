r"""CelebA-HQ: the paper's 1-SHUI study on CelebA-HQ (CelebAMask-HQ; SPEC.md 1.2).

CelebA-HQ holds 30,000 high-resolution face images of 6,217 identities with CelebA's 40 binary
attributes: a multi-label task (metric: mAP). Its files must be under ``<data_dir>`` in the
original layout::

    <data_dir>/CelebAMask-HQ/{CelebA-HQ-img/, CelebA-HQ-identity.txt,
                              CelebAMask-HQ-attribute-anno.txt}

The paper's grid on CelebA-HQ is N in {20, 50} forget identities. Each command pretrains,
retrains without the forget identities (the oracle) and runs the method (run from the repository
root)::

    python -m oneshui_jax.main --config=configs/celebahq.py:method=meta_unlearn,N=20 \
        --config.data.data_dir=/path/to/data
    python -m oneshui_jax.main --config=configs/celebahq.py:method=meta_unlearn,N=50 \
        --config.data.data_dir=/path/to/data

Bring timm's ImageNet ViT-B/16 weights to ``config.model.init`` (README "Pretrained weights").

``get_config(arg)`` takes ``key=value`` pairs separated by commas: ``method`` (default
``meta_unlearn``; one of ``config_lib.METHODS``, ``one_shot`` for every one-shot method or ``all``
for every row of the paper's table), ``N`` (forget identities, default 20) and ``runlocal``
(``True``: the same study shrunk to seconds for a smoke test, a tiny ViT from scratch on 32 px
images for one epoch, no attack; ``config_lib.RUNLOCAL``, ``RUNLOCAL_REAL_DATA``).

The config is ``config_lib.base_config`` (the paper's setting) with the training values below
and every method block at the reference's ``const.py`` values for (method, celebahq, N), listed
in ``configs/HPARAMS.md``; where the reference has none it falls back to generic defaults and a
warning is logged.
"""

import ml_collections

from oneshui_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, {"method": "meta_unlearn", "N": 20, "runlocal": False},
                                choices={"method": config_lib.METHOD_CHOICES})
    config = config_lib.base_config("celebahq", args["N"])
    config.stages = config_lib.study_stages(args["method"])
    # Pretrain / retrain (SPEC.md 4.2; const.py, ViT on CelebA-HQ): timm's ImageNet ViT-B/16
    # fine-tuned with SGD (momentum 0.9), 2 warmup epochs then per-epoch cosine, bf16 autocast;
    # a weight decay of 1e-3 (1e-4 on CelebA and MUFAC).
    config.train.update(epochs=30, batch_size=32, lr=1e-3, weight_decay=1e-3)
    config_lib.reference_methods(config)  # configs/HPARAMS.md
    if args["runlocal"]:
        config_lib.runlocal(config, config_lib.RUNLOCAL_REAL_DATA)
    return config
