"""The ``lightning-hessian`` console script.

``lightning-hessian fit --config configs/digits.yaml`` is a LightningCLI (``fit``, ``validate``,
``test``, ``predict``; ``--print_config`` prints the full configuration); ``sb-lb`` and
``reproduce`` run the paper's experiments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytorch_lightning.cli import LightningCLI

# Subcommands that are not LightningCLI's: name -> "module:function" taking argv (list of str).
_EXPERIMENTS: dict[str, str] = {
    "sb-lb": "lightning_hessian.paper.sblb:main",
    "reproduce": "lightning_hessian.paper.experiments:main",
}


def _load(target: str) -> Callable[[Sequence[str]], int | None]:
    import importlib

    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def lightning_cli(args: Sequence[str] | None = None) -> LightningCLI:
    """Run LightningCLI (``fit``, ``validate``, ``test``, ``predict``) on ``args``.

    Any LightningModule and LightningDataModule can be named by import path (subclass mode), e.g.
    ``--model lightning_hessian.paper.models.MLPClassifier --data lightning_hessian.paper.data.DigitsDataModule``,
    or through a config file such as ``configs/digits.yaml``; the trainer's callbacks (for instance
    ``lightning_hessian.HessianSpectrumCallback``) come from ``trainer.callbacks``.

    Args:
        args: the command line after the program name, e.g. ``["fit", "--config", "configs/digits.yaml"]``;
            ``None`` reads ``sys.argv``.

    Returns:
        The LightningCLI object (its ``trainer``, ``model`` and ``datamodule`` after the run).

    Example:
        >>> import contextlib, io, yaml
        >>> printed = io.StringIO()
        >>> with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):  # --print_config exits
        ...     lightning_cli(["fit", "--model", "lightning_hessian.paper.models.MLPClassifier",
        ...                    "--model.hidden_sizes=[8]", "--data", "lightning_hessian.paper.data.DigitsDataModule",
        ...                    "--print_config"])
        >>> config = yaml.safe_load(printed.getvalue())
        >>> config["model"]["class_path"], config["model"]["init_args"]["hidden_sizes"]
        ('lightning_hessian.paper.models.MLPClassifier', [8])
    """
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: dispatch to an experiment, or to LightningCLI for everything else.

    Args:
        argv: the command line after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code: the experiment's, or 0 after a LightningCLI run.

    Example:
        >>> import contextlib, io
        >>> printed = io.StringIO()
        >>> with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):  # --help exits
        ...     main(["--help"])
        >>> print(printed.getvalue().splitlines()[0])
        experiments: lightning-hessian sb-lb [--help], lightning-hessian reproduce [--help]
        >>> with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        ...     main(["reproduce", "--help"])  # an experiment: its own command line
        >>> "--quick" in printed.getvalue()
        True
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _EXPERIMENTS:
        return _load(_EXPERIMENTS[args[0]])(args[1:]) or 0
    if not args or args[0] in ("-h", "--help"):
        print("experiments: " + ", ".join(f"lightning-hessian {name} [--help]" for name in _EXPERIMENTS))
    lightning_cli(None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
