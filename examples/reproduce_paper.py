"""Reproduce Sagun et al. 2017 ("Empirical Analysis of the Hessian of Over-Parametrized Neural Networks").

The same run as ``lightning-hessian reproduce``, through the Python API: five sections, each stating
the paper's claim, our measurement and whether it holds, written to ``reports/REPORT.md`` with PNG
figures and every number in ``reports/results.json``.

    python examples/reproduce_paper.py            # the full run, about 2 minutes on 2 CPU cores
    python examples/reproduce_paper.py --quick    # one seed, fewer classes, no dense matrices (~20 s)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_hessian.paper.experiments import ReproduceConfig, reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short run the tests use")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default reports)")
    args = parser.parse_args()

    config = ReproduceConfig.quick() if args.quick else ReproduceConfig.full()
    results = reproduce(args.out, config)
    for key, section in results.items():
        if isinstance(section, dict) and "checks" in section:
            verdict = "holds" if all(c["passed"] for c in section["checks"].values()) else "does not fully hold"
            print(f"{key}: {verdict}")
    print(f"report: {args.out / 'REPORT.md'} ({results['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
