r"""``python -m oneshui_jax.cli.estimate``: how long a study of the paper's grid takes on one
GPU, estimated from the benchmarks before it runs (``oneshui_jax/study/estimate.py``: a lower
bound; what it counts and what it leaves out are said there).

    python -m oneshui_jax.cli.estimate --config=configs/celebahq.py:method=all,N=20 \
        --config.mia.rmia=True [--rates=bench/results/h200_2026-12-04_fidelity]

Takes the study's ``--config=FILE[:ARG]`` and ``--config.FIELD=VALUE`` arguments and
``--rates=DIR``, a GPU check's results folder (default :data:`DEFAULT_RATES`, read from the
current folder), and prints a table of minutes per stage; bad input is one ``error:`` line,
exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from oneshui_jax.cli.common import last_line
from oneshui_jax.cli.config_flags import load_config
from oneshui_jax.errors import ConfigError
from oneshui_jax.study import estimate

DEFAULT_RATES = "bench/results/h200_2026-12-04_fidelity"  # the newest full GPU check


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in args):
        print(__doc__.strip())
        return 0
    rates_dir = DEFAULT_RATES
    for a in [a for a in args if a.startswith("--rates=")]:
        rates_dir = a[len("--rates="):]
        args.remove(a)
    try:
        config = load_config(args)
        rates = estimate.Rates.from_results(rates_dir)
        seconds = estimate.estimate(config, rates)
    except (ValueError, ConfigError) as e:
        print(f"error: {last_line(str(e)) or e}", file=sys.stderr)
        return 2
    print(f"{config.dataset}, N={config.num_identities}, attention {config.train.attention}, "
          f"{'with' if config.mia.get('rmia') else 'without'} RMIA; rates of one "
          f"{rates.device} ({rates.source}); a lower bound:")
    print("| stage | minutes |\n|---|---:|")
    for stage, s in seconds.items():
        print(f"| {stage} | {s / 60:.1f} |")
    print(f"estimated: {estimate.hours(seconds['total'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
