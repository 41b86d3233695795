"""Layer-by-layer views of a curvature operator: traces, eigenvector mass, gradient overlap.

Symbols: P parameters, k eigenvectors, S probes, L layers (groups of parameters).

A *layer* is a module: the parameters whose names share everything before the last dot
(``net.0.weight`` and ``net.0.bias`` form ``net.0``). These functions read a flat-vector *layout*,
the ``(name, numel)`` pairs of the operator's parameters in order (:func:`parameter_layout`), so
they work for any operator over those parameters, a DDP-summed one included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_hessian.engine.linear_operator import LinearOperator, rademacher
from lightning_hessian.engine.snapshot import select_parameters

Layout = Sequence[tuple[str, int]]
"""``(parameter name, number of entries)`` in flat-vector order."""


def parameter_layout(model: nn.Module, params: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """The flat-vector layout of the operators built on ``model`` with the same ``params``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> parameter_layout(model)
        [('0.weight', 6), ('0.bias', 3), ('1.weight', 3), ('1.bias', 1)]
        >>> parameter_layout(model, ["1.*"])
        [('1.weight', 3), ('1.bias', 1)]
    """
    return [(name, p.numel()) for name, p in select_parameters(model, params)]


def layer_slices(layout: Layout) -> dict[str, slice]:
    """Where each layer's parameters sit in the flat vector, in parameter order.

    Returns:
        ``{layer name: slice}``; a parameter at the top level (no dot) is its own layer.

    Example:
        >>> layer_slices([("0.weight", 6), ("0.bias", 3), ("1.weight", 3), ("scale", 1)])
        {'0': slice(0, 9, None), '1': slice(9, 12, None), 'scale': slice(12, 13, None)}
    """
    slices: dict[str, slice] = {}
    start = 0
    for name, size in layout:
        layer = name.rsplit(".", 1)[0] if "." in name else name
        first = slices[layer].start if layer in slices else start
        slices[layer] = slice(first, start + size)
        start += size
    return slices


def mass_by_layer(layout: Layout, vectors: Tensor) -> dict[str, Tensor]:
    """Fraction of each vector's squared norm that lies in each layer.

    Args:
        layout: the flat layout the vectors use.
        vectors: ``(k, P)`` (or ``(P,)``), e.g. ``EigenResult.eigenvectors``.

    Returns:
        ``{layer: (k,) fractions}``; for each vector the fractions sum to 1.

    Example:
        >>> layout = [("0.weight", 2), ("0.bias", 1), ("1.weight", 1)]
        >>> vectors = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
        >>> {layer: mass.tolist() for layer, mass in mass_by_layer(layout, vectors).items()}
        {'0': [0.75, 0.0], '1': [0.25, 1.0]}
    """
    matrix = vectors.reshape(-1, sum(size for _, size in layout)).double()
    total = matrix.pow(2).sum(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return {layer: (matrix[:, cut].pow(2).sum(dim=1) / total).cpu() for layer, cut in layer_slices(layout).items()}


def layer_traces(
    op: LinearOperator, layout: Layout, *, num_probes: int = 10, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Hutchinson estimates of the trace of each layer's diagonal block, from one set of probes.

    With a Rademacher vector z over all P parameters, ``sum_{i in layer} z_i (H z)_i`` is an
    unbiased estimate of that block's trace, so S products give every layer's trace at once.

    Args:
        op: the operator.
        layout: its flat layout.
        num_probes: S, Rademacher probes (multiplied in one pass over the data).
        seed: seed of the probes' private generator.

    Returns:
        ``{layer: (trace, standard error)}``.

    Example:
        >>> from lightning_hessian.engine.linear_operator import DiagonalOperator
        >>> op = DiagonalOperator([1.0, 2.0, 3.0, 4.0])  # diagonal: every probe gives the exact traces
        >>> layer_traces(op, [("0.weight", 2), ("1.weight", 2)], num_probes=4)
        {'0': (3.0, 0.0), '1': (7.0, 0.0)}
    """
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes={num_probes!r} must be a positive integer")
    generator = torch.Generator().manual_seed(seed)
    probes = rademacher((num_probes, op.num_params), generator, torch.float64)
    products = op.matmat(probes.T).T.double().cpu()
    per_entry = probes * products
    out = {}
    for layer, cut in layer_slices(layout).items():
        estimates = per_entry[:, cut].sum(dim=1)
        stderr = float(estimates.std() / math.sqrt(num_probes)) if num_probes > 1 else 0.0
        out[layer] = (float(estimates.mean()), stderr)
    return out


def gradient_overlap(gradient: Tensor, eigenvectors: Tensor) -> float:
    """Fraction of the gradient's squared norm inside the span of the given eigenvectors.

    ``||Q Q^T g||^2 / ||g||^2`` with Q the orthonormalized ``(k, P)`` eigenvectors: close to 1
    when the gradient lives in the top-k eigenspace (Gur-Ari, Roberts and Dyer 2018).

    Args:
        gradient: ``(P,)`` gradient of the same loss, in the operator's flat layout.
        eigenvectors: ``(k, P)``.

    Returns:
        A number in [0, 1]; NaN for a zero gradient.

    Example:
        >>> top_two = torch.eye(3)[:2]  # eigenvectors e_1 and e_2
        >>> round(gradient_overlap(torch.tensor([3.0, 0.0, 4.0]), top_two), 6)
        0.36
        >>> round(gradient_overlap(torch.tensor([3.0, 4.0, 0.0]), top_two), 6)
        1.0
    """
    g = gradient.reshape(-1).double().cpu()
    q, _ = torch.linalg.qr(eigenvectors.reshape(-1, g.numel()).double().cpu().T)
    norm = float(g.pow(2).sum())
    if norm == 0:
        return float("nan")
    return float((q.T @ g).pow(2).sum()) / norm
