"""``HessianSpectrumCallback``: watch the loss Hessian's spectrum while a Lightning model trains.

The callback schedules measurements, fixes the probe set, isolates side effects, reduces products
across DDP ranks and hands each result to :mod:`lightning_hessian.loggers`; the numbers come from
the engine (:class:`~lightning_hessian.HessianOperator`, :func:`~lightning_hessian.top_eigenvalues`,
:func:`~lightning_hessian.spectral_density`, :func:`~lightning_hessian.summarize`).

Symbols: P parameters, k top eigenvalues, S SLQ probes, m Lanczos steps per probe.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_hessian import loggers
from lightning_hessian._compat import CALLBACK_BASES, SHARDED_STRATEGIES
from lightning_hessian._isolation import isolated
from lightning_hessian._measure import Solver, make_operator
from lightning_hessian._probes import count_samples, draw_probe_set
from lightning_hessian.engine import NonFiniteError
from lightning_hessian.engine.layers import parameter_layout
from lightning_hessian.engine.operators import select_parameters

Matrix = Literal["hessian", "ggn", "both"]
Mode = Literal["eval", "train"]

HISTORY_FILE = "hessian_history.json"
# One call with the defaults costs about 110 training steps of the digits MLP (0.15 s of products and
# Lanczos, plus about 0.06 s of TensorBoard logging, against 1.3 ms per step on one CPU thread), so
# measuring every 2000 steps keeps the overhead near 6-8% once a run is longer than the fixed calls at
# its start and end.
DEFAULT_EVERY_N_STEPS = 2000


def _check_count(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} must be {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")


class HessianSpectrumCallback(*CALLBACK_BASES):
    """Measure the top eigenvalues and the spectral density of the loss Hessian during ``fit``.

    **What is measured.** The Hessian of the *mean* loss over a fixed probe set (the first
    ``num_samples`` samples of the training dataloader, or ``dataloader``) at the current
    parameters, over all trainable parameters. Batches are weighted by their sample counts, so the
    result does not depend on the batching. ``mode="eval"`` uses BatchNorm running statistics with
    dropout off; ``mode="train"`` uses batch statistics (dropout still off). Products run in
    float32 (float64 for a float64 model), outside autocast, whatever the training precision.

    **When.** At step 0 (``at_start``: the spectrum at initialization), after every
    ``every_n_steps``-th optimizer step (once per step also with gradient accumulation; with
    ``log_spaced`` only at ``every_n_steps * 2**j``), at the end of every ``every_n_epochs``-th
    epoch, and after the last step (``at_end``); never twice at the same step. With ``at_evaluate``
    also once at the end of ``trainer.validate()`` / ``trainer.test()``; :meth:`measure` measures on
    demand (after ``fit``, in a notebook).

    **Loss.** ``loss_fn(pl_module, batch)`` if given, else ``pl_module.hessian_loss(batch)`` if the
    module defines it, else the loss ``training_step(batch, 0)`` returns (its ``self.log`` calls are
    muted). The Gauss-Newton matrix needs ``hessian_outputs(batch)`` and
    ``hessian_output_loss(outputs, batch)`` on the module.

    **Side effects: none.** Parameters, buffers, ``.grad``, ``requires_grad``, module modes,
    torchmetrics states, every RNG stream and the data order are as they were.

    Args:
        every_n_steps: measure after every n-th optimizer step; ``None`` turns the step schedule off.
            The default (2000) keeps the cost near 5% of training time on the digits MLP in runs
            much longer than that; set it from the cost of one call (``hessian/seconds``) for your
            model (README, "Cost").
        every_n_epochs: measure at the end of every n-th training epoch; ``None`` (default) for none.
        log_spaced: measure only at steps ``every_n_steps * 2**j`` (for long runs).
        at_start: measure at step 0, before the first update (not when resuming from a later step).
        at_end: measure after the last optimizer step.
        at_evaluate: measure once at the end of ``trainer.validate()`` and ``trainer.test()``.
        k: number of top eigenvalues (``hessian/eig_1`` ... ``hessian/eig_{k}``).
        tol: relative residual at which Lanczos stops (eigenvalue error about ``tol**2 * ||H||``).
            Default 1e-5, not the engine's 1e-6: float32 products leave a rounding floor of 1e-7
            to 2e-6 of ``||H||`` in the residuals (measured on the digits MLP over 100 epochs), so
            1e-6 cannot always be certified in float32.
        max_matvecs: cap on products per eigenvalue solve (default the engine's ``20 k + 100``).
        smallest: also measure the smallest eigenvalue (``hessian/eig_min``).
        density: estimate the spectral density by SLQ (trace, near-zero fraction, negative mass,
            histogram and figure).
        num_probes: S, SLQ probe vectors.
        num_steps: m, Lanczos steps per SLQ probe.
        num_samples: probe samples over all ranks; ``None`` for the whole probe dataloader.
        batch_size: samples per batch in a pass over the probe set; ``None`` (default) joins each
            rank's probe samples into one batch when they are tensors (4x faster than batches of 32
            on the digits MLP; memory is the same, since the operator keeps every batch's graph) and
            keeps the loader's batches otherwise.
        dataloader: the probe data (default: the training dataloader).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` mean loss of a batch.
        matrix: ``"hessian"``, ``"ggn"`` (Gauss-Newton part, tags ``hessian/ggn/...``) or ``"both"``.
        layers: parameter name patterns (``fnmatch``, e.g. ``["net.0.*"]``); for each, the top
            eigenvalue of the block of those parameters (``hessian/layer/net.0/eig_1``, and
            ``hessian/ggn/layer/net.0/eig_1`` for the Gauss-Newton matrix).
        layer_views: for every module with parameters (``net.0``, ...), the Hutchinson trace of its
            diagonal block (``hessian/layer/net.0/trace``, from ``num_probes`` extra products) and the
            share of the top eigenvector's squared norm that lies in it (``.../eig_1_mass``).
        grad_overlap: the fraction of the probe-set gradient's squared norm inside the top-k
            eigenspace (``hessian/grad_overlap``; Gur-Ari et al. 2018 find it near 1).
        mode: ``"eval"`` or ``"train"`` (see above).
        seed: seed of the probe-set draw, the Lanczos start and the SLQ probes (the same at every
            call, so curves compare like with like).
        max_overhead: skip a scheduled call when it would lift the fraction of training wall time
            spent in the callback above this (e.g. 0.1); ``None`` for no budget.
        warm_start: start each Lanczos solve from the previous call's eigenvectors.
        history_file: name of the JSON history written to the logger's directory at the end of
            training (rank 0, only with a logger); ``None`` to write none.

    Attributes:
        history: one dict per measurement, plain Python values: ``step``, ``epoch``, ``stage``,
            ``mode``, ``dtype``, ``num_samples``, ``lr``, ``seconds``, ``matvecs``, ``overhead`` and
            the Hessian's ``eigenvalues``, ``residuals``, ``converged``, ``num_params``, ``eig_min``,
            ``trace``, ``trace_stderr``, ``nodes``, ``weights`` (S x m), ``outliers``,
            ``gap_ratio``, ``bulk_edge``, ``near_zero_fraction``, ``negative_mass``, ``layers``; the
            Gauss-Newton matrix's under ``"ggn"``.
        events: skipped or non-finite calls, ``{"step", "stage", "reason"}``.
        probe_batches: this rank's probe batches, on the module's device.

    Example:
        >>> from lightning_hessian import HessianSpectrumCallback
        >>> callback = HessianSpectrumCallback(every_n_steps=100, k=3)
    """

    def __init__(
        self,
        every_n_steps: int | None = DEFAULT_EVERY_N_STEPS,
        every_n_epochs: int | None = None,
        log_spaced: bool = False,
        at_start: bool = True,
        at_end: bool = True,
        k: int = 5,
        tol: float = 1e-5,
        max_matvecs: int | None = None,
        smallest: bool = False,
        density: bool = True,
        num_probes: int = 5,
        num_steps: int = 40,
        num_samples: int | None = 512,
        batch_size: int | None = None,
        dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        matrix: Matrix = "hessian",
        layers: list[str] | None = None,
        layer_views: bool = False,
        grad_overlap: bool = False,
        mode: Mode = "eval",
        seed: int = 0,
        max_overhead: float | None = None,
        warm_start: bool = True,
        at_evaluate: bool = True,
        history_file: str | None = HISTORY_FILE,
    ) -> None:
        _check_count("every_n_steps", every_n_steps, allow_none=True)
        _check_count("every_n_epochs", every_n_epochs, allow_none=True)
        _check_count("k", k)
        _check_count("max_matvecs", max_matvecs, allow_none=True, minimum=k)
        _check_count("num_probes", num_probes)
        _check_count("num_steps", num_steps)
        _check_count("num_samples", num_samples, allow_none=True)
        _check_count("batch_size", batch_size, allow_none=True)
        _check_count("seed", seed, minimum=0)
        _check_choice("matrix", matrix, ("hessian", "ggn", "both"))
        _check_choice("mode", mode, ("eval", "train"))
        if log_spaced and every_n_steps is None:
            raise ValueError("log_spaced=True needs every_n_steps (the first interval); set every_n_steps")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol={tol!r} must be a number in (0, 1)")
        if max_overhead is not None and not (isinstance(max_overhead, (int, float)) and 0 < max_overhead <= 1):
            raise ValueError(f"max_overhead={max_overhead!r} must be a fraction in (0, 1] or None")
        if layers is not None and (isinstance(layers, str) or not all(isinstance(p, str) for p in layers)):
            raise TypeError(f"layers={layers!r} must be a list of parameter name patterns such as ['net.0.*']")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} must be callable as loss_fn(pl_module, batch)")
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise TypeError(f"dataloader={dataloader!r} must be a DataLoader or an iterable of batches")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.log_spaced = log_spaced
        self.at_start = at_start
        self.at_end = at_end
        self.at_evaluate = at_evaluate
        self.k = k
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.smallest = smallest
        self.density = density
        self.num_probes = num_probes
        self.num_steps = num_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.matrix: Matrix = matrix
        self.layers = list(layers) if layers is not None else []
        self.layer_views = layer_views
        self.grad_overlap = grad_overlap
        self.mode: Mode = mode
        self.seed = seed
        self.max_overhead = max_overhead
        self.warm_start = warm_start
        self.history_file = history_file
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
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
        return self._generate_state_key(every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs,
                                        k=self.k, matrix=self.matrix, mode=self.mode, layers=self.layers,
                                        num_samples=self.num_samples, history_file=self.history_file)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse what cannot work, before any training: sharded strategies, a missing loss."""
        self._hparams_logged = False
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise RuntimeError(
                f"HessianSpectrumCallback does not support the sharded strategy {type(trainer.strategy).__name__} "
                "(FSDP, DeepSpeed, model parallel); use a single device or DDP"
            )
        if self.matrix != "ggn" and self.loss_fn is None and not callable(getattr(pl_module, "hessian_loss", None)) \
                and not pl_module.automatic_optimization:
            raise RuntimeError(
                "HessianSpectrumCallback cannot take the loss from training_step under manual optimization; "
                "pass `loss_fn=` or define `hessian_loss(self, batch)` on the module"
            )
        if self.matrix != "hessian":
            needed = ("hessian_outputs", "hessian_output_loss")
            missing = [name for name in needed if not callable(getattr(pl_module, name, None))]
            if missing:
                raise RuntimeError(
                    f"matrix={self.matrix!r} needs {' and '.join(missing)} on the module: "
                    "`hessian_outputs(self, batch)` returning the model outputs and "
                    "`hessian_output_loss(self, outputs, batch)` returning the mean loss"
                )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._clock_start = time.perf_counter()
        self._spent = self._last_cost = 0.0
        self.probe_batches = None
        if self._last_step > trainer.global_step:  # a new run, with a callback that measured an earlier one
            self._last_step = -1
        if self.at_start and trainer.global_step == 0 and self._last_step < 0:
            self._scheduled(trainer, pl_module, "fit")
        else:  # fix the probe set at fit start even when the first measurement comes later
            self._ensure_probes(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > self._last_step and step >= 1 and self.should_measure(step):
            self._scheduled(trainer, pl_module, "fit")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        n = self.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0 and trainer.global_step > self._last_step:
            self._scheduled(trainer, pl_module, "fit")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.at_end and trainer.global_step > self._last_step:
            self._scheduled(trainer, pl_module, "fit")
        if self.history_file and trainer.loggers:
            directory = trainer.log_dir  # a collective: evaluated on every rank
            if trainer.is_global_zero and directory is not None:
                loggers.write_history(os.path.join(directory, self.history_file),
                                      {"settings": self.settings(), "history": self.history, "events": self.events})

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "validate":
            self._after_evaluation(trainer, pl_module, "validate")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._after_evaluation(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": self.history, "events": self.events,
                "warm_start": dict(self._warm)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self.history = list(state_dict.get("history", []))
        self.events = list(state_dict.get("events", []))
        self._warm = dict(state_dict.get("warm_start", {}))

    # --- public ------------------------------------------------------------------------------

    def should_measure(self, step: int) -> bool:
        """Whether the step schedule measures after optimizer step ``step`` (>= 1); override to customize."""
        n = self.every_n_steps
        if n is None or step % n:
            return False
        multiple = step // n
        return not self.log_spaced or multiple & (multiple - 1) == 0

    def settings(self) -> dict[str, Any]:
        """The settings logged once as hyperparameters (``hessian/k``, ...), plain values."""
        return {
            "hessian/matrix": self.matrix, "hessian/k": self.k, "hessian/tol": self.tol,
            "hessian/num_probes": self.num_probes if self.density else 0,
            "hessian/num_steps": self.num_steps if self.density else 0, "hessian/mode": self.mode,
            "hessian/num_samples": self._num_probe_samples, "hessian/every_n_steps": self.every_n_steps or 0,
            "hessian/log_spaced": self.log_spaced, "hessian/seed": self.seed, "hessian/layers": ",".join(self.layers),
            "hessian/layer_views": self.layer_views, "hessian/grad_overlap": self.grad_overlap,
        }

    def measure(self, trainer: Any, pl_module: Any | None = None) -> dict[str, Any] | None:
        """Measure now, log at ``trainer.global_step`` and return the record (``None`` if not finite).

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
        if not self.at_evaluate or trainer.sanity_checking or trainer.global_step <= self._last_step:
            return
        if self.dataloader is None and self.probe_batches is None:
            if trainer.is_global_zero:
                warnings.warn(f"HessianSpectrumCallback: no probe data under trainer.{stage}(), so no measurement; "
                              "pass `dataloader=` (or at_evaluate=False to silence this)", UserWarning, stacklevel=2)
            return
        self._run(trainer, pl_module, stage)

    def _scheduled(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """A scheduled call: skipped (and logged) when it would exceed ``max_overhead``."""
        step = trainer.global_step
        if self.max_overhead is not None and self._clock_start is not None:
            elapsed = time.perf_counter() - self._clock_start
            projected = (self._spent + self._last_cost) / max(elapsed + self._last_cost, 1e-12)
            skip = projected > self.max_overhead
            if trainer.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
                skip = trainer.strategy.broadcast(skip, src=0)
            if skip:
                self._last_step = step
                self.events.append({"step": step, "stage": stage, "reason": "max_overhead"})
                loggers.log_scalars(trainer, {"hessian/skipped": 1.0, "hessian/overhead": self._overhead()}, step)
                return
        self._run(trainer, pl_module, stage)

    def _overhead(self) -> float:
        if self._clock_start is None:
            return float("nan")
        return self._spent / max(time.perf_counter() - self._clock_start, 1e-12)

    def _run(self, trainer: Any, pl_module: Any, stage: str) -> dict[str, Any] | None:
        """Measure, keep the record, log it; the cost (numerics and logging) counts as overhead."""
        started = time.perf_counter()
        step = trainer.global_step
        self._last_step = max(self._last_step, step)
        record, error = None, None
        with isolated(pl_module):
            self._ensure_probes(trainer, pl_module)
            try:
                record = self._compute(trainer, pl_module, stage)
            except NonFiniteError as err:
                error = err
        if not self._hparams_logged:
            loggers.log_hyperparams(trainer, self.settings())
            self._hparams_logged = True
        measured = time.perf_counter()
        self._spent += measured - started
        if record is None:
            self.events.append({"step": step, "stage": stage, "reason": "nonfinite"})
            if trainer.is_global_zero:
                warnings.warn(f"HessianSpectrumCallback: no spectrum at step {step}: {error}; training continues",
                              RuntimeWarning, stacklevel=2)
            loggers.log_scalars(trainer, {"hessian/nonfinite": 1.0, "hessian/overhead": self._overhead()}, step)
        else:
            record["overhead"] = self._overhead()
            self.history.append(record)
            loggers.log_scalars(trainer, loggers.scalar_metrics(record), step)
            loggers.log_spectra(trainer, record, step)
        self._spent += time.perf_counter() - measured
        self._last_cost = time.perf_counter() - started
        return record

    def _ensure_probes(self, trainer: Any, pl_module: Any) -> None:
        """Draw this rank's probe set once (on the module's device)."""
        if self.probe_batches is not None:
            return
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise RuntimeError(
                "HessianSpectrumCallback has no probe data here (no training dataloader outside fit); "
                "pass `dataloader=` to measure under validate/test"
            )
        if isinstance(loader, (Mapping, list, tuple)):
            raise ValueError("the training dataloader is a collection of loaders; pass the probe data as `dataloader=`")
        with isolated(pl_module):
            raw = draw_probe_set(loader, num_samples=self.num_samples, batch_size=self.batch_size, seed=self.seed,
                                 rank=trainer.global_rank, world_size=trainer.world_size)
            self.probe_batches = [self._to_device(trainer, pl_module, b) for b in raw]
        local = sum(count_samples(b) for b in self.probe_batches)
        total = torch.tensor(float(local), device=trainer.strategy.root_device)
        self._num_probe_samples = int(trainer.strategy.reduce(total, reduce_op="sum").item()) \
            if trainer.world_size > 1 else local
        for pattern in self.layers:
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

    def _compute(self, trainer: Any, pl_module: Any, stage: str) -> dict[str, Any]:
        started = time.perf_counter()
        float64 = any(p.dtype == torch.float64 for p in pl_module.parameters())
        dtype = torch.float64 if float64 else torch.float32
        optimizers = getattr(trainer, "optimizers", None) or []
        record: dict[str, Any] = {
            "step": trainer.global_step, "epoch": trainer.current_epoch, "stage": stage, "mode": self.mode,
            "dtype": str(dtype).removeprefix("torch."), "num_samples": self._num_probe_samples,
            "lr": float(optimizers[0].param_groups[0]["lr"]) if optimizers else None,
        }
        solver = Solver(k=self.k, tol=self.tol, max_matvecs=self.max_matvecs, smallest=self.smallest,
                        density=self.density, num_probes=self.num_probes, num_steps=self.num_steps,
                        layers=tuple(self.layers), layer_views=self.layer_views,
                        grad_overlap=self.grad_overlap, seed=self.seed)
        matvecs = 0
        for matrix in ("hessian", "ggn"):
            if self.matrix in (matrix, "both"):
                make = functools.partial(make_operator, trainer, pl_module, self.probe_batches or [], matrix,
                                         dtype=dtype, mode=self.mode, loss_fn=self.loss_fn)
                fields, count = solver.measure(make, matrix, self._warm if self.warm_start else None,
                                               layout=parameter_layout(pl_module))
                matvecs += count
                if matrix == "hessian":
                    record.update(fields)
                else:
                    record["ggn"] = fields
        record["matvecs"] = matvecs
        record["seconds"] = time.perf_counter() - started
        return record
