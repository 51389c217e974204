r"""The default SynthFaces study with the tutorial's method, head_ascent, as one more stage.

Run it from the repository root (so that ``configs`` and ``docs.examples`` can be imported)::

    python -m oneshui_jax.main --config=docs/examples/head_ascent_config.py:runlocal=True

``get_config`` takes the arguments of ``configs/synthfaces.py`` (``N``, ``size``, ``runlocal``).
"""

from configs import synthfaces
from docs.examples import head_ascent
from oneshui_jax.unlearn import api


def get_config(arg: str = ""):
    config = synthfaces.get_config(arg)
    # Every setting of head_ascent.Config with its default; the command line can override them
    # (--config.head_ascent.lr=0.1), and the study checks them against Config.RANGES.
    config.head_ascent = api.default_block(head_ascent)
    # A method outside the package is named by its module's path: the study imports it, and
    # the run records the path, so that serving finds it again.
    config.head_ascent.method = "docs.examples.head_ascent"
    config.stages = (*config.stages, "head_ascent")
    return config
