"""`top_eigenvalues` on spectra with repeated eigenvalues: every copy counted, against `eigvalsh`.

A Krylov space grown from one vector holds one direction per distinct eigenvalue; these cases fail
for a solver that stops there (it returns true eigenpairs, certified, but not the k extreme ones).
"""

import cases
import pytest
import torch
from torch import nn

from lightning_hessian import HessianOperator, dense_hessian, top_eigenvalues
from lightning_hessian.engine.eigen import lean_max_basis
from lightning_hessian.engine.linear_operator import DiagonalOperator

F64, F32 = torch.float64, torch.float32


def _spectrum(values: list[float], bulk: tuple[float, float], size: int = 250, seed: int = 0) -> torch.Tensor:
    """``values`` and a bulk of distinct values uniform in ``bulk``: ``size`` eigenvalues in all."""
    generator = torch.Generator().manual_seed(seed)
    low, high = bulk
    spread = low + (high - low) * torch.rand(size - len(values), generator=generator, dtype=F64)
    return torch.cat([torch.tensor(values, dtype=F64), spread])


# Multiplicities 2 to 5 at the top, in the middle of the top k, at the k-th, and at the bottom (null
# spaces), each below (above) a bulk.
SPECTRA = {
    "top-2": (_spectrum([5.0, 5.0, 3.0, 2.5, 2.2], (0.0, 1.0)), 4, "largest"),
    "top-5": (_spectrum([5.0] * 5 + [3.0, 3.0], (0.0, 1.0)), 6, "largest"),
    "middle-3": (_spectrum([6.0, 5.5, 4.0, 4.0, 4.0, 3.0, 2.5], (0.0, 1.0)), 6, "largest"),
    "last-of-k-4": (_spectrum([6.0, 5.0, 4.0, 4.0, 4.0, 4.0, 2.0], (-1.0, 1.0)), 4, "largest"),
    "null-5": (_spectrum([0.0] * 5 + [0.5], (1.0, 2.0)), 6, "smallest"),
    "bottom-3-negative": (_spectrum([-2.0] * 3 + [0.0, 0.3], (1.0, 2.0)), 4, "smallest"),
}


def _expected(spectrum: torch.Tensor, k: int, which: str) -> torch.Tensor:
    return spectrum.sort(descending=which == "largest").values[:k]


def _assert_k_extreme(result, matrix: torch.Tensor, k: int, which: str, rtol: float) -> None:
    """The k extreme eigenvalues with multiplicity, to ``rtol`` of ||H||, and residuals that are the true ones."""
    exact = torch.linalg.eigvalsh(matrix.double())
    norm = float(exact.abs().max())
    expected = exact.flip(0)[:k] if which == "largest" else exact[:k]
    assert result.all_converged
    assert torch.all((result.eigenvalues - expected).abs() <= rtol * norm), (result.eigenvalues, expected)
    vectors = result.eigenvectors.double()
    true = (vectors @ matrix.double() - result.eigenvalues[:, None] * vectors).norm(dim=1) / norm
    assert torch.all(true <= result.residuals * (1 + 1e-3) + rtol / 10)


def _distinct_start(matrix: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """A warm start from one eigenvector per distinct wanted value, summed: it spans an invariant
    subspace that misses every second copy (a previous call that found one copy of each)."""
    values, vectors = torch.linalg.eigh(matrix.double())
    order = torch.argsort(values, descending=which == "largest")[:k]
    chosen, seen = [], []
    for index in order.tolist():
        if all(abs(float(values[index]) - s) > 1e-9 for s in seen):
            seen.append(float(values[index]))
            chosen.append(vectors[:, index])
    return torch.stack(chosen).sum(dim=0)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("bounded", [False, True], ids=["growing", "bounded"])
def test_diagonal_operators_count_every_copy(name, bounded):
    spectrum, k, which = SPECTRA[name]
    # A diagonal operator keeps copies exactly apart (no rounding mixes them in), so each costs a check
    # of its own, and the first pass converges bulk values in their place: room for five such checks.
    result = top_eigenvalues(DiagonalOperator(spectrum), k, tol=1e-9, which=which, max_matvecs=500,
                             max_basis=lean_max_basis(k) if bounded else None)
    assert result.all_converged
    torch.testing.assert_close(result.eigenvalues, _expected(spectrum, k, which), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("start", ["cold", "warm"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_rotated_dense_operators_count_every_copy(name, start, dtype):
    spectrum, k, which = SPECTRA[name]
    matrix = cases.matrix_with_spectrum(spectrum, seed=1).to(dtype)
    v0 = _distinct_start(matrix, k, which).to(dtype) if start == "warm" else None
    tol = 1e-9 if dtype == F64 else 1e-5
    result = top_eigenvalues(cases.MatrixOperator(matrix), k, tol=tol, which=which, v0=v0,
                             max_basis=lean_max_basis(k))
    _assert_k_extreme(result, matrix, k, which, rtol=1e-8 if dtype == F64 else 1e-5)


def test_the_check_can_be_turned_off_and_then_misses_the_copies():
    """Without ``verify`` a one-vector start sees one copy per value: the pairs are still certified."""
    spectrum, k, _ = SPECTRA["top-5"]
    unchecked = top_eigenvalues(DiagonalOperator(spectrum), k, tol=1e-9, verify=False)
    assert unchecked.all_converged and unchecked.checked is None
    assert unchecked.eigenvalues.tolist()[:2] == pytest.approx([5.0, 3.0])


class TwoHeads(nn.Module):
    """Two identical tanh MLPs on the same input, their cross-entropies added: the Hessian is
    ``blockdiag(A, A)``, so every eigenvalue comes twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cases.mlp([4, 12, 3], nn.Tanh, seed=3)  # P = 2 x 99
        self.b = cases.mlp([4, 12, 3], nn.Tanh, seed=3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def _two_heads_loss(model: nn.Module, batch) -> torch.Tensor:
    first, second = model(batch[0])
    return nn.functional.cross_entropy(first, batch[1]) + nn.functional.cross_entropy(second, batch[1])


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("start", ["cold", "warm"])
def test_a_network_with_two_identical_heads(which, start):
    model = TwoHeads().double()
    batches = cases.split(*cases.gaussian_mixture(24, 3, 4), [12, 12])
    hessian = dense_hessian(model, _two_heads_loss, batches)
    exact = torch.linalg.eigvalsh(hessian)
    assert torch.allclose(exact[::2], exact[1::2], atol=1e-12)  # every value twice
    op = HessianOperator(model, _two_heads_loss, batches, dtype=F64)
    v0 = _distinct_start(hessian, 6, which) if start == "warm" else None
    result = top_eigenvalues(op, 6, tol=1e-9, which=which, v0=v0, max_basis=lean_max_basis(6), max_matvecs=400)
    _assert_k_extreme(result, hessian, 6, which, rtol=1e-8)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_the_softmax_null_space_of_a_last_layer_block(dtype):
    """The last layer of a cross-entropy MLP (hidden width d = 6, 3 classes): adding the same vector to
    every class's weights and the same number to every bias changes no prediction, a null space of
    dimension d + 1 = 7; the 9 smallest are seven zeros and two positive values."""
    model = cases.mlp([4, 6, 3], nn.Tanh, seed=2).double()
    batches = cases.split(*cases.gaussian_mixture(40, 3, 4), [20, 20])
    block = dense_hessian(model, cases.cross_entropy, batches, params=["2.*"])
    exact = torch.linalg.eigvalsh(block)
    assert torch.all(exact[:7].abs() <= 1e-12) and exact[7] > 1e-4
    op = HessianOperator(model.to(dtype), cases.cross_entropy,
                         [(x.to(dtype), y) for x, y in batches], params=["2.*"], dtype=dtype)
    result = top_eigenvalues(op, 9, tol=1e-9 if dtype == F64 else 1e-5, which="smallest")  # P = 21: no restarts
    _assert_k_extreme(result, block, 9, "smallest", rtol=1e-8 if dtype == F64 else 1e-5)
