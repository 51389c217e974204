r"""CelebA: the paper's 1-SHUI study on CelebA (SPEC.md 1.1).

CelebA holds 202,599 face images of 10,177 identities with 40 binary attributes: a multi-label
task (metric: mAP). Its files must be under ``<data_dir>`` in the original layout::

    <data_dir>/celeba/{img_align_celeba/, identity_CelebA.txt, list_attr_celeba.txt,
                       list_eval_partition.txt}

The paper's grid on CelebA is N in {5, 10} forget identities. Each command pretrains, retrains
without the forget identities (the oracle) and runs the method (run from the repository root)::

    python -m oneshui_jax.main --config=configs/celeba.py:method=meta_unlearn,N=5 \
        --config.data.data_dir=/path/to/data
    python -m oneshui_jax.main --config=configs/celeba.py:method=meta_unlearn,N=10 \
        --config.data.data_dir=/path/to/data

Bring timm's ImageNet ViT-B/16 weights to ``config.model.init`` (README "Pretrained weights").

``get_config(arg)`` takes ``key=value`` pairs separated by commas: ``method`` (default
``meta_unlearn``; one of ``config_lib.METHODS``, ``one_shot`` for every one-shot method or ``all``
for every row of the paper's table) and
``N`` (forget identities, default 10). Values of the reference's ``const.py`` for
(method, celeba, N); where the reference has none (e.g. SCRUB or Bad Teacher at N=20) it
falls back to generic defaults and a warning is logged.
"""

from oneshui_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, {"method": "meta_unlearn", "N": 10},
                                choices={"method": config_lib.METHOD_CHOICES})
    return config_lib.real_data_config("celeba", args["method"], args["N"])
