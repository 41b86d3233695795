"""``HessianSpectrumCallback``: watch the loss Hessian's spectrum while a Lightning model trains.

The callback schedules measurements (by default within a budget of the run's wall time), fixes the
probe set, isolates side effects, reduces products across DDP ranks and hands each
:class:`~lightning_hessian.measurement.Measurement` to :mod:`lightning_hessian.loggers`; the numbers
come from the engine.

Symbols: P parameters, k top eigenvalues, S SLQ probes, m Lanczos steps per probe.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_hessian import loggers
from lightning_hessian._compat import CALLBACK_BASES
from lightning_hessian.callback.config import HISTORY_FILE, BasisDtype, CallbackConfig, MatrixChoice, Mode
from lightning_hessian.callback.distributed import warn_history_elsewhere
from lightning_hessian.callback.hooks import GaussNewtonModule, HessianLossModule
from lightning_hessian.callback.isolation import isolated, loggers_muted
from lightning_hessian.callback.monitors import Monitors
from lightning_hessian.callback.probes import draw_probe_set, trained_batches
from lightning_hessian.callback.progress import progress_line
from lightning_hessian.callback.refusals import Refusals, initialized
from lightning_hessian.callback.schedule import (
    MIN_DENSITY_STEPS,
    Budget,
    Clock,
    Fidelity,
    Kind,
    crossed_multiple,
    fit_fidelity,
    note_time_limit,
    plan_message,
)
from lightning_hessian.callback.sharding import check_strategy
from lightning_hessian.callback.solver import MatrixSolver, MissingLoss, make_operator, top_k_matvecs
from lightning_hessian.callback.stability import StabilityWatch
from lightning_hessian.engine import NonFiniteError, UnsupportedError
from lightning_hessian.engine.batches import ambiguous_count, count_samples
from lightning_hessian.engine.density import default_num_probes
from lightning_hessian.engine.layers import parameter_layout
from lightning_hessian.engine.snapshot import flat_dtype, select_parameters
from lightning_hessian.measurement import Event, Measurement

# Under ``fast_dev_run`` the one measurement after the last step is this cheap: at most this many
# top eigenvalues, products for them, and a density from one probe of this many steps.
_SMOKE_K, _SMOKE_MATVECS, _SMOKE_STEPS = 2, 12, 8


class HessianSpectrumCallback(*CALLBACK_BASES):
    """Measure the top eigenvalues and the spectral density of the loss Hessian during ``fit``.

    **What is measured.** The Hessian of the *mean* loss over a fixed probe set (the first
    ``num_samples`` samples of the training dataloader, in whole batches, or ``dataloader``) at the
    current parameters, over all trainable parameters. Batches are weighted by their sample counts,
    so the result does not depend on the batching. ``mode="eval"`` uses BatchNorm running statistics
    with dropout off; ``mode="train"`` uses batch statistics (dropout still off). Products run in
    float32 (float64 for a float64 model), outside autocast, whatever the training precision.

    **When.** By default within a *budget*: about ``budget`` (5%) of the run's wall time, timed on the
    run, for two kinds of call. *Snapshots* measure everything asked for (the top k over the probe
    set, the density, every view): at step 0, after the last step, and a few log-spaced between; if
    one costs more than the budget allows, it is shrunk (fewer SLQ probes, probe samples or Lanczos
    steps, then no density) and the plan says so. *Tracked* calls measure the top ``track_k``
    eigenvalues only, warm-started, on ``track_samples`` samples (one batch): a few products each,
    spread evenly over the run, so the top eigenvalues form a curve. Both log to the same tags
    (``<name>/snapshot`` is 1 at snapshots, 0 at tracked calls). The callback says its plan once, on
    rank zero, and logs ``<name>/overhead``. An explicit
    schedule means exactly what it says instead: after every ``every_n_steps``-th optimizer step
    (``log_spaced``: only at ``every_n_steps * 2**j``) and at the end of every ``every_n_epochs``-th
    epoch, with ``budget`` then only a cap if given as a number. Never twice at the same step. With
    ``at_evaluate`` also once at the end of ``trainer.validate()`` / ``trainer.test()``;
    :meth:`measure` measures on demand. Under ``fast_dev_run`` one cheap measurement after the last
    step (top 2, 12 products, a 1-probe, 8-step density) runs the whole path and nothing else.

    **Loss.** ``loss_fn(pl_module, batch)`` if given, else ``pl_module.hessian_loss(batch)`` if the
    module defines it (:class:`~lightning_hessian.callback.hooks.HessianLossModule`), else the loss
    ``training_step(batch, -1)`` returns. The Gauss-Newton matrix needs ``hessian_outputs`` and
    ``hessian_output_loss`` (:class:`~lightning_hessian.callback.hooks.GaussNewtonModule`).

    **Edge of stability.** With the Hessian measured, each call also reads the first optimizer: its
    update's top eigenvalue over its threshold, ``<name>/stability`` (1 at the edge; SGD with
    momentum, dampening or Nesterov, Adam, AdamW, RMSprop, Adagrad), for adaptive optimizers the
    preconditioned sharpness ``<name>/preconditioned_eig_1`` (a top-1 solve over the probe set), and
    after a training step ``<name>/batch_sharpness``, the curvature of the batch just trained on along
    its gradient (one gradient and one product). An optimizer whose edge is not known gets none of
    these, and a warning says why, once.

    **Side effects: none.** Parameters, buffers, ``.grad``, ``requires_grad``, module modes, the
    module's plain state (attributes such as a recurrent hidden state, counters, torchmetrics
    states), every RNG stream and the data order are as they were; ``self.log``, ``self.logger`` and
    ``self.loggers`` swallow what ``training_step`` sends while it computes a loss. The README's
    "Side effects" section lists exactly what is and is not isolated.

    All arguments are keyword-only.

    Schedule:
        every_n_steps: measure after every n-th optimizer step (a step that jumps past a multiple
            counts); ``None`` (default) for no step schedule.
        every_n_epochs: measure at the end of every n-th training epoch; ``None`` (default) for none.
        log_spaced: measure only at steps ``every_n_steps * 2**j``.
        at_start: measure at step 0, before the first update (not when resuming from a later step).
        at_end: measure after the last optimizer step.
        at_evaluate: measure once at the end of ``trainer.validate()`` and ``trainer.test()``.
        budget: the fraction of the run's wall time the callback may spend, in (0, 1). ``"auto"``
            (default): 5% without an explicit schedule, which then comes from the budget, and no cap
            with one. A number with an explicit schedule skips scheduled calls (``<name>/skipped``)
            that would lift the share above it. ``None``: no budget (only the explicit schedule,
            ``at_start`` and ``at_end``).
        track_every_n_steps: a tracked call after every n-th optimizer step (``1``: every step); the
            budget then plans only the snapshots. ``None`` (default): the budget plans tracked calls
            too, and an explicit schedule makes none.
        track_k: the top eigenvalues a tracked call measures (``<name>/eig_1`` ... ``eig_{track_k}``),
            at most ``k``.
        track_samples: the probe samples of a tracked call, the first ones, in whole batches; ``None``
            (default): the first probe batch, the size training uses.
        track_tol: the relative residual at which a tracked call stops, in (0, 1) (default 1e-2): its
            eigenvalue then lies within ``track_tol * ||H||`` of one of its subset's, and, away from
            the next, within about ``track_tol**2 * ||H||**2 / gap`` (``<name>/eig_error_bound``);
            the subset itself sits further from the probe set's value.

    What to measure:
        k: number of top eigenvalues (``<name>/eig_1`` ... ``<name>/eig_{k}``); at most P.
        smallest: also measure the smallest eigenvalue (``<name>/eig_min``).
        density: estimate the spectral density by SLQ (trace, near-zero fraction, negative mass,
            histogram and figure) at every call.
        matrix: ``"hessian"``, ``"ggn"`` (Gauss-Newton part, tags ``<name>/ggn/...``) or ``"both"``.
        layers: parameter name patterns (``fnmatch``, e.g. ``["net.0.*"]``); for each, the top
            eigenvalue of the block of those parameters (``<name>/layer/net.0/eig_1``).
        layer_views: for every module with parameters, the Hutchinson trace of its diagonal block
            (``<name>/layer/net.0/trace``, from ``num_probes`` extra products) and the share of the
            top eigenvector's squared norm that lies in it (``.../eig_1_mass``).
        grad_overlap: the fraction of the probe-set gradient's squared norm inside the top-k
            eigenspace (``<name>/grad_overlap``; Gur-Ari et al. 2018 find it near 1).

    Accuracy and cost:
        tol: relative residual ``||H v - theta v|| / ||H||`` at which Lanczos stops (default 1e-3:
            an eigenvalue's error is then at most ``tol * ||H||`` and, away from its neighbours, about
            ``tol**2 * ||H||**2 / gap``; the estimate is logged as ``<name>/eig_error_bound``).
        max_matvecs: cap on products per eigenvalue solve. Default: ``4 k + 8`` for the top k at
            ``tol >= 1e-3`` (28 for k = 5: with the 32 steps of a one-probe density a call takes at
            most 60 products), else and for the smallest eigenvalue and the layer blocks the engine's
            ``20 k + 100``. Pairs that have not met ``tol`` by then are reported with their
            residuals, ``converged`` false.
        num_probes: S, SLQ probe vectors (default: 4, 2 or 1 as P passes 10,000 and 100,000; one
            probe's quadrature concentrates as P grows, and more probes than that buy little at 32
            steps: ``benchmarks/RESULTS-probes.md``).
        num_steps: m, Lanczos steps per SLQ probe (default 32).
        warm_start: start each top-k solve from the previous call's eigenvectors; the density's
            random probes check that no larger eigenvalue was missed (if one was, the top k are
            solved again from a random start in the same call).

    Memory:
        basis_dtype: ``"float32"`` or ``"float64"`` for the Lanczos vectors (default: the products'
            dtype).
        basis_device: device of the Lanczos vectors, e.g. ``"cpu"`` to keep them off the GPU
            (default the model's).
        max_basis: top-k basis capacity in vectors (default ``max(2 k + 2, 8)``; thick restarts keep it
            there whatever the number of products).
        keep_graph: keep each probe batch's gradient graph between products (a product then costs
            about one backward pass): ``"auto"`` (default) keeps as many as fit in half the memory
            available and recomputes the others; ``True`` keeps all, ``False`` none.
        reorthogonalize: keep the SLQ bases orthogonal (``S (m + 1) P`` numbers instead of a few
            vectors per probe); the density does not need it.

    Probe set:
        num_samples: probe samples over all ranks, taken in whole batches of the loader (a batch is
            never cut); ``None`` for the whole probe dataloader.
        batch_size: re-batch the probe samples to this size (tensors and per-sample lists are cut);
            ``None`` (default) keeps the loader's batches, the size training uses, and cuts them into
            micro-batches for the products where one batch's gradient graph is larger than about 8
            parameter vectors (a convnet's activations) and the samples do not interact in the loss
            (checked on the loss values), so that a product needs no more working memory than that.
        dataloader: the probe data, a DataLoader or a list of batches (default: the training
            dataloader, read once more under isolated random streams and without its workers).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` mean loss of a batch.
        num_samples_fn: ``num_samples_fn(batch) -> int``, the number of samples of a batch, which
            weights it and fills ``num_samples``. Default: as Lightning infers a batch size, the
            leading size of the batch's first tensor with at least one dimension (tuples, lists,
            dicts, dataclasses and objects are searched in order; 0-d tensors skipped), and the
            number of sequences of a ``PackedSequence``; the callback warns once when the batch's
            tensors disagree on it. Pass it where the samples lie along another dimension, e.g.
            ``lambda batch: batch[0].shape[1]`` for time-major ``[T, B, ...]`` RNN batches (it
            keeps the loader's batches: not with ``batch_size``).
        mode: ``"eval"`` or ``"train"`` (see above).
        seed: seed of the probe-set draw, the Lanczos start and the SLQ probes (the same at every
            call, so curves compare like with like).

    Output:
        name: the tag prefix (``hessian``); give two callbacks in one Trainer different names.
        history_file: name of the JSON history written to the logger's directory at the end of
            training (rank 0, only with a logger; ``{name}`` is replaced by ``name``); ``None`` to
            write none.
        progress: show a progress line (solver, products done and expected) for calls longer than
            two seconds.

    Attributes:
        config: the :class:`~lightning_hessian.callback.config.CallbackConfig` built from the arguments.
        history: one :class:`~lightning_hessian.measurement.Measurement` per call.
        events: the calls that gave no spectrum, as :class:`~lightning_hessian.measurement.Event`.
        probe_batches: this rank's probe batches, on the module's device.
        plan: what the budget schedule said it will do (``None`` before it knows).

    Example:
        >>> callback = HessianSpectrumCallback(k=3)
        >>> callback.config.k, callback.config.budget_fraction
        (3, 0.05)
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced: bool = False,
        at_start: bool = True,
        at_end: bool = True,
        at_evaluate: bool = True,
        budget: float | Literal["auto"] | None = "auto",
        track_every_n_steps: int | None = None,
        track_k: int = 1,
        track_samples: int | None = None,
        track_tol: float = 1e-2,
        k: int = 5,
        smallest: bool = False,
        density: bool = True,
        matrix: MatrixChoice = "hessian",
        layers: list[str] | None = None,
        layer_views: bool = False,
        grad_overlap: bool = False,
        tol: float = 1e-3,
        max_matvecs: int | None = None,
        num_probes: int | None = None,
        num_steps: int = 32,
        warm_start: bool = True,
        basis_dtype: BasisDtype | None = None,
        basis_device: str | None = None,
        max_basis: int | None = None,
        keep_graph: bool | Literal["auto"] = "auto",
        reorthogonalize: bool = False,
        num_samples: int | None = 512,
        batch_size: int | None = None,
        dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        num_samples_fn: Callable[[Any], int] | None = None,
        mode: Mode = "eval",
        seed: int = 0,
        name: str = "hessian",
        history_file: str | None = HISTORY_FILE,
        progress: bool = True,
    ) -> None:
        self.config = CallbackConfig(
            every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, log_spaced=log_spaced, at_start=at_start,
            at_end=at_end, at_evaluate=at_evaluate, budget=budget, track_every_n_steps=track_every_n_steps,
            track_k=track_k, track_samples=track_samples, track_tol=track_tol, k=k, smallest=smallest,
            density=density, matrix=matrix, layers=layers, layer_views=layer_views, grad_overlap=grad_overlap, tol=tol,
            max_matvecs=max_matvecs, num_probes=num_probes, num_steps=num_steps, warm_start=warm_start,
            basis_dtype=basis_dtype, basis_device=basis_device, max_basis=max_basis, keep_graph=keep_graph,
            reorthogonalize=reorthogonalize, num_samples=num_samples, batch_size=batch_size, dataloader=dataloader,
            num_samples_fn=num_samples_fn,
            loss_fn=loss_fn, mode=mode, seed=seed, name=name, history_file=history_file, progress=progress
        )
        self.history: list[Measurement] = []
        self.events: list[Event] = []
        self.probe_batches: list[Any] | None = None
        self.plan: str | None = None
        self._num_probe_samples = 0
        self._num_probes: int | None = None
        self._last_step = -1
        self._last_checked = -1
        self._warm: dict[str, Tensor] = {}
        self.clock = Clock()
        self._budget: Budget | None = None
        self._next_check = 0
        self._due: Kind | None = None
        self._fidelity: Fidelity | None = None
        self._num_tracked_samples = 0
        self._smoke = False
        self._hparams_logged = False
        self._run_started = False
        self._stability = StabilityWatch()
        self._monitors = Monitors(self.config.name)
        self._refusals = Refusals()

    # --- Lightning hooks ---------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.config.identity())

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse what cannot work, before any training; log the settings as hyperparameters."""
        config = self.config
        self._hparams_logged = self._run_started = False
        check_strategy(trainer.strategy, config)
        defines_loss = config.loss_fn is not None or isinstance(pl_module, HessianLossModule)
        if config.matrix != "ggn" and not defines_loss and not pl_module.automatic_optimization:
            raise RuntimeError(
                "HessianSpectrumCallback cannot take the loss from training_step under manual optimization; "
                "pass `loss_fn=` or define `hessian_loss(self, batch)` on the module"
            )
        if config.matrix != "hessian" and not isinstance(pl_module, GaussNewtonModule):
            raise RuntimeError(
                f"matrix={config.matrix!r} needs hessian_outputs and hessian_output_loss on the module "
                "(the GaussNewtonModule protocol): `hessian_outputs(self, batch)` returning the model outputs and "
                "`hessian_output_loss(self, outputs, batch)` returning the mean loss"
            )
        selected = [p for _, p in select_parameters(pl_module)]
        num_params = sum(p.numel() for p in initialized(selected))  # a lazy module's have no size yet
        if config.k > num_params and len(initialized(selected)) == len(selected):
            raise ValueError(f"k={config.k} exceeds the number of trainable parameters ({num_params}); lower k")
        if stage == "fit":
            self._log_hyperparams(trainer, pl_module)
            self._monitors.setup(trainer)
            warn_history_elsewhere(trainer, config.history_path)
            note_time_limit(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        config = self.config
        self.clock.start()
        self.probe_batches = None
        self._smoke = bool(getattr(trainer, "fast_dev_run", False))
        if self._last_step > trainer.global_step:  # a new run, with a callback that measured an earlier one
            self._last_step = -1
        self._last_checked = trainer.global_step
        fraction = config.budget_fraction
        self._budget, self._fidelity = None, None
        if fraction is not None and not self._smoke:
            total = trainer.estimated_stepping_batches
            steps = int(total) if math.isfinite(total) else None
            self._budget = Budget(fraction, steps, clock=self.clock, start_step=trainer.global_step,
                                  track=not config.scheduled and config.track_every_n_steps is None)
        self._next_check = trainer.global_step + 1
        if config.at_start and not self._smoke and trainer.global_step == 0 and self._last_step < 0:
            if self._budget is not None and not config.scheduled:
                self._start_within_budget(trainer, pl_module)
            else:
                self._scheduled(trainer, pl_module, "fit")
        else:  # fix the probe set at fit start even when the first measurement comes later
            with isolated(pl_module):
                try:
                    self._ensure_probes(trainer, pl_module)
                except UnsupportedError as err:
                    self._refusals.refuse(trainer, trainer.global_step, "fit", err, self.events)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, previous = trainer.global_step, self._last_checked
        self._last_checked = step
        self._monitors.after_batch(trainer)
        if self._smoke or step <= max(self._last_step, previous) or step < 1:
            return
        with self._stability.training_batch(batch):  # the batch sharpness's batch
            self._train_step_call(trainer, pl_module, step, previous)
            if self._monitors.due_after_batch(trainer):
                self._run(trainer, pl_module, "fit")

    def _train_step_call(self, trainer: Any, pl_module: Any, step: int, previous: int) -> None:
        """The call due after training step ``step`` (the last step checked was ``previous``), if any."""
        config = self.config
        if self.should_measure(step, previous):
            self._scheduled(trainer, pl_module, "fit")
            return
        due = None if config.scheduled else self._budget_due(trainer, step)
        if due == "snapshot":
            self._run(trainer, pl_module, "fit")
            self._budget.took_snapshot(step)
        elif due == "tracked" or (config.track_every_n_steps is not None
                                  and crossed_multiple(previous, step, config.track_every_n_steps)):
            self._scheduled(trainer, pl_module, "fit", kind="tracked")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Under ``fit``, measure for the monitors of the callback's tags before a validation they check after."""
        if not self._smoke and self._monitors.due_before_validation(trainer):
            self._run(trainer, pl_module, "fit")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        n = self.config.every_n_epochs
        if n is not None and not self._smoke and (trainer.current_epoch + 1) % n == 0 \
                and trainer.global_step > self._last_step:
            self._scheduled(trainer, pl_module, "fit")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.config.at_end or self._smoke:
            kind = self._fit_end(trainer)
            # A tracked call at the last step does not stand for the snapshot after it.
            tracked_last = kind == "snapshot" and bool(self.history) and not self.history[-1].snapshot \
                and self.history[-1].step == trainer.global_step
            if trainer.global_step > self._last_step or tracked_last:
                self._run(trainer, pl_module, "fit", kind=kind)
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

    def should_measure(self, step: int, previous: int) -> bool:
        """Whether the explicit step schedule measures after optimizer step ``step``, the one before
        having been ``previous``: a multiple of ``every_n_steps`` (with ``log_spaced``, one of the form
        ``every_n_steps * 2**j``) lies in ``(previous, step]``. Override to customize.

        Example:
            >>> schedule = HessianSpectrumCallback(every_n_steps=5)
            >>> [step for step in range(2, 22, 2) if schedule.should_measure(step, step - 2)]
            [6, 10, 16, 20]
        """
        n = self.config.every_n_steps
        return n is not None and crossed_multiple(previous, step, n, log_spaced=self.config.log_spaced)

    def settings(self) -> dict[str, Any]:
        """The settings logged once as hyperparameters (``<name>/k``, ...), plain values."""
        resolved = {"num_samples": self._num_probe_samples or self.config.num_samples}
        if self._num_probes is not None:
            resolved["num_probes"] = self._num_probes
        return self.config.hparams(**resolved)

    def history_payload(self) -> dict[str, Any]:
        """What the history file holds: the settings, the plan, every measurement and every event, as plain values."""
        return {"settings": self.settings(), "plan": self.plan, "history": [m.to_dict() for m in self.history],
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

    def _log_hyperparams(self, trainer: Any, pl_module: Any) -> None:
        """The settings, merged with the module's and datamodule's hyperparameters, as the run's first
        hyperparameters (TensorBoard's HParams tab keeps only the first set a run logs)."""
        merged: dict[str, Any] = {}
        owners = [pl_module, getattr(trainer, "datamodule", None)]
        for owner in owners:
            if owner is not None and getattr(owner, "_log_hyperparams", False):
                merged.update({k: v for k, v in owner.hparams_initial.items() if k != "_class_path"})
        merged.update(self.settings())
        loggers.log_hyperparams(trainer, merged)
        self._hparams_logged = True

    def _after_evaluation(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.config.at_evaluate or trainer.sanity_checking or trainer.global_step <= self._last_step:
            return
        if self.config.dataloader is None and self.probe_batches is None:
            if trainer.is_global_zero:
                warnings.warn(f"HessianSpectrumCallback: no probe data under trainer.{stage}(), so no measurement; "
                              "pass `dataloader=` (or at_evaluate=False to silence this)", UserWarning, stacklevel=2)
            return
        self._run(trainer, pl_module, stage)

    def _start_within_budget(self, trainer: Any, pl_module: Any) -> None:
        """Step 0 under the budget: a tracked call first, whose products price a snapshot before any training
        step is timed (one product on a batch costs about one training step); then the snapshot, shrunk to
        what the budget allows, or, if none fits, the tracked call's values stand for the start."""
        tracked = self._run(trainer, pl_module, "fit", kind="tracked", log=False)
        budget = self._budget
        assert budget is not None
        if tracked is None:
            self._run(trainer, pl_module, "fit")
            return
        budget.record("tracked", tracked.step, tracked.seconds)  # spent, whether or not it stands for the start
        per_product = self._per_product(trainer, tracked)
        batch = self._count(self.probe_batches[0]) if self.probe_batches else 1
        self._refit(trainer, per_product, budget.snapshot_allowance(per_product * batch))
        if not budget.snapshots:
            self._report(trainer, tracked, None, "fit")
        else:
            self._run(trainer, pl_module, "fit")

    def _latest(self, *, snapshot: bool) -> Measurement:
        """The latest snapshot (with ``snapshot``, if there is one), else the latest call."""
        return next((m for m in reversed(self.history) if m.snapshot), self.history[-1]) if snapshot \
            else self.history[-1]

    def _fit_end(self, trainer: Any) -> Kind:
        """Fit the snapshot after the last step to what is left of the budget; the kind of that call: a
        tracked call when not even the top k of one batch fit (the run then spends at most the budget plus
        one tracked call)."""
        budget = self._budget
        if budget is None or not self.history or self.config.scheduled:
            return "snapshot"
        per_step = budget.step_seconds(trainer.global_step)
        allowance = None if per_step is None else budget.end_allowance(per_step)
        if allowance is None:
            return "snapshot"
        self._refit(trainer, self._per_product(trainer, self._latest(snapshot=True)), max(allowance, 0.0))
        return "snapshot" if budget.snapshots else "tracked"

    @staticmethod
    def _per_product(trainer: Any, measurement: Measurement) -> float:
        """Seconds of one product per probe sample of a rank, as a call measured them."""
        samples = measurement.num_samples / trainer.world_size
        return measurement.seconds / max(measurement.num_matvecs * samples, 1e-12)

    def _full_fidelity(self) -> Fidelity:
        config = self.config
        return Fidelity(num_batches=len(self.probe_batches or ()), num_probes=self._num_probes or 1,
                        num_steps=config.num_steps, density=config.density)

    def _refit(self, trainer: Any, per_product: float, allowance: float | None) -> None:
        """Choose the snapshot's fidelity for ``allowance`` seconds (``None``: no limit) at ``per_product``
        seconds per product and probe sample (rank 0's choice, under DDP: every rank must run the same
        products), and tell the budget what such a snapshot costs."""
        full = self._full_fidelity()
        samples = [self._count(batch) for batch in self.probe_batches or ()]
        top_k = top_k_matvecs(self.config.k, self.config.tol) or 4 * self.config.k + 10
        fitted = full if allowance is None else fit_fidelity(full, allowance, per_product, samples, top_k)
        # When not even the top k of one batch fit, a snapshot measured anyway (a monitor's) runs at its cheapest.
        fidelity = fitted or Fidelity(num_batches=1, num_probes=1, num_steps=MIN_DENSITY_STEPS, density=False)
        seconds = per_product * sum(samples[:fidelity.num_batches]) * fidelity.products(top_k)
        if trainer.world_size > 1:
            fitted, fidelity, seconds = trainer.strategy.broadcast((fitted, fidelity, seconds), src=0)
        self._fidelity = fidelity
        if self._budget is not None:
            self._budget.snapshots = fitted is not None
            self._budget.snapshot_seconds = seconds

    def _budget_due(self, trainer: Any, step: int) -> Kind | None:
        """The budget's decision at ``step`` (rank 0's, under DDP), checked only at planned steps: which kind
        of call is due, if any."""
        budget = self._budget
        if budget is None or step < self._next_check:
            return None
        if (budget.planned is None or budget.replan) and self.history:  # fit the snapshots to t and their cost
            per_step = budget.step_seconds(step)
            if per_step is not None:
                self._refit(trainer, self._per_product(trainer, self._latest(snapshot=budget.replan)),
                            budget.snapshot_allowance(per_step))
        due, kind = budget.next_call(step)
        if trainer.world_size > 1:  # every rank must take the same branch: rank 0's clocks decide
            due, kind = trainer.strategy.broadcast((due, kind), src=0)
        if due > step or kind is None:
            self._next_check = max(due, step + 1)
            self._announce(trainer, step)
            return None
        self._next_check = step + 1
        return kind

    def _announce(self, trainer: Any, step: int) -> None:
        """Say once, on rank zero, what the budget will do."""
        budget = self._budget
        if self.plan is not None or budget is None or budget.planned is None:
            return
        per_step = budget.step_seconds(step)
        if per_step is None:  # the training steps are not timed yet
            return
        fidelity = self._fidelity if budget.snapshots else None
        self.plan = plan_message(budget, per_step, fidelity, self._full_fidelity(), self.config.name)
        rank_zero_info(self.plan)

    def _scheduled(self, trainer: Any, pl_module: Any, stage: str, kind: Kind = "snapshot") -> None:
        """A scheduled call: with a budget cap on an explicit schedule, skipped (and logged) when it
        would lift the share of the run spent in the callback above the cap."""
        step = trainer.global_step
        cap = self.config.budget
        clock = self.clock
        if self.config.scheduled and isinstance(cap, float) and clock.started is not None and self.history:
            last = self.history[-1].seconds
            skip = (clock.spent + last) / max(clock.elapsed() + last, 1e-12) > cap
            if trainer.world_size > 1:  # every rank must take the same branch: rank 0's clock decides
                skip = trainer.strategy.broadcast(skip, src=0)
            if skip:
                self._skip_for_budget(trainer, step, stage)
                return
        self._run(trainer, pl_module, stage, kind=kind)

    def _skip_for_budget(self, trainer: Any, step: int, stage: str) -> None:
        """A call left out to stay within the budget: an event and ``<name>/skipped``."""
        self._last_step = step
        self.events.append(Event(step, stage, "budget"))
        self._monitors.placed = True
        with self.clock.charged():
            loggers.log_scalars(trainer, {f"{self.config.name}/skipped": 1.0,
                                          f"{self.config.name}/overhead": self.clock.overhead()}, step)

    def _run(self, trainer: Any, pl_module: Any, stage: str, kind: Kind = "snapshot",
             log: bool = True) -> Measurement | None:
        """Measure, keep the measurement, log it; the cost (numerics and logging) counts as overhead.

        With ``log=False`` the measurement is returned unlogged (``None`` if it failed), for the caller
        to report or drop."""
        clock = self.clock
        spent_before = clock.spent
        step = trainer.global_step
        self._last_step = max(self._last_step, step)
        self._monitors.called_step, self._monitors.placed = step, True
        if self._refusals.skip(trainer, pl_module, step, stage, self.events):
            return None
        measurement, error = None, None
        with clock.charged():
            bar = progress_line(self.config.name, self._expected_products(kind), self.config.progress
                                and trainer.is_global_zero)
            try:
                with isolated(pl_module), loggers_muted(trainer):
                    self._ensure_probes(trainer, pl_module)
                    measurement = self._compute(trainer, pl_module, stage, bar, kind)
            except UnsupportedError as err:
                self._refusals.refuse(trainer, step, stage, err, self.events)
                return None
            except NonFiniteError as err:
                error = err
            finally:
                if bar is not None:
                    bar.close()
            if not self._hparams_logged:
                loggers.log_hyperparams(trainer, self.settings())
                self._hparams_logged = True
            if not self._run_started:
                loggers.log_run_start(trainer, self.config.name, k=self.config.k, matrix=self.config.matrix,
                                      density=self.config.density)
                self._run_started = True
        if not log and measurement is not None:
            return measurement
        measurement = self._report(trainer, measurement, error, stage)
        if self._budget is not None and stage == "fit":
            self._budget.record(kind, step, clock.spent - spent_before)
        return measurement

    def _report(self, trainer: Any, measurement: Measurement | None, error: Exception | None,
                stage: str) -> Measurement | None:
        """Keep and log a call's measurement, or its failure; the logging counts as overhead too, after
        the share it logs."""
        clock = self.clock
        step = trainer.global_step
        with clock.charged():
            prefix = self.config.name
            if measurement is None:
                reason = "no_loss" if isinstance(error, MissingLoss) else "nonfinite"
                self.events.append(Event(step, stage, reason))
                if trainer.is_global_zero:
                    warnings.warn(f"HessianSpectrumCallback: no spectrum at step {step}: {error}; training "
                                  "continues", RuntimeWarning, stacklevel=2)
                loggers.log_no_spectrum(trainer, prefix, step, {"nonfinite": 1.0, "overhead": clock.overhead()})
                self._monitors.no_spectrum(trainer)
                return None
            measurement = dataclasses.replace(measurement, overhead=clock.overhead())
            self.history.append(measurement)
            loggers.log_measurement(trainer, measurement, prefix)
        return measurement

    def _expected_products(self, kind: Kind = "snapshot") -> int:
        """About how many products a call takes (for the progress line)."""
        config = self.config
        if kind == "tracked":
            per_matrix = top_k_matvecs(config.track_k, config.track_tol) or 4 * config.track_k + 10
        else:
            fidelity = self._fidelity or Fidelity(1, self._num_probes or config.num_probes or 1, config.num_steps,
                                                  config.density)
            per_matrix = fidelity.products(4 * config.k + 10)
        return per_matrix * (2 if config.matrix == "both" else 1)

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
        if config.dataloader is None:
            if isinstance(loader, (Mapping, list, tuple)):
                raise ValueError(
                    "the training dataloader is a collection of loaders; pass the probe data as `dataloader=`"
                )
            if isinstance(getattr(loader, "dataset", None), IterableDataset) and trainer.is_global_zero:
                warnings.warn(
                    "HessianSpectrumCallback draws its probe set by iterating the training IterableDataset once "
                    "more; a one-shot stream (a queue, a socket) would lose those samples to the draw: pass the "
                    "probe data as `dataloader=`", UserWarning, stacklevel=2,
                )
        try:
            raw = draw_probe_set(loader, num_samples=config.num_samples, batch_size=config.batch_size,
                                 seed=config.seed, rank=trainer.global_rank, world_size=trainer.world_size,
                                 max_batches=None if config.dataloader is not None else trained_batches(trainer),
                                 num_samples_fn=self._count)
        except TypeError as err:  # batches the count or the re-batching cannot read: said once, fit goes on
            raise UnsupportedError(str(err)) from err
        self.probe_batches = [self._to_device(trainer, pl_module, b) for b in raw]
        ambiguous = ambiguous_count(self.probe_batches) if config.num_samples_fn is None else None
        if ambiguous is not None and trainer.is_global_zero:
            warnings.warn(f"HessianSpectrumCallback: {ambiguous} to HessianSpectrumCallback", UserWarning,
                          stacklevel=2)
        local = sum(self._count(b) for b in self.probe_batches)
        counts = torch.tensor([float(local), float(sum(self._count(b) for b in self._tracked_batches()))],
                              device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self._num_probe_samples, self._num_tracked_samples = (int(c) for c in counts.tolist())
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

    def _count(self, batch: Any) -> int:
        """The samples of one batch: ``num_samples_fn``'s count, by default the leading size."""
        return (self.config.num_samples_fn or count_samples)(batch)

    def _reduced_count(self, trainer: Any, batches: list[Any]) -> int:
        """The samples of ``batches`` over all ranks."""
        local = sum(self._count(b) for b in batches)
        if trainer.world_size == 1:
            return local
        total = torch.tensor(float(local), device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(total, reduce_op="sum").item())

    def _solver(self, dtype: torch.dtype, num_params: int, kind: Kind = "snapshot") -> MatrixSolver:
        """The settings of a call: a snapshot's at the fidelity the budget allows (cheap ones under
        ``fast_dev_run``), or a tracked call's (its tolerance ``track_tol``)."""
        config = self.config
        self._num_probes = config.num_probes or default_num_probes(num_params)
        basis = {"float32": torch.float32, "float64": torch.float64}.get(config.basis_dtype or "", dtype)
        if kind == "snapshot" and self._fidelity is not None:
            fidelity = self._fidelity
            config = dataclasses.replace(config, num_steps=fidelity.num_steps, density=fidelity.density)
            return MatrixSolver(config, num_probes=fidelity.num_probes, basis_dtype=basis)
        if kind == "tracked":
            config = dataclasses.replace(config, tol=config.track_tol)
        if self._smoke:
            k = min(config.k, _SMOKE_K)
            config = dataclasses.replace(config, k=k, max_matvecs=max(k, _SMOKE_MATVECS), num_steps=_SMOKE_STEPS,
                                         layers=(), layer_views=False, grad_overlap=False)
            return MatrixSolver(config, num_probes=1, basis_dtype=basis)
        return MatrixSolver(config, num_probes=self._num_probes, basis_dtype=basis)

    def _tracked_batches(self) -> list[Any]:
        """The probe batches of a tracked call: the first ones, up to ``track_samples`` (at least one)."""
        batches = self.probe_batches or []
        wanted = self.config.track_samples
        taken, count = [], 0
        for batch in batches:
            if taken and (wanted is None or count >= wanted):
                break
            taken.append(batch)
            count += self._count(batch)
        return taken

    def _compute(self, trainer: Any, pl_module: Any, stage: str, bar: Any, kind: Kind = "snapshot") -> Measurement:
        started = self.clock.now()
        config = self.config
        dtype = flat_dtype(pl_module)
        optimizers = getattr(trainer, "optimizers", None) or []
        layout = parameter_layout(pl_module)
        solver = self._solver(dtype, sum(size for _, size in layout), kind)
        batches, num_samples = self._tracked_batches(), self._num_tracked_samples
        if kind == "snapshot":
            batches = (self.probe_batches or [])[:self._fidelity.num_batches if self._fidelity else None]
            num_samples = self._num_probe_samples if len(batches) == len(self.probe_batches or []) else \
                self._reduced_count(trainer, batches)
        split_batches = config.batch_size is None and kind == "snapshot"
        warm = self._warm if config.warm_start or kind == "tracked" else None
        measured = {}
        for matrix in ("hessian", "ggn"):
            if config.matrix in (matrix, "both"):
                make = functools.partial(make_operator, trainer, pl_module, batches, matrix,
                                         dtype=dtype, mode=config.mode, loss_fn=config.loss_fn,
                                         keep_graph=config.keep_graph, split_batches=split_batches,
                                         num_samples_fn=config.num_samples_fn)
                measured[matrix] = solver.track(make, matrix, warm, bar=bar) if kind == "tracked" else \
                    solver.measure(make, matrix, warm, layout=layout, bar=bar)
        stability = self._stability.measure(trainer, pl_module, solver, measured.get("hessian"), batches, dtype,
                                            warm, split_batches=split_batches)
        return Measurement(
            step=trainer.global_step, epoch=trainer.current_epoch, stage=stage, mode=config.mode,
            dtype=str(dtype).removeprefix("torch."), num_samples=num_samples, snapshot=kind == "snapshot",
            lr=float(optimizers[0].param_groups[0]["lr"]) if optimizers else None,
            seconds=self.clock.now() - started,
            num_matvecs=sum(m.num_matvecs for m in measured.values()) + (stability.num_matvecs if stability else 0),
            stability=stability, **measured,
        )
