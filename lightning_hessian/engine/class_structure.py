"""Class and cross-class structure of the Gauss-Newton matrix (Papyan 2019, 2020).

Symbols: P parameters, C classes, N samples, n_c samples of class c, pi_c = n_c / N.

For softmax cross-entropy with probabilities p_i and output Jacobian J_i (C x P), the
Gauss-Newton matrix splits into rank-one terms

.. math:: G = \\frac{1}{N} \\sum_i \\sum_{c'} \\delta_{i,c'} \\delta_{i,c'}^\\top, \\qquad
          \\delta_{i,c'} = \\sqrt{p_{i,c'}}\\, J_i^\\top (e_{c'} - p_i),

since ``sum_c' p_c' (e_c' - p)(e_c' - p)^T = diag(p) - p p^T``. Averaging over the samples of
each class c gives the C^2 means ``delta_{c,c'}``; with ``delta_c`` the mean of ``delta_{c,c'}``
over ``c' != c`` and ``nu_{c,c'} = delta_{c,c'} - delta_c``, the between-class part of G is

- ``G0 = sum_c pi_c delta_{c,c} delta_{c,c}^T`` (small once p_{i,c} ~ 1),
- ``G1 = sum_c pi_c (C - 1) delta_c delta_c^T`` (rank <= C: the class outliers),
- ``G2 = sum_c pi_c sum_{c' != c} nu_{c,c'} nu_{c,c'}^T`` (rank <= C(C-1): cross-class
  "mini-outliers"),

and the rest of G is the within-class variation (the bulk). With balanced classes pi_c = 1/C
these are Papyan's definitions. All the means come from one pass over the data with C^2
vector-Jacobian products per batch, and the eigenvalues of each part from a small Gram matrix
(``M M^T`` and ``M^T M`` share their non-zero eigenvalues), so no P x P eigenproblem is solved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.engine.checks import check_count
from lightning_hessian.engine.operators import OutputFn
from lightning_hessian.engine.snapshot import Mode, ModelSnapshot


@dataclass(frozen=True)
class ClassStructure:
    """The class/cross-class decomposition of the Gauss-Newton matrix of softmax cross-entropy.

    Attributes:
        class_means: ``(C, C, P)``; ``class_means[c, c2]`` is ``delta_{c,c2}``, the mean over the
            samples of class c of ``sqrt(p_c2) J^T (e_c2 - p)``.
        class_fractions: ``(C,)`` pi_c, the fraction of samples in each class.
        g0: ``(C,)`` eigenvalues of G0, largest first.
        g1: ``(C,)`` eigenvalues of G1 (the class term), largest first.
        g2: ``(C (C - 1),)`` eigenvalues of G2 (the cross-class term), largest first.
        between: ``(C^2,)`` eigenvalues of the whole between-class part ``G0 + G1 + G2``.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> structure = class_structure(model, lambda m, b: m(b[0]), [(torch.eye(2), torch.tensor([0, 1]))], 2)
        >>> factors = structure.factors()
        >>> sorted(factors), tuple(factors["g1"].shape)
        (['g0', 'g1', 'g2'], (2, 4))
        >>> g1 = factors["g1"].T @ factors["g1"]  # the class term G1 as a P x P matrix
        >>> torch.linalg.eigvalsh(g1).flip(0)[:2].round(decimals=6).tolist(), structure.g1.round(decimals=6).tolist()
        ([0.125, 0.125], [0.125, 0.125])
    """

    class_means: Tensor
    class_fractions: Tensor
    g0: Tensor
    g1: Tensor
    g2: Tensor
    between: Tensor

    @property
    def num_classes(self) -> int:
        """C."""
        return self.class_means.shape[0]

    def factors(self) -> dict[str, Tensor]:
        """``{"g0": M0, "g1": M1, "g2": M2}`` with each part equal to ``M^T M`` (rows of length P)."""
        return _factors(self.class_means, self.class_fractions)


def class_structure(
    model: nn.Module,
    output_fn: OutputFn,
    batches: Iterable[Any],
    num_classes: int,
    *,
    labels_fn: Callable[[Any], Tensor] | None = None,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
) -> ClassStructure:
    """Class and cross-class eigenvalues of the Gauss-Newton matrix, from one pass over the data.

    Args:
        model: the network; never modified.
        output_fn: ``output_fn(model, batch) -> logits`` of shape ``[n, C]`` (softmax
            cross-entropy is assumed).
        batches: a re-iterable of batches.
        num_classes: C.
        labels_fn: ``labels_fn(batch) -> [n]`` integer labels (default ``batch[1]``).
        params, dtype, mode: as for :class:`~lightning_hessian.engine.operators.GGNOperator`.

    Returns:
        A :class:`ClassStructure`.

    Raises:
        ValueError: if the logits are not ``[n, num_classes]`` or a class has no sample.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> _ = torch.nn.init.zeros_(model.weight)  # uniform predictions: p = (1/2, 1/2)
        >>> batches = [(torch.eye(2), torch.tensor([0, 1]))]
        >>> structure = class_structure(model, lambda m, b: m(b[0]), batches, num_classes=2)
        >>> structure.num_classes, tuple(structure.class_means.shape), structure.class_fractions.tolist()
        (2, (2, 2, 4), [0.5, 0.5])
        >>> structure.g1.round(decimals=6)
        tensor([0.1250, 0.1250], dtype=torch.float64)
        >>> structure.between.round(decimals=6)  # one sample per class: all of G (1/4, 1/4) is between-class
        tensor([0.2500, 0.2500, 0.0000, 0.0000], dtype=torch.float64)
    """
    num_classes = check_count("num_classes", num_classes, minimum=2)
    snapshot = ModelSnapshot(model, batches, params=params, dtype=dtype, mode=mode)
    labels_of = labels_fn or (lambda batch: batch[1])
    eye = torch.eye(num_classes, dtype=snapshot.dtype, device=snapshot.device)
    sums = torch.zeros(num_classes, num_classes, snapshot.num_params, dtype=snapshot.dtype, device=snapshot.device)
    counts = torch.zeros(num_classes, dtype=snapshot.dtype, device=snapshot.device)
    for batch in snapshot.batches:
        logits = snapshot.call(output_fn, batch)
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"output_fn must return logits of shape [n, num_classes={num_classes}], got {tuple(logits.shape)}"
            )
        labels = labels_of(batch).to(snapshot.device).long()
        probs = torch.softmax(logits.detach(), dim=1)
        one_hot = eye[labels]  # [n, C]
        # cotangent[c, c2, i] = 1{y_i = c} sqrt(p_{i,c2}) (e_c2 - p_i), shape [C, C, n, C]
        residual = eye[None, :, :] - probs[:, None, :]  # [n, C2, C]
        per_sample = probs.sqrt()[:, :, None] * residual
        cotangents = one_hot.T[:, None, :, None] * per_sample.permute(1, 0, 2)[None]
        parts = snapshot.vjp([logits], [cotangents.reshape(-1, *logits.shape)], snapshot.leaves, retain=False)
        sums += snapshot.flatten(parts).T.reshape(num_classes, num_classes, -1)
        counts += one_hot.sum(dim=0)
    if bool((counts == 0).any()):
        missing = [int(c) for c in torch.nonzero(counts == 0).flatten()]
        raise ValueError(f"classes {missing} have no sample in batches; every class needs at least one")
    means = sums / counts[:, None, None]
    fractions = counts / counts.sum()
    factors = _factors(means, fractions)
    between = (means * fractions.sqrt()[:, None, None]).reshape(num_classes**2, -1)
    return ClassStructure(
        class_means=means,
        class_fractions=fractions,
        g0=_gram_eigenvalues(factors["g0"]),
        g1=_gram_eigenvalues(factors["g1"]),
        g2=_gram_eigenvalues(factors["g2"]),
        between=_gram_eigenvalues(between),
    )


def _factors(means: Tensor, fractions: Tensor) -> dict[str, Tensor]:
    """Row factors M with ``G0 = M0^T M0`` etc., from the ``(C, C, P)`` class means."""
    num_classes = means.shape[0]
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=means.device)
    diagonal = means[torch.arange(num_classes), torch.arange(num_classes)]  # delta_{c,c}
    class_mean = (means * off_diagonal[:, :, None]).sum(dim=1) / (num_classes - 1)  # delta_c
    cross = (means - class_mean[:, None, :])[off_diagonal]  # nu_{c,c'}, rows ordered by (c, c')
    weight = fractions.sqrt()
    cross_weight = weight[:, None].expand(num_classes, num_classes)[off_diagonal]
    return {
        "g0": diagonal * weight[:, None],
        "g1": class_mean * (weight * (num_classes - 1) ** 0.5)[:, None],
        "g2": cross * cross_weight[:, None],
    }


def _gram_eigenvalues(rows: Tensor) -> Tensor:
    """Eigenvalues of ``rows^T rows`` that can be non-zero, largest first, from the small Gram matrix."""
    gram = rows.double() @ rows.double().T
    return torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0).clamp_min(0).cpu()
