"""``HessianSpectrumCallback``: watch the loss Hessian's spectrum while a Lightning model trains.

The callback schedules measurements, fixes the probe set, isolates side effects, reduces products
across DDP ranks and hands each :class:`~lightning_hessian.measurement.Measurement` to
:mod:`lightning_hessian.loggers`; the numbers come from the engine.

Symbols: P parameters, k top eigenvalues, S SLQ probes, m Lanczos steps per probe.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_hessian import loggers
from lightning_hessian._compat import CALLBACK_BASES, SHARDED_STRATEGIES
from lightning_hessian._isolation import isolated
from lightning_hessian._measure import MatrixSolver, MissingLoss, make_operator
from lightning_hessian._probes import draw_probe_set
from lightning_hessian.config import HISTORY_FILE, CallbackConfig, MatrixChoice, Mode
from lightning_hessian.engine import NonFiniteError
from lightning_hessian.engine.batches import count_samples
from lightning_hessian.engine.layers import parameter_layout
from lightning_hessian.engine.snapshot import select_parameters
from lightning_hessian.measurement import Event, Measurement


class HessianSpectrumCallback(*CALLBACK_BASES):
    """Measure the top eigenvalues and the spectral density of the loss Hessian during ``fit``.

    **What is measured.** The Hessian of the *mean* loss over a fixed probe set (the first
    ``num_samples`` samples of the training dataloader, or ``dataloader``) at the current
    parameters, over all trainable parameters. Batches are weighted by their sample counts, so the
    result does not depend on the batching. ``mode="eval"`` uses BatchNorm running statistics with
    dropout off; ``mode="train"`` uses batch statistics (dropout still off). Products run in
    float32 (float64 for a float64 model), outside autocast, whatever the training precision.

    **When.** At step 0 (``at_start``: the spectrum at initialization), after every
    ``every_n_steps``-th optimizer step (with ``log_spaced`` only at ``every_n_steps * 2**j``), at
    the end of every ``every_n_epochs``-th epoch, and after the last step (``at_end``); never twice
    at the same step. With ``at_evaluate`` also once at the end of ``trainer.validate()`` /
    ``trainer.test()``; :meth:`measure` measures on demand (after ``fit``, in a notebook).

    **Loss.** ``loss_fn(pl_module, batch)`` if given, else ``pl_module.hessian_loss(batch)`` if the
    module defines it (:class:`~lightning_hessian.hooks.HessianLossModule`), else the loss
    ``training_step(batch, -1)`` returns (its ``self.log`` calls are muted). The Gauss-Newton matrix
    needs ``hessian_outputs`` and ``hessian_output_loss`` (:class:`~lightning_hessian.hooks.GaussNewtonModule`).

    **Side effects: none.** Parameters, buffers, ``.grad``, ``requires_grad``, module modes,
    torchmetrics states, every RNG stream and the data order are as they were.

    All arguments are keyword-only.

    Schedule:
        every_n_steps: measure after every n-th optimizer step; ``None`` turns the step schedule off.
        every_n_epochs: measure at the end of every n-th training epoch; ``None`` (default) for none.
        log_spaced: measure only at steps ``every_n_steps * 2**j`` (for long runs).
        at_start: measure at step 0, before the first update (not when resuming from a later step).
        at_end: measure after the last optimizer step.
        at_evaluate: measure once at the end of ``trainer.validate()`` and ``trainer.test()``.
        max_overhead: skip a scheduled call when it would lift the fraction of training wall time
            spent in the callback above this (e.g. 0.1); ``None`` for no cap.

    What to measure:
        k: number of top eigenvalues (``<name>/eig_1`` ... ``<name>/eig_{k}``).
        smallest: also measure the smallest eigenvalue (``<name>/eig_min``).
        density: estimate the spectral density by SLQ (trace, near-zero fraction, negative mass,
            histogram and figure).
        matrix: ``"hessian"``, ``"ggn"`` (Gauss-Newton part, tags ``<name>/ggn/...``) or ``"both"``.
        layers: parameter name patterns (``fnmatch``, e.g. ``["net.0.*"]``); for each, the top
            eigenvalue of the block of those parameters (``<name>/layer/net.0/eig_1``).
        layer_views: for every module with parameters, the Hutchinson trace of its diagonal block
            (``<name>/layer/net.0/trace``, from ``num_probes`` extra products) and the share of the
            top eigenvector's squared norm that lies in it (``.../eig_1_mass``).
        grad_overlap: the fraction of the probe-set gradient's squared norm inside the top-k
            eigenspace (``<name>/grad_overlap``; Gur-Ari et al. 2018 find it near 1).

    Accuracy and cost:
        tol: relative residual at which Lanczos stops (eigenvalue error about ``tol**2 * ||H||``).
        max_matvecs: cap on products per eigenvalue solve (default the engine's ``20 k + 100``).
        num_probes: S, SLQ probe vectors.
        num_steps: m, Lanczos steps per SLQ probe.
        warm_start: start each Lanczos solve from the previous call's eigenvectors.

    Probe set:
        num_samples: probe samples over all ranks; ``None`` for the whole probe dataloader.
        batch_size: samples per batch in a pass over the probe set; ``None`` joins each rank's probe
            samples into one batch when they are tensors and keeps the loader's batches otherwise.
        dataloader: the probe data, a DataLoader or a list of batches (default: the training dataloader).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` mean loss of a batch.
        mode: ``"eval"`` or ``"train"`` (see above).
        seed: seed of the probe-set draw, the Lanczos start and the SLQ probes (the same at every
            call, so curves compare like with like).

    Output:
        name: the tag prefix (``hessian``); give two callbacks in one Trainer different names.
        history_file: name of the JSON history written to the logger's directory at the end of
            training (rank 0, only with a logger; ``{name}`` is replaced by ``name``); ``None`` to
            write none.

    Attributes:
        config: the :class:`~lightning_hessian.config.CallbackConfig` built from the arguments.
        history: one :class:`~lightning_hessian.measurement.Measurement` per call.
        events: the calls that gave no spectrum, as :class:`~lightning_hessian.measurement.Event`.
        probe_batches: this rank's probe batches, on the module's device.

    Example:
        >>> callback = HessianSpectrumCallback(every_n_steps=100, k=3)
        >>> callback.config.k, callback.config.every_n_steps
        (3, 100)
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = 2000,
        every_n_epochs: int | None = None,
        log_spaced: bool = False,
        at_start: bool = True,
        at_end: bool = True,
        at_evaluate: bool = True,
        max_overhead: float | None = None,
        k: int = 5,
        smallest: bool = False,
        density: bool = True,
        matrix: MatrixChoice = "hessian",
        layers: list[str] | None = None,
        layer_views: bool = False,
        grad_overlap: bool = False,
        tol: float = 1e-5,
        max_matvecs: int | None = None,
        num_probes: int = 5,
        num_steps: int = 40,
        warm_start: bool = True,
        num_samples: int | None = 512,
        batch_size: int | None = None,
        dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Mode = "eval",
        seed: int = 0,
        name: str = "hessian",
        history_file: str | None = HISTORY_FILE,
    ) -> None:
        arguments = dict(locals())
        for key in ("self", "__class__"):
            arguments.pop(key, None)
        arguments["layers"] = () if layers is None else layers
        self.config = CallbackConfig(**arguments)
        self.history: list[Measurement] = []
        self.events: list[Event] = []
        self.probe_batches: list[Any] | None = None
        self._num_probe_samples = 0
        self._last_step = -1
        self._warm: dict[str, Tensor] = {}
        self._clock_start: float | None = None
        self._spent = 0.0
        self._last_cost = 0.0
        self._hparams_logged = False

    # --- Lightning hooks ---------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.config.identity())

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse what cannot work, before any training: sharded strategies, a missing loss."""
        self._hparams_logged = False
        config = self.config
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise RuntimeError(
                f"HessianSpectrumCallback does not support the sharded strategy {type(trainer.strategy).__name__} "
                "(FSDP, DeepSpeed, model parallel); use a single device or DDP"
            )
        defines_loss = config.loss_fn is not None or callable(getattr(pl_module, "hessian_loss", None))
        if config.matrix != "ggn" and not defines_loss and not pl_module.automatic_optimization:
            raise RuntimeError(
                "HessianSpectrumCallback cannot take the loss from training_step under manual optimization; "
                "pass `loss_fn=` or define `hessian_loss(self, batch)` on the module"
            )
        if config.matrix != "hessian":
            needed = ("hessian_outputs", "hessian_output_loss")
            missing = [name for name in needed if not callable(getattr(pl_module, name, None))]
            if missing:
                raise RuntimeError(
                    f"matrix={config.matrix!r} needs {' and '.join(missing)} on the module: "
                    "`hessian_outputs(self, batch)` returning the model outputs and "
                    "`hessian_output_loss(self, outputs, batch)` returning the mean loss"
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._clock_start = time.perf_counter()
        self._spent = self._last_cost = 0.0
        self.probe_batches = None
        if self._last_step > trainer.global_step:  # a new run, with a callback that measured an earlier one
            self._last_step = -1
        if self.config.at_start and trainer.global_step == 0 and self._last_step < 0:
            self._scheduled(trainer, pl_module, "fit")
        else:  # fix the probe set at fit start even when the first measurement comes later
            self._ensure_probes(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > self._last_step and step >= 1 and self.should_measure(step):
            self._scheduled(trainer, pl_module, "fit")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        n = self.config.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0 and trainer.global_step > self._last_step:
            self._scheduled(trainer, pl_module, "fit")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.config.at_end and trainer.global_step > self._last_step:
            self._scheduled(trainer, pl_module, "fit")
        path = self.config.history_path
        if path and trainer.loggers:
            directory = trainer.log_dir  # a collective: evaluated on every rank
            if trainer.is_global_zero and directory is not None:
                loggers.write_json(os.path.join(directory, path), self.history_payload())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "validate":
            self._after_evaluation(trainer, pl_module, "validate")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._after_evaluation(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": [m.to_dict() for m in self.history],
                "events": [e.to_dict() for e in self.events], "warm_start": dict(self._warm)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self.history = [Measurement.from_dict(m) for m in state_dict.get("history", [])]
        self.events = [Event(**e) for e in state_dict.get("events", [])]
        self._warm = dict(state_dict.get("warm_start", {}))

    # --- public ------------------------------------------------------------------------------

    def should_measure(self, step: int) -> bool:
        """Whether the step schedule measures after optimizer step ``step`` (>= 1); override to customize."""
        n = self.config.every_n_steps
        if n is None or step % n:
            return False
        multiple = step // n
        return not self.config.log_spaced or multiple & (multiple - 1) == 0

    def settings(self) -> dict[str, Any]:
        """The settings logged once as hyperparameters (``<name>/k``, ...), plain values."""
        return self.config.hparams(self._num_probe_samples)

    def history_payload(self) -> dict[str, Any]:
        """What the history file holds: the settings, every measurement and every event, as plain values."""
        return {"settings": self.settings(), "history": [m.to_dict() for m in self.history],
                "events": [e.to_dict() for e in self.events]}

    def measure(self, trainer: Any, pl_module: Any | None = None) -> Measurement | None:
        """Measure now, log at ``trainer.global_step`` and return the measurement (``None`` if not finite).

        Works during and after ``fit`` and under ``trainer.validate()``/``test()`` (inference mode
        is lifted inside). Under DDP every rank must call it. The probe set is the one drawn at fit
        start, else the ``dataloader`` argument, else the training dataloader.

        Args:
            trainer: the Trainer.
            pl_module: the LightningModule (default ``trainer.lightning_module``).
        """
        return self._run(trainer, pl_module or trainer.lightning_module, "measure")

    # --- internals ---------------------------------------------------------------------------

    def _after_evaluation(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.config.at_evaluate or trainer.sanity_checking or trainer.global_step <= self._last_step:
            return
        if self.config.dataloader is None and self.probe_batches is None:
            if trainer.is_global_zero:
                warnings.warn(f"HessianSpectrumCallback: no probe data under trainer.{stage}(), so no measurement; "
                              "pass `dataloader=` (or at_evaluate=False to silence this)", UserWarning, stacklevel=2)
            return
        self._run(trainer, pl_module, stage)

    def _scheduled(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """A scheduled call: skipped (and logged) when it would exceed ``max_overhead``."""
        step = trainer.global_step
        cap = self.config.max_overhead
        if cap is not None and self._clock_start is not None:
            elapsed = time.perf_counter() - self._clock_start
            projected = (self._spent + self._last_cost) / max(elapsed + self._last_cost, 1e-12)
            skip = projected > cap
            if trainer.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
                skip = trainer.strategy.broadcast(skip, src=0)
            if skip:
                self._last_step = step
                self.events.append(Event(step, stage, "budget"))
                loggers.log_scalars(trainer, {f"{self.config.name}/skipped": 1.0,
                                              f"{self.config.name}/overhead": self._overhead()}, step)
                return
        self._run(trainer, pl_module, stage)

    def _overhead(self) -> float:
        if self._clock_start is None:
            return float("nan")
        return self._spent / max(time.perf_counter() - self._clock_start, 1e-12)

    def _run(self, trainer: Any, pl_module: Any, stage: str) -> Measurement | None:
        """Measure, keep the measurement, log it; the cost (numerics and logging) counts as overhead."""
        started = time.perf_counter()
        step = trainer.global_step
        self._last_step = max(self._last_step, step)
        measurement, error = None, None
        with isolated(pl_module):
            self._ensure_probes(trainer, pl_module)
            try:
                measurement = self._compute(trainer, pl_module, stage)
            except NonFiniteError as err:
                error = err
        if not self._hparams_logged:
            loggers.log_hyperparams(trainer, self.settings())
            self._hparams_logged = True
        measured = time.perf_counter()
        self._spent += measured - started
        prefix = self.config.name
        if measurement is None:
            reason = "no_loss" if isinstance(error, MissingLoss) else "nonfinite"
            self.events.append(Event(step, stage, reason))
            if trainer.is_global_zero:
                warnings.warn(f"HessianSpectrumCallback: no spectrum at step {step}: {error}; training continues",
                              RuntimeWarning, stacklevel=2)
            loggers.log_no_spectrum(trainer, prefix, step, {"nonfinite": 1.0, "overhead": self._overhead()})
        else:
            measurement = dataclasses.replace(measurement, overhead=self._overhead())
            self.history.append(measurement)
            loggers.log_measurement(trainer, measurement, prefix)
        self._spent += time.perf_counter() - measured
        self._last_cost = time.perf_counter() - started
        return measurement

    def _ensure_probes(self, trainer: Any, pl_module: Any) -> None:
        """Draw this rank's probe set once (on the module's device)."""
        if self.probe_batches is not None:
            return
        config = self.config
        loader = config.dataloader if config.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise RuntimeError(
                "HessianSpectrumCallback has no probe data here (no training dataloader outside fit); "
                "pass `dataloader=` to measure under validate/test"
            )
        if config.dataloader is None and isinstance(loader, (Mapping, list, tuple)):
            raise ValueError("the training dataloader is a collection of loaders; pass the probe data as `dataloader=`")
        with isolated(pl_module):
            raw = draw_probe_set(loader, num_samples=config.num_samples, batch_size=config.batch_size,
                                 seed=config.seed, rank=trainer.global_rank, world_size=trainer.world_size)
            self.probe_batches = [self._to_device(trainer, pl_module, b) for b in raw]
        local = sum(count_samples(b) for b in self.probe_batches)
        total = torch.tensor(float(local), device=trainer.strategy.root_device)
        self._num_probe_samples = int(trainer.strategy.reduce(total, reduce_op="sum").item()) \
            if trainer.world_size > 1 else local
        for pattern in config.layers:
            try:
                select_parameters(pl_module, [pattern])
            except ValueError as err:
                raise ValueError(f"layers: {err}") from None

    @staticmethod
    def _to_device(trainer: Any, pl_module: Any, batch: Any) -> Any:
        """The path the training loop takes: precision conversion, then the module's transfer hooks."""
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    def _compute(self, trainer: Any, pl_module: Any, stage: str) -> Measurement:
        started = time.perf_counter()
        config = self.config
        float64 = any(p.dtype == torch.float64 for p in pl_module.parameters())
        dtype = torch.float64 if float64 else torch.float32
        optimizers = getattr(trainer, "optimizers", None) or []
        solver = MatrixSolver(k=config.k, tol=config.tol, max_matvecs=config.max_matvecs, smallest=config.smallest,
                              density=config.density, num_probes=config.num_probes, num_steps=config.num_steps,
                              layers=config.layers, layer_views=config.layer_views,
                              grad_overlap=config.grad_overlap, seed=config.seed)
        measured = {}
        for matrix in ("hessian", "ggn"):
            if config.matrix in (matrix, "both"):
                make = functools.partial(make_operator, trainer, pl_module, self.probe_batches or [], matrix,
                                         dtype=dtype, mode=config.mode, loss_fn=config.loss_fn)
                measured[matrix] = solver.measure(make, matrix, self._warm if config.warm_start else None,
                                                  layout=parameter_layout(pl_module))
        return Measurement(
            step=trainer.global_step, epoch=trainer.current_epoch, stage=stage, mode=config.mode,
            dtype=str(dtype).removeprefix("torch."), num_samples=self._num_probe_samples,
            lr=float(optimizers[0].param_groups[0]["lr"]) if optimizers else None,
            seconds=time.perf_counter() - started, num_matvecs=sum(m.num_matvecs for m in measured.values()),
            **measured,
        )
