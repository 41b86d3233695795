"""Values are current or absent: what ``ModelCheckpoint``, ``EarlyStopping`` and any other monitor read.

A value the callback puts into ``trainer.callback_metrics`` belongs to the optimizer step it was
measured at. Once training has moved past that step, the callback's tags are removed from
``callback_metrics`` (:func:`drop_stale`), so nothing presents an old measurement as current.

A monitor is any callback of the Trainer with a ``monitor`` attribute that names one of the
callback's tags (``ModelCheckpoint(monitor="hessian/eig_1")``, ``EarlyStopping(...)``). For these the
callback also measures where monitors check, whatever its schedule or budget: after the last
training batch of every epoch (before the epoch-end hooks and the validation that follows it), at
the start of every validation inside ``fit`` (a mid-epoch ``val_check_interval``), and every
``every_n_train_steps`` steps of a ``ModelCheckpoint`` that saves on steps. A check on a timer
(``ModelCheckpoint(train_time_interval=...)``) cannot be followed: :func:`unfollowed_checks` names it,
and :class:`Monitors` warns once at setup.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_hessian.loggers.tags import COST_TAGS


def monitors(trainer: Any, prefix: str) -> list[Any]:
    """The Trainer's callbacks whose ``monitor`` names a tag under ``prefix/``.

    Example:
        >>> import types
        >>> watching = types.SimpleNamespace(monitor="hessian/eig_1")
        >>> trainer = types.SimpleNamespace(callbacks=[watching, types.SimpleNamespace(monitor="val_loss")])
        >>> monitors(trainer, "hessian") == [watching]
        True
    """
    found = []
    for callback in getattr(trainer, "callbacks", None) or []:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith(f"{prefix}/"):
            found.append(callback)
    return found


def unfollowed_checks(watching: list[Any]) -> list[str]:
    """Monitors among ``watching`` that check on a timer, as ``"ModelCheckpoint(monitor='...')"``."""
    return [f"{type(callback).__name__}(monitor={callback.monitor!r})" for callback in watching
            if getattr(callback, "_train_time_interval", None) is not None]


def check_after_batch(trainer: Any, watching: list[Any]) -> bool:
    """Whether a monitor among ``watching`` may check at the current step, after this training batch: it is
    the last batch of the epoch (or of training), or a multiple of a ``ModelCheckpoint``'s
    ``every_n_train_steps``."""
    if not watching:
        return False
    step = trainer.global_step
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch or progress.current.ready == trainer.num_training_batches:
        return True
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= step:
        return True
    every = [getattr(callback, "_every_n_train_steps", 0) or 0 for callback in watching]
    return any(n > 0 and step % n == 0 for n in every)


def drop_stale(trainer: Any, prefix: str) -> list[str]:
    """Remove every ``prefix/...`` value from ``trainer.callback_metrics`` (training moved past its step);
    return the keys removed.

    Example:
        >>> import types
        >>> trainer = types.SimpleNamespace(callback_metrics={"hessian/eig_1": torch.tensor(2.0), "loss": 1.0})
        >>> drop_stale(trainer, "hessian"), trainer.callback_metrics
        (['hessian/eig_1'], {'loss': 1.0})
    """
    metrics = trainer.callback_metrics
    stale = [key for key in metrics if key.startswith(f"{prefix}/")]
    for key in stale:
        del metrics[key]
    return stale


class Monitors:
    """The monitors of one callback's tags in one run, and the step its last call measured.

    Args:
        prefix: the callback's tag prefix (its ``name``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.watching: list[Any] = []
        self.called_step = -1
        # Whether callback_metrics may hold values the callback put there: reading callback_metrics makes
        # Lightning compute every logged metric, which after each training step would be wasted.
        self.placed = False
        self._spectral: set[str] = set()  # the spectral tags dropped so far, which a call without a spectrum NaNs

    def setup(self, trainer: Any) -> None:
        """Find the monitors; say once what cannot be followed."""
        self.watching = monitors(trainer, self.prefix)
        self.called_step = -1
        self.placed = False
        self._spectral = set()
        if not trainer.is_global_zero:
            return
        unfollowed = unfollowed_checks(self.watching)
        if unfollowed:
            warnings.warn(f"HessianSpectrumCallback: {', '.join(unfollowed)} checks on a timer, which the callback "
                          f"cannot measure for; its {self.prefix}/ tags are absent at those checks (they are "
                          "current or absent): save on steps or epochs instead", UserWarning, stacklevel=3)

    def after_batch(self, trainer: Any) -> None:
        """Drop the callback's values once training has moved past the step they were measured at."""
        if self.placed and trainer.global_step > self.called_step:
            dropped = drop_stale(trainer, self.prefix)
            self._spectral.update(key for key in dropped if key.rsplit("/", 1)[-1] not in COST_TAGS)
            self.placed = False

    def due_after_batch(self, trainer: Any) -> bool:
        """Whether a monitor checks after this batch and this step has not been measured."""
        return trainer.global_step != self.called_step and check_after_batch(trainer, self.watching)

    def due_before_validation(self, trainer: Any) -> bool:
        """Whether a validation inside ``fit`` is about to run that a monitor checks on, at an unmeasured step."""
        return bool(self.watching) and trainer.state.fn == "fit" and not trainer.sanity_checking \
            and trainer.global_step != self.called_step

    def no_spectrum(self, trainer: Any) -> None:
        """A call that measured nothing: every spectral tag measured before and every monitored tag reads NaN
        (not absent, which a monitor refuses)."""
        keys = self._spectral | {m.monitor for m in self.watching}
        trainer.callback_metrics.update({key: torch.tensor(float("nan")) for key in keys
                                         if key not in trainer.callback_metrics})
