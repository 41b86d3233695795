"""The callback's settings, checked once: :class:`CallbackConfig`.

:class:`~lightning_hessian.HessianSpectrumCallback` builds one :class:`CallbackConfig` from its
keyword arguments; the same object gives the hyperparameters it logs (:meth:`CallbackConfig.hparams`)
and the fields that tell two callbacks apart in a checkpoint (:meth:`CallbackConfig.identity`).
The meaning of each field is documented on the callback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lightning_hessian.engine.checks import check_choice, check_count, check_flag, check_fraction

MatrixChoice = Literal["hessian", "ggn", "both"]
Mode = Literal["eval", "train"]

HISTORY_FILE = "{name}_history.json"
"""Default ``history_file``: ``{name}`` is replaced by the callback's ``name``."""

# Fields that are objects, not settings: never logged as hyperparameters.
_OBJECTS = ("dataloader", "loss_fn")


@dataclass(frozen=True)
class CallbackConfig:
    """Every setting of a :class:`~lightning_hessian.HessianSpectrumCallback`, validated on creation.

    Raises:
        ValueError: for a value out of range, naming the argument and what is allowed.
        TypeError: for a value of the wrong kind (a flag that is not a bool, a single string where a
            list of patterns is expected, a loss that is not callable).

    Example:
        >>> config = CallbackConfig(k=3)
        >>> config.hparams()["hessian/k"], config.name
        (3, 'hessian')
    """

    # schedule
    every_n_steps: int | None = 2000
    every_n_epochs: int | None = None
    log_spaced: bool = False
    at_start: bool = True
    at_end: bool = True
    at_evaluate: bool = True
    max_overhead: float | None = None
    # what to measure
    k: int = 5
    smallest: bool = False
    density: bool = True
    matrix: MatrixChoice = "hessian"
    layers: tuple[str, ...] = ()
    layer_views: bool = False
    grad_overlap: bool = False
    # accuracy and cost
    tol: float = 1e-5
    max_matvecs: int | None = None
    num_probes: int = 5
    num_steps: int = 40
    warm_start: bool = True
    # probe set
    num_samples: int | None = 512
    batch_size: int | None = None
    dataloader: Iterable[Any] | None = None
    loss_fn: Callable[[Any, Any], Tensor] | None = None
    mode: Mode = "eval"
    seed: int = 0
    # output
    name: str = "hessian"
    history_file: str | None = HISTORY_FILE

    def __post_init__(self) -> None:
        counts = {"every_n_steps": True, "every_n_epochs": True, "k": False, "num_probes": False,
                  "num_steps": False, "num_samples": True, "batch_size": True}
        for name, allow_none in counts.items():
            self._set(name, check_count(name, getattr(self, name), allow_none=allow_none))
        self._set("max_matvecs", check_count("max_matvecs", self.max_matvecs, minimum=self.k, allow_none=True))
        self._set("seed", check_count("seed", self.seed, minimum=0))
        for name in ("log_spaced", "at_start", "at_end", "at_evaluate", "smallest", "density", "layer_views",
                     "grad_overlap", "warm_start"):
            check_flag(name, getattr(self, name))
        check_choice("matrix", self.matrix, ("hessian", "ggn", "both"))
        check_choice("mode", self.mode, ("eval", "train"))
        self._set("tol", check_fraction("tol", self.tol))
        self._set("max_overhead", check_fraction("max_overhead", self.max_overhead, include_high=True,
                                                 allow_none=True))
        if self.log_spaced and self.every_n_steps is None:
            raise ValueError("log_spaced=True needs every_n_steps (the first interval); set every_n_steps")
        layers = self.layers
        if isinstance(layers, str) or not all(isinstance(p, str) for p in layers or ()):
            raise TypeError(f"layers={layers!r} must be a list of parameter name patterns such as ['net.0.*']")
        self._set("layers", tuple(layers or ()))
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn={self.loss_fn!r} must be callable as loss_fn(pl_module, batch)")
        if self.dataloader is not None and not isinstance(self.dataloader, Iterable):
            raise TypeError(f"dataloader={self.dataloader!r} must be a DataLoader or an iterable of batches")
        if not isinstance(self.name, str) or not self.name or self.name.strip("/") != self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty tag prefix such as 'hessian' (no leading or "
                             "trailing '/')")
        if self.history_file is not None and not isinstance(self.history_file, str):
            raise TypeError(f"history_file={self.history_file!r} must be a file name (str) or None")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def history_path(self) -> str | None:
        """The history file's name with ``{name}`` filled in, or ``None``."""
        return None if self.history_file is None else self.history_file.format(name=self.name)

    def hparams(self, num_samples: int = 0) -> dict[str, Any]:
        """The settings as hyperparameters ``{"<name>/<field>": plain value}``.

        Args:
            num_samples: the probe set's size once drawn (0 before).
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name in _OBJECTS or field.name == "name":
                continue
            value = getattr(self, field.name)
            values[field.name] = ",".join(value) if isinstance(value, tuple) else value
        values["num_samples"] = num_samples
        if not self.density:
            values["num_probes"] = values["num_steps"] = 0
        return {f"{self.name}/{key}": (0 if value is None else value) for key, value in values.items()}

    def identity(self) -> Mapping[str, Any]:
        """The fields that name a series of measurements: two callbacks that differ here may coexist."""
        return {"name": self.name, "matrix": self.matrix, "k": self.k, "mode": self.mode, "layers": self.layers,
                "num_samples": self.num_samples}
