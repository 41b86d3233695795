"""The edge of stability of an optimizer's update: thresholds, preconditioners and batch sharpness.

Symbols: P parameters (flat, in an operator's parameter order), H the loss Hessian, b the momentum,
eta the step size of the recursion, P_i the preconditioner of coordinate i.

Near a point where the loss is quadratic, ``L(theta) = 0.5 theta' H theta``, every update this module
knows is, with its state frozen, heavy-ball momentum on a curvature C,

    m_t = b m_{t-1} + C x_{t-1},    x_t = x_{t-1} - eta m_t              (Nesterov: eta (C x_{t-1} + b m_t)),

with ``C = P^-1/2 (H + w) P^-1/2``: ``P = I`` for SGD, the optimizer's adaptive denominators for
Adam, AdamW, RMSprop and Adagrad, and w the L2 weight decay the optimizer adds to the gradient
(a diagonal). Along an eigenvector of C with eigenvalue c the recursion is
``z^2 - (1 + b - eta c) z + b = 0`` (Nesterov: ``z^2 - (1 + b - eta c (1 + b)) z + b (1 - eta c) = 0``),
whose roots stay in the unit disk while ``0 < eta c < 2 + 2 b`` (Nesterov: ``< (2 + 2 b) / (1 + 2 b)``):
the largest c is stable below :attr:`UpdateRule.threshold`, and the ratio of C's top eigenvalue to it
is 1 at the edge of stability. :func:`update_rules` reads eta, b and w from an optimizer's param
groups; :func:`preconditioner` reads P from its state; :class:`PreconditionedOperator` multiplies with
C; :func:`batch_sharpness` is a batch's curvature along its own gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.engine.snapshot import local_part
from lightning_hessian.engine.vectors import VectorSpace

# Optimizers whose update is heavy ball on a frozen diagonal preconditioner (see the module docstring).
ADAPTIVE = ("Adam", "AdamW", "RMSprop", "Adagrad")
SUPPORTED = ("SGD", *ADAPTIVE)


class UnsupportedOptimizer(ValueError):
    """The optimizer's update is not one this module can linearize; the message says why.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> try:
        ...     update_rules(torch.optim.SGD(net.parameters(), lr=0.1, maximize=True))
        ... except UnsupportedOptimizer as err:
        ...     print(err)
        SGD with maximize=True ascends the loss: it has no edge of stability
    """


@dataclass(frozen=True)
class UpdateRule:
    """One param group's update, linearized: heavy ball with step ``lr`` and momentum on the curvature C.

    Attributes:
        lr: eta, the step size of the recursion: the group's learning rate, times ``1 - dampening``
            for SGD, times ``1 - beta1`` for Adam and AdamW (whose first moment averages the gradient).
        momentum: b (SGD's ``momentum``, Adam's ``beta1``, RMSprop's ``momentum``; 0 for Adagrad).
        nesterov: SGD's Nesterov momentum.
        weight_decay: the L2 coefficient added to the gradient (SGD, Adam, RMSprop, Adagrad), which
            adds to the curvature; AdamW's decoupled decay is not in it (see :func:`update_rules`).

    Example:
        >>> UpdateRule(lr=0.125, momentum=0.5).threshold  # (2 + 2 b) / lr
        24.0
        >>> UpdateRule(lr=0.125, momentum=0.5, nesterov=True).threshold  # (2 + 2 b) / ((1 + 2 b) lr)
        12.0
    """

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    @property
    def threshold(self) -> float:
        """The largest stable eigenvalue of C: ``(2 + 2 b) / lr``, ``(2 + 2 b) / ((1 + 2 b) lr)`` with Nesterov."""
        b = self.momentum
        edge = (2 + 2 * b) / (1 + 2 * b) if self.nesterov else 2 + 2 * b
        return edge / self.lr if self.lr > 0 else math.inf


def update_rules(optimizer: torch.optim.Optimizer) -> list[UpdateRule]:
    """The linearized update of each param group, at the groups' current learning rates.

    Known: ``torch.optim.SGD`` (momentum, dampening, Nesterov, L2 weight decay), ``Adam`` and
    ``AdamW`` (``amsgrad`` too; L2 weight decay for Adam; AdamW's decoupled decay, which multiplies
    the parameters by ``1 - lr weight_decay`` per step whatever the curvature, is left out: it moves
    the edge by a relative amount of the order of ``lr weight_decay``, 1e-5 at lr 1e-3 and
    weight_decay 0.01), ``RMSprop`` (momentum, centered) and ``Adagrad``. The match is on the exact
    class: a subclass may change the update.

    Raises:
        UnsupportedOptimizer: for another optimizer (LBFGS, a custom one) or ``maximize=True``.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> update_rules(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, dampening=0.5))
        [UpdateRule(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0)]
        >>> [round(rule.lr, 6) for rule in update_rules(torch.optim.Adam(net.parameters(), lr=1e-3))]  # (1 - beta1) lr
        [0.0001]
        >>> try:
        ...     update_rules(torch.optim.LBFGS(net.parameters()))
        ... except UnsupportedOptimizer as err:
        ...     print(err)
        LBFGS is not an optimizer whose edge of stability is known (SGD, Adam, AdamW, RMSprop, Adagrad)
    """
    name = type(optimizer).__name__
    if type(optimizer).__module__.split(".")[:2] != ["torch", "optim"] or name not in SUPPORTED:
        raise UnsupportedOptimizer(
            f"{name} is not an optimizer whose edge of stability is known ({', '.join(SUPPORTED)})"
        )
    rules = []
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise UnsupportedOptimizer(f"{name} with maximize=True ascends the loss: it has no edge of stability")
        lr, decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        if name == "AdamW" or group.get("decoupled_weight_decay", False):
            decay = 0.0
        if name == "SGD":
            momentum = float(group["momentum"])
            damped = lr * (1 - float(group["dampening"])) if momentum > 0 else lr
            rules.append(UpdateRule(damped, momentum, bool(group["nesterov"]) and momentum > 0, decay))
        elif name in ("Adam", "AdamW"):
            beta1 = float(group["betas"][0])
            rules.append(UpdateRule(lr * (1 - beta1), beta1, False, decay))
        else:
            rules.append(UpdateRule(lr, float(group.get("momentum", 0.0)), False, decay))
    return rules


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer divides its step by a preconditioner read from its state.

    Example:
        >>> params = torch.nn.Linear(2, 1).parameters()
        >>> is_adaptive(torch.optim.AdamW(params)), is_adaptive(torch.optim.SGD(torch.nn.Linear(2, 1).parameters()))
        (True, False)
    """
    return type(optimizer).__name__ in ADAPTIVE


@torch.no_grad()
def preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """The optimizer's diagonal preconditioner P, flat in the order of ``params``; the state is only read.

    - Adam, AdamW: ``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)``, with t the parameter's
      step count and v_t its ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``): the
      ``1 - beta1^t`` of the first moment's bias correction is folded in, so that the step size of
      the recursion is ``(1 - beta1) lr`` (:func:`update_rules`).
    - RMSprop: ``P = sqrt(v) + eps``, centered ``sqrt(v - g_avg^2) + eps``.
    - Adagrad: ``P = (1 + (t - 1) lr_decay) (sqrt(sum) + eps)``, the learning-rate decay of step t folded in.

    These are the denominators of the optimizer's last step (step t): the next step's differ by one
    more moving-average update. A parameter without state (it has not been stepped, or is not in the
    optimizer) does not move: its entries are ``inf`` (``P^-1/2 = 0``).

    Args:
        optimizer: one of :data:`ADAPTIVE`.
        params: the parameters in flat order (e.g. ``[p for _, p in select_parameters(model)]``).

    Returns:
        ``[P]`` float64 on the parameters' device, or ``None`` before the optimizer's first step
        (no parameter has a state with ``t >= 1``).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> adam = torch.optim.Adam([w], lr=0.1, eps=0.0)
        >>> preconditioner(adam, [w]) is None  # no step yet
        True
        >>> w.grad = torch.tensor([2.0, -1.0])
        >>> adam.step()
        >>> preconditioner(adam, [w])  # (1 - 0.9) * |g| at t = 1
        tensor([0.2000, 0.1000], dtype=torch.float64)
    """
    name = type(optimizer).__name__
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    parts, stepped = [], False
    for param in params:
        state, group = optimizer.state.get(param, {}), group_of.get(id(param))
        step = float(state.get("step", 0)) if group is not None else 0.0
        if step < 1:
            parts.append(torch.full((local_part(param).numel(),), math.inf, dtype=torch.float64,
                                    device=param.device))
            continue
        stepped = True
        eps = float(group["eps"])
        if name in ("Adam", "AdamW"):
            beta1, beta2 = (float(beta) for beta in group["betas"])
            v = local_part(state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"])
            part = (1 - beta1**step) * ((v.double() / (1 - beta2**step)).sqrt() + eps)
        elif name == "RMSprop":
            v = local_part(state["square_avg"]).double()
            if group.get("centered", False):
                v = v - local_part(state["grad_avg"]).double() ** 2
            part = v.sqrt() + eps
        else:
            part = (1 + (step - 1) * float(group["lr_decay"])) * (local_part(state["sum"]).double().sqrt() + eps)
        parts.append(part.reshape(-1))
    return torch.cat(parts) if stepped else None


def weight_decays(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor:
    """The L2 weight decay each coordinate's gradient gets, flat in the order of ``params`` (float64).

    Zero for AdamW's decoupled decay and for parameters outside the optimizer (see :func:`update_rules`).

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> weight_decays(torch.optim.SGD([{"params": [a], "weight_decay": 0.1}, {"params": [b]}], lr=1.0), [a, b])
        tensor([0.1000, 0.1000, 0.0000], dtype=torch.float64)
    """
    rules = update_rules(optimizer)
    decay_of = {id(p): rule.weight_decay for rule, group in zip(rules, optimizer.param_groups, strict=True)
                for p in group["params"]}
    return torch.cat([torch.full((local_part(p).numel(),), decay_of.get(id(p), 0.0), dtype=torch.float64,
                                 device=p.device) for p in params])


class PreconditionedOperator:
    """Products with ``C = P^-1/2 (H + diag(shift)) P^-1/2``, symmetric when H is.

    Its top eigenvalue is that of ``P^-1 (H + diag(shift))`` (a similar matrix), the preconditioned
    sharpness. Coordinates with ``P = inf`` are left out (their rows and columns of C are zero).

    Args:
        op: any operator with ``num_params``, ``dtype``, ``device`` and ``matmat`` on ``[P, S]``
            columns (a ``HessianOperator``).
        preconditioner: ``[P]``, positive, in the operator's parameter order.
        shift: ``[P]`` added to H's diagonal (the L2 weight decay), default none.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> op = PreconditionedOperator(DiagonalOperator([4.0, 1.0]), torch.tensor([4.0, 0.25]))
        >>> op.matmat(torch.eye(2, dtype=torch.float64))  # P^-1 H
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """

    def __init__(self, op: Any, preconditioner: Tensor, shift: Tensor | None = None) -> None:
        length = VectorSpace(op).length
        if preconditioner.shape != (length,):
            raise ValueError(
                f"preconditioner has shape {tuple(preconditioner.shape)}; the operator takes [P] with "
                f"P = {length}"
            )
        self.op = op
        self.num_params, self.dtype, self.device = op.num_params, op.dtype, op.device
        # A sharded operator's vectors are split over ranks, and so are the preconditioner's entries.
        self.shards = getattr(op, "shards", None)
        self.unit_roundoff = getattr(op, "unit_roundoff", torch.finfo(op.dtype).eps)
        self.scale = preconditioner.to(device=op.device, dtype=op.dtype).rsqrt()
        self.shift = None if shift is None else shift.to(device=op.device, dtype=op.dtype)

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def matmat(self, vectors: Tensor) -> Tensor:
        """``[P, S] -> [P, S]``."""
        scaled = self.scale[:, None] * vectors.to(device=self.device, dtype=self.dtype)
        product = self.op.matmat(scaled)
        if self.shift is not None:
            product = product + self.shift[:, None] * scaled
        return self.scale[:, None] * product


def batch_sharpness(op: Any) -> float:
    """A batch's curvature along its own gradient, ``g' H g / g' g``: one gradient and one product.

    ``op`` is the Hessian operator of the batch's mean loss (anything with ``gradient()`` and
    ``matvec``; one with ``gradient_and_product()``, such as a one-batch
    :class:`~lightning_hessian.engine.HessianOperator`, takes the product through the gradient's own
    graph). NaN when the gradient is zero.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> from lightning_hessian.engine import HessianOperator
        >>> op = HessianOperator(model, lambda m, b: 0.5 * m(b).pow(2).mean(), [x])
        >>> batch_sharpness(op)  # H = diag(0.5, 2), g = (0.5, 2): (0.125 + 8) / 4.25
        1.911764705882353
    """
    space = VectorSpace(op)  # a sharded operator's vectors are each rank's part: their dots are all-reduced
    both = getattr(op, "gradient_and_product", None)  # one pass where the operator has it
    if both is not None:
        gradient, product = both()
    else:
        gradient = op.gradient()
        product = op.matvec(gradient)
    norm = space.dot(gradient, gradient)
    if norm == 0.0:
        return math.nan
    return space.dot(gradient, product) / norm


def stability_ratio(top_curvature: float, rules: Sequence[UpdateRule], *, preconditioned: bool) -> float:
    """The stability ratio: the top eigenvalue of C over the threshold, 1 at the edge of stability.

    Args:
        top_curvature: C's top eigenvalue when ``preconditioned`` (the weight decay is in C), else H's
            top eigenvalue, to which the weight decay is added.
        rules: the groups' :class:`UpdateRule` (at least one).
        preconditioned: whether ``top_curvature`` is the preconditioned one.

    Returns:
        ``(top_curvature + w) / threshold`` with w the largest L2 weight decay of the groups (0 when
        ``preconditioned``) and the smallest threshold of the groups. Exact when the groups share
        their learning rate, momentum and weight decay; when they differ only in learning rate or
        weight decay, an upper bound wherever the top eigenvalue is not negative: C is then
        ``E^1/2 (H + W) E^1/2`` with E and W diagonal, and scaling rows and columns by
        ``sqrt(eta_i / eta_max) <= 1`` cannot raise a non-negative top eigenvalue, nor can W exceed
        its largest entry.

    Example:
        >>> stability_ratio(12.0, [UpdateRule(lr=0.125, momentum=0.5)], preconditioned=True)  # 12 / 24
        0.5
        >>> stability_ratio(9.0, [UpdateRule(lr=0.1, weight_decay=1.0)], preconditioned=False)  # (9 + 1) / 20
        0.5
    """
    decay = 0.0 if preconditioned else max(rule.weight_decay for rule in rules)
    return (top_curvature + decay) / min(rule.threshold for rule in rules)
