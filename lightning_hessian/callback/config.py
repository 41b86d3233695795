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
BasisDtype = Literal["float32", "float64"]

DEFAULT_BUDGET = 0.05
"""``budget="auto"`` without an explicit schedule: 5% of the run's wall time (see the callback's docs)."""

HISTORY_FILE = "{name}_history.json"
"""Default ``history_file``: ``{name}`` is replaced by the callback's ``name``."""

# Fields that are objects, not settings: never logged as hyperparameters.
_OBJECTS = ("dataloader", "loss_fn", "num_samples_fn")


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
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    log_spaced: bool = False
    at_start: bool = True
    at_end: bool = True
    at_evaluate: bool = True
    budget: float | Literal["auto"] | None = "auto"
    track_every_n_steps: int | None = None
    track_k: int = 1
    track_samples: int | None = None
    track_tol: float = 1e-2
    # what to measure
    k: int = 5
    smallest: bool = False
    density: bool = True
    matrix: MatrixChoice = "hessian"
    layers: tuple[str, ...] = ()
    layer_views: bool = False
    grad_overlap: bool = False
    # accuracy and cost
    tol: float = 1e-3
    max_matvecs: int | None = None
    num_probes: int | None = None
    num_steps: int = 32
    warm_start: bool = True
    # memory
    basis_dtype: BasisDtype | None = None
    basis_device: str | None = None
    max_basis: int | None = None
    keep_graph: bool | Literal["auto"] = "auto"
    reorthogonalize: bool = False
    # probe set
    num_samples: int | None = 512
    batch_size: int | None = None
    dataloader: Iterable[Any] | None = None
    loss_fn: Callable[[Any, Any], Tensor] | None = None
    num_samples_fn: Callable[[Any], int] | None = None
    mode: Mode = "eval"
    seed: int = 0
    # output
    name: str = "hessian"
    history_file: str | None = HISTORY_FILE
    progress: bool = True

    def __post_init__(self) -> None:
        counts = {"every_n_steps": True, "every_n_epochs": True, "track_every_n_steps": True, "track_k": False,
                  "track_samples": True, "k": False, "num_probes": True, "num_steps": False, "num_samples": True,
                  "batch_size": True}
        for name, allow_none in counts.items():
            self._set(name, check_count(name, getattr(self, name), allow_none=allow_none))
        self._set("max_matvecs", check_count("max_matvecs", self.max_matvecs, minimum=self.k, allow_none=True))
        if self.track_k > self.k:
            raise ValueError(f"track_k={self.track_k} exceeds k={self.k}: a tracked call measures at most the top "
                             "k; lower track_k or raise k")
        self._set("seed", check_count("seed", self.seed, minimum=0))
        for name in ("log_spaced", "at_start", "at_end", "at_evaluate", "smallest", "density", "layer_views",
                     "grad_overlap", "warm_start", "reorthogonalize", "progress"):
            check_flag(name, getattr(self, name))
        self._set("max_basis", check_count("max_basis", self.max_basis, minimum=self.k + 2, allow_none=True))
        if self.basis_dtype is not None:
            check_choice("basis_dtype", self.basis_dtype, ("float32", "float64"))
        if self.basis_device is not None and not isinstance(self.basis_device, str):
            raise TypeError(f"basis_device={self.basis_device!r} must be a device name such as 'cpu', or None")
        if not isinstance(self.keep_graph, bool) and self.keep_graph != "auto":
            raise ValueError(f"keep_graph={self.keep_graph!r} must be True, False or 'auto'")
        if self.budget != "auto":
            self._set("budget", check_fraction("budget", self.budget, allow_none=True))
        check_choice("matrix", self.matrix, ("hessian", "ggn", "both"))
        check_choice("mode", self.mode, ("eval", "train"))
        self._set("tol", check_fraction("tol", self.tol))
        self._set("track_tol", check_fraction("track_tol", self.track_tol))
        if self.log_spaced and self.every_n_steps is None:
            raise ValueError("log_spaced=True needs every_n_steps (the first interval); set every_n_steps")
        layers = self.layers
        if isinstance(layers, str) or not all(isinstance(p, str) for p in layers or ()):
            raise TypeError(f"layers={layers!r} must be a list of parameter name patterns such as ['net.0.*']")
        self._set("layers", tuple(layers or ()))
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn={self.loss_fn!r} must be callable as loss_fn(pl_module, batch)")
        if self.num_samples_fn is not None and not callable(self.num_samples_fn):
            raise TypeError(f"num_samples_fn={self.num_samples_fn!r} must be callable as num_samples_fn(batch) -> int")
        if self.num_samples_fn is not None and self.batch_size is not None:
            raise ValueError("batch_size= re-batches the samples along dimension 0, which num_samples_fn may not count "
                             "along; with num_samples_fn keep the loader's batches (batch_size=None)")
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
    def scheduled(self) -> bool:
        """Whether an explicit step or epoch schedule is set."""
        return self.every_n_steps is not None or self.every_n_epochs is not None

    @property
    def budget_fraction(self) -> float | None:
        """The budget in force: ``"auto"`` is :data:`DEFAULT_BUDGET` without an explicit schedule and none with one."""
        if self.budget == "auto":
            return None if self.scheduled else DEFAULT_BUDGET
        return self.budget

    @property
    def history_path(self) -> str | None:
        """The history file's name with ``{name}`` filled in (a ``/`` in the name becomes ``_``), or ``None``."""
        return None if self.history_file is None else self.history_file.format(name=self.name.replace("/", "_"))

    def hparams(self, **resolved: Any) -> dict[str, Any]:
        """The settings as hyperparameters ``{"<name>/<field>": plain value}`` (``None`` as ``"none"``).

        Args:
            resolved: values known once the run starts that replace the configured ones, e.g. the
                probe set's size ``num_samples`` or the number of probes ``num_probes`` chosen for P.
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name in _OBJECTS or field.name == "name":
                continue
            value = resolved.get(field.name, getattr(self, field.name))
            values[field.name] = ",".join(value) if isinstance(value, tuple) else value
        if not self.density:
            values["num_probes"] = values["num_steps"] = 0
        return {f"{self.name}/{key}": ("none" if value is None else value) for key, value in values.items()}

    def identity(self) -> Mapping[str, Any]:
        """The fields that name a series of measurements: two callbacks that differ here may coexist."""
        return {"name": self.name, "matrix": self.matrix, "k": self.k, "mode": self.mode, "layers": self.layers,
                "num_samples": self.num_samples}
