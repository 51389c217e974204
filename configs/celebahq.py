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
for every row of the paper's table) and
``N`` (forget identities, default 20). Values of the reference's ``const.py`` for
(method, celebahq, N); where the reference has none it falls back to generic defaults and a
warning is logged.
"""

from oneshui_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, {"method": "meta_unlearn", "N": 20},
                                choices={"method": config_lib.METHOD_CHOICES})
    return config_lib.real_data_config("celebahq", args["method"], args["N"])
