"""The ``lightning-hessian`` console script.

``lightning-hessian fit --config configs/digits.yaml`` is a LightningCLI; ``sb-lb`` and
``reproduce`` run the paper's experiments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

# Subcommands that are not LightningCLI's: name -> "module:function" taking argv (list of str).
_EXPERIMENTS: dict[str, str] = {
    # "sb-lb": "lightning_hessian.sblb:main",
    # "reproduce": "lightning_hessian.experiments:main",
}


def _load(target: str) -> Callable[[Sequence[str]], int | None]:
    import importlib

    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: dispatch to an experiment or to LightningCLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _EXPERIMENTS:
        return _load(_EXPERIMENTS[args[0]])(args[1:]) or 0
    raise SystemExit("lightning-hessian: the LightningCLI `fit` subcommand is not wired yet")


if __name__ == "__main__":
    sys.exit(main())
