"""`top_eigenvalues` against `torch.linalg.eigvalsh` of dense float64 Hessians and of matrices with known spectra."""

import math

import cases
import pytest
import torch

from lightning_hessian import GGNOperator, HessianOperator, dense_ggn, top_eigenvalues
from lightning_hessian.engine.lanczos import Lanczos, tridiagonal_quadrature

F64 = torch.float64
SQRT_EPS = math.sqrt(torch.finfo(F64).eps)

TRAINED = [pytest.param(cases.trained_digits, id="digits-relu-mlp"),
           pytest.param(cases.trained_mixture, id="mixture-tanh-mlp")]


def _hessian_operator(problem, model=None):
    return HessianOperator(model or problem.model(), cases.cross_entropy, problem.batches, dtype=F64)


def _assert_certified(result, matrix, tol, eigenvalues=None):
    """Reported residuals are the true ones (relative to ||H||), within tol, and the vectors are orthonormal
    to sqrt(eps), the level at which partial reorthogonalization keeps the basis."""
    vectors = result.eigenvectors
    norm = (torch.linalg.eigvalsh(matrix) if eigenvalues is None else eigenvalues).abs().max()
    true = (vectors @ matrix - result.eigenvalues[:, None] * vectors).norm(dim=1) / norm
    torch.testing.assert_close(result.residuals, true, rtol=1e-3, atol=1e-12)
    assert torch.all(true <= tol)
    assert torch.equal(result.converged, result.residuals <= tol)
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(len(vectors), dtype=F64), rtol=0, atol=SQRT_EPS)


@pytest.mark.parametrize("build", TRAINED)
def test_top_10_match_eigvalsh_of_the_dense_hessian(build):
    problem = build()
    result = top_eigenvalues(_hessian_operator(problem), 10, tol=1e-6)
    exact = problem.eigenvalues.flip(0)[:10]
    assert result.all_converged and result.which == "largest"
    assert torch.all(result.eigenvalues[:-1] >= result.eigenvalues[1:])
    assert torch.all((result.eigenvalues - exact).abs() <= 1e-6 * exact.abs())
    _assert_certified(result, problem.hessian, 1e-6, problem.eigenvalues)
    # Measured 38 (digits) and 47 (mixture), of which 10 each check for missed eigenvalues; a regression guard
    assert result.num_matvecs <= 80
    assert result.seconds > 0


@pytest.mark.parametrize("build", TRAINED)
def test_smallest_eigenvalues_match_eigvalsh(build):
    problem = build()
    result = top_eigenvalues(_hessian_operator(problem), 2, tol=1e-6, which="smallest")
    exact = problem.eigenvalues[:2]
    assert exact[0] < 0 and result.all_converged and result.which == "smallest"
    assert result.eigenvalues[0] <= result.eigenvalues[1]
    assert torch.all((result.eigenvalues - exact).abs() <= 1e-6 * exact.abs())
    _assert_certified(result, problem.hessian, 1e-6, problem.eigenvalues)


def test_warm_start_at_the_same_point_needs_fewer_products():
    problem = cases.trained_digits()
    op = _hessian_operator(problem)
    cold = top_eigenvalues(op, 10)
    warm = top_eigenvalues(op, 10, v0=cold.eigenvectors, verify=False)
    assert warm.all_converged
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-9, atol=0)
    assert warm.num_matvecs == 10  # one block: the Rayleigh-Ritz pairs on the span of v0 are certified


@pytest.mark.parametrize("as_block", [True, False], ids=["block", "sum"])
def test_a_warm_start_spanning_an_invariant_subspace_still_finds_a_larger_eigenvalue(as_block):
    """v0 spans eigenvectors 2..11 exactly: its Krylov space is invariant. The solver notices (no new
    direction), continues from a fresh random direction, and stops only once that part converged too."""
    problem = cases.trained_mixture()
    op = _hessian_operator(problem)
    exact, vectors = torch.linalg.eigh(problem.hessian)
    inside = vectors.flip(1)[:, 1:11].T
    result = top_eigenvalues(op, 10, v0=inside if as_block else inside.sum(dim=0))
    assert result.all_converged
    assert torch.all((result.eigenvalues - exact.flip(0)[:10]).abs() <= 1e-6 * exact[-1])


def test_a_warm_start_missing_lambda_1_is_caught_by_the_invariance_guard():
    """Eigenvectors 2..11 to 1e-10 as v0: after one block every pair of the basis has converged, so the
    solver looks from a fresh direction and finds lambda_1. Without the guard it reports pairs 2..11."""
    problem = cases.trained_mixture()
    op = _hessian_operator(problem)
    vectors = top_eigenvalues(op, 11, tol=1e-10).eigenvectors
    exact = problem.eigenvalues.flip(0)
    guarded = top_eigenvalues(op, 10, v0=vectors[1:11])
    assert guarded.all_converged and guarded.num_matvecs > 10
    assert torch.all((guarded.eigenvalues - exact[:10]).abs() <= 1e-6 * exact[0])
    unguarded = top_eigenvalues(op, 10, v0=vectors[1:11], verify=False)
    assert unguarded.all_converged and unguarded.num_matvecs == 10
    torch.testing.assert_close(unguarded.eigenvalues, exact[1:11], rtol=1e-8, atol=0)


def test_warm_start_after_sgd_steps_needs_fewer_products():
    problem = cases.trained_mixture()
    before = top_eigenvalues(_hessian_operator(problem), 10)
    model = problem.model()
    x, y = cases.gaussian_mixture(1000, 4, 10)
    cases.train(model, x, y, steps=20, lr=0.1)
    op = _hessian_operator(problem, model)
    # Without the check for missed eigenvalues, which costs both about the same.
    cold = top_eigenvalues(op, 10, verify=False)
    warm = top_eigenvalues(op, 10, v0=before.eigenvectors.sum(dim=0), verify=False)  # one vector: the fewest
    assert cold.all_converged and warm.all_converged
    assert (cold.eigenvalues - before.eigenvalues).abs().max() > 1e-4 * before.eigenvalues[0]  # the point moved
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-9, atol=0)
    assert warm.num_matvecs < 0.85 * cold.num_matvecs  # measured 29 vs 37


def test_v0_accepts_a_vector_or_a_block_and_rejects_a_wrong_length():
    matrix = cases.matrix_with_spectrum(torch.linspace(-1, 10, 60))
    op = cases.MatrixOperator(matrix)
    exact = torch.linalg.eigvalsh(matrix).flip(0)[:3]
    generator = torch.Generator().manual_seed(1)
    for v0 in (torch.randn(60, generator=generator, dtype=F64), torch.randn(3, 60, generator=generator),
               torch.zeros(2, 60)):
        result = top_eigenvalues(op, 3, v0=v0, tol=1e-10)
        assert result.all_converged
        torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="v0"):
        top_eigenvalues(op, 3, v0=torch.ones(59))


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({"k": 0}, "k=0", id="k-zero"),
    pytest.param({"k": 31}, "k=31", id="k-above-P"),
    pytest.param({"k": 2.0}, "k=2.0", id="k-not-int"),
    pytest.param({"k": 2, "tol": 0.0}, "tol=0.0", id="tol-zero"),
    pytest.param({"k": 2, "tol": -1e-6}, "tol=", id="tol-negative"),
    pytest.param({"k": 2, "tol": math.nan}, "tol=nan", id="tol-nan"),
    pytest.param({"k": 2, "which": "top"}, "which='top'", id="which-unknown"),
    pytest.param({"k": 5, "max_matvecs": 4}, "max_matvecs=4", id="max-matvecs-below-k"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    op = cases.MatrixOperator(cases.matrix_with_spectrum(range(30)))
    with pytest.raises(ValueError, match=match):
        top_eigenvalues(op, **kwargs)
    assert op.num_matvecs == 0  # checked before any product


def test_too_few_products_leave_pairs_unconverged():
    problem = cases.trained_mixture()
    result = top_eigenvalues(_hessian_operator(problem), 10, max_matvecs=12)
    assert result.num_matvecs == 12
    assert not result.all_converged
    assert torch.equal(result.converged, result.residuals <= 1e-6)
    assert result.eigenvectors.shape == (10, problem.hessian.shape[0])
    vectors = result.eigenvectors
    true = (vectors @ problem.hessian - result.eigenvalues[:, None] * vectors).norm(dim=1) / problem.eigenvalues.max()
    torch.testing.assert_close(result.residuals, true, rtol=1e-3, atol=1e-12)


def test_converged_part_keeps_the_converged_pairs_and_copies_nothing_when_all_converged():
    problem = cases.trained_mixture()
    partial = top_eigenvalues(_hessian_operator(problem), 10, max_matvecs=12)
    kept = partial.converged_part()
    assert kept is not None and len(kept.eigenvalues) == int(partial.converged.sum()) < 10
    assert torch.equal(kept.eigenvectors, partial.eigenvectors[partial.converged])
    complete = top_eigenvalues(_hessian_operator(problem), 3)
    assert complete.all_converged and complete.converged_part() is complete  # no copy of k parameter vectors


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_tiny_operator_with_repeated_eigenvalues_up_to_k_equal_p(which):
    # Multiplicities make the Krylov space invariant after 6 steps: the recursion must restart.
    spectrum = torch.tensor([5.0, 5.0, 5.0, 3.0, 3.0, 1.0, 0.0, 0.0, -1.0, -2.0, -2.0, 4.0], dtype=F64)
    matrix = cases.matrix_with_spectrum(spectrum)
    result = top_eigenvalues(cases.MatrixOperator(matrix), 12, which=which, tol=1e-10)
    expected = spectrum.sort(descending=which == "largest").values
    assert result.all_converged and result.num_matvecs == 12
    torch.testing.assert_close(result.eigenvalues, expected, rtol=0, atol=1e-10)
    _assert_certified(result, matrix, tol=1e-10)


def test_tiny_network_up_to_k_equal_p():
    model = torch.nn.Linear(3, 4)  # P = 16; softmax cross-entropy leaves a null space
    batches = cases.split(*cases.gaussian_mixture(10, 4, 3), [10])
    op = HessianOperator(model, cases.cross_entropy, batches, dtype=F64)
    result = top_eigenvalues(op, 16, tol=1e-8)
    exact = torch.linalg.eigvalsh(cases.autograd_hessian(model, cases.cross_entropy, batches)).flip(0)
    torch.testing.assert_close(result.eigenvalues, exact, rtol=0, atol=1e-10 * exact[0])
    assert result.all_converged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_spectra_with_decaying_top_and_negative_tail(seed):
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.randn(190, generator=generator, dtype=F64) * 0.05
    spectrum = torch.cat([10.0 * 0.8 ** torch.arange(10, dtype=F64), bulk, torch.tensor([-1.0], dtype=F64)])
    matrix = cases.matrix_with_spectrum(spectrum, seed=seed)
    op = cases.MatrixOperator(matrix)
    top = top_eigenvalues(op, 5, tol=1e-8, seed=seed)
    bottom = top_eigenvalues(op, 1, tol=1e-8, which="smallest", seed=seed)
    torch.testing.assert_close(top.eigenvalues, spectrum[:5], rtol=1e-12, atol=0)
    torch.testing.assert_close(bottom.eigenvalues, torch.tensor([-1.0], dtype=F64), rtol=1e-12, atol=0)
    _assert_certified(top, matrix, tol=1e-8)
    _assert_certified(bottom, matrix, tol=1e-8)


def test_the_seed_reproduces_and_the_global_rng_is_untouched():
    op = cases.MatrixOperator(cases.matrix_with_spectrum(torch.linspace(0, 1, 80) ** 3))
    state = torch.get_rng_state()
    first, second = top_eigenvalues(op, 4, seed=3), top_eigenvalues(op, 4, seed=3)
    other = top_eigenvalues(op, 4, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.eigenvalues, second.eigenvalues) and first.num_matvecs == second.num_matvecs
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    assert not torch.equal(first.eigenvectors, other.eigenvectors)


def _orthogonality_loss(basis):
    """max |Q^T Q - I| over the ``(S, m, P)`` bases."""
    gram = torch.einsum("smp,snp->smn", basis, basis)
    return float((gram - torch.eye(basis.shape[1], dtype=basis.dtype)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_stored_basis_stays_orthonormal_and_the_plain_recursion_does_not(dtype):
    """80 steps on a spectrum whose outliers converge early, which is when plain Lanczos loses
    orthogonality: with reorthogonalize the basis stays orthonormal; the plain recursion, run from the
    same starts, loses it and its T holds copies ("ghosts") of the top eigenvalue."""
    spectrum = torch.cat([10.0 * 0.7 ** torch.arange(8, dtype=F64), torch.linspace(-0.1, 0.5, 392, dtype=F64)])
    op = cases.MatrixOperator(cases.matrix_with_spectrum(spectrum, seed=1).to(dtype))
    start = torch.randn(3, 400, generator=torch.Generator().manual_seed(0), dtype=F64)
    stored = Lanczos(op, start, generator=torch.Generator().manual_seed(1), reorthogonalize=True, capacity=80)
    plain = Lanczos(op, start, generator=torch.Generator().manual_seed(1), basis_dtype=dtype)
    for _ in range(80):
        stored.step()
        plain.step()
    assert _orthogonality_loss(stored.basis) <= 1e-12
    with pytest.raises(AttributeError, match="reorthogonalize=True"):
        _ = plain.basis
    nodes = tridiagonal_quadrature(plain)[0]
    assert int((nodes > 0.999 * 10.0).sum(dim=1).max()) >= 2  # ghosts of lambda_1 = 10
    assert int((tridiagonal_quadrature(stored)[0] > 0.999 * 10.0).sum(dim=1).max()) == 1


def test_float32_rounding_floor_stops_the_solver_and_is_reported():
    """A tolerance below float32's rounding cannot be certified: the solver stops once the recurrence
    has converged to the floor, well before max_matvecs, and says the pairs did not converge. The
    residuals against the exact matrix exceed the reported ones (measured 1e-7 against 1e-8) by no
    more than the rounding of the matrix itself to float32."""
    spectrum = torch.cat([10.0 * 0.8 ** torch.arange(5, dtype=F64), torch.linspace(-0.5, 1.0, 395, dtype=F64)])
    matrix = cases.matrix_with_spectrum(spectrum, seed=3)
    result = top_eigenvalues(cases.MatrixOperator(matrix.float()), 3, tol=1e-10, max_matvecs=300)
    assert result.num_matvecs < 100 and not result.converged.any()
    assert torch.all(result.residuals < 1e-5)
    vectors = result.eigenvectors
    true = (vectors @ matrix - result.eigenvalues[:, None] * vectors).norm(dim=1) / spectrum.abs().max()
    assert torch.all(true <= result.residuals + 10 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(result.eigenvalues, spectrum[:3], rtol=1e-5, atol=0)


def test_a_tight_cluster_at_the_top_over_hundreds_of_steps():
    """20 eigenvalues within 1e-3 of each other need 270 steps: the orthogonality estimate must keep up
    with the rounding (its noise term grows with sqrt(P)), or ghosts above lambda_max appear."""
    generator = torch.Generator().manual_seed(2)
    bulk = torch.rand(280, generator=generator, dtype=F64) * 0.99
    spectrum = torch.cat([torch.linspace(1.001, 1.0, 20, dtype=F64), bulk])
    matrix = cases.matrix_with_spectrum(spectrum, seed=2)
    result = top_eigenvalues(cases.MatrixOperator(matrix), 20, tol=1e-6, seed=2)
    assert result.all_converged and result.num_matvecs > 200
    torch.testing.assert_close(result.eigenvalues, spectrum.sort(descending=True).values[:20], rtol=1e-10, atol=0)
    _assert_certified(result, matrix, 1e-6)


@pytest.mark.parametrize(("basis_dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-8)])
def test_tolerances_below_sqrt_eps_of_the_basis_are_reached(basis_dtype, tol):
    """What reorthogonalization removes enters the residuals, so it is kept below tol."""
    generator = torch.Generator().manual_seed(7)
    spectrum = torch.cat([torch.tensor([19.0, 15.0, 11.0, 7.0, 4.0], dtype=F64),
                          torch.rand(395, generator=generator, dtype=F64) * 2 - 0.5])
    matrix = cases.matrix_with_spectrum(spectrum, seed=1)
    result = top_eigenvalues(cases.MatrixOperator(matrix), 5, tol=tol, seed=1, basis_dtype=basis_dtype)
    assert result.all_converged
    true = (result.eigenvectors.double() @ matrix - result.eigenvalues[:, None] * result.eigenvectors.double())
    assert torch.all(true.norm(dim=1) / 19.0 <= 2 * tol)


def test_a_start_inside_an_invariant_subspace_does_not_hide_larger_eigenvalues():
    """A Rademacher start can be an eigenvector (here of [[2, 1], [1, 2]], seed 0 draws (-1, 1)); the
    recursion breaks down, restarts from a fresh direction, and that block must converge too."""
    pair = top_eigenvalues(cases.MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)), 1, seed=0)
    assert pair.eigenvalues.tolist() == pytest.approx([3.0]) and pair.all_converged
    # Two identical units: the start's symmetric part spans an invariant subspace for some seeds.
    unit = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]], dtype=F64)
    matrix = torch.kron(torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64), unit)
    exact = torch.linalg.eigvalsh(matrix).flip(0)[:2]
    for seed in range(50):
        result = top_eigenvalues(cases.MatrixOperator(matrix), 2, tol=1e-8, seed=seed)
        torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-8, atol=0)


def test_a_low_rank_operator_stops_once_its_range_is_spanned():
    """A Gauss-Newton matrix of rank 14 (2 samples, 8 classes) at P = 692: once the Krylov space holds
    the range every new product lies in it, and the solver stops (it used to spend its whole cap)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 36), torch.nn.Tanh(), torch.nn.Linear(36, 8)).double()
    batches = [(torch.randn(2, 10, dtype=F64), torch.tensor([0, 3]))]
    ggn = GGNOperator(model, lambda m, b: m(b[0]), lambda f, b: torch.nn.functional.cross_entropy(f, b[1]), batches)
    assert ggn.num_params == 692
    dense = dense_ggn(model, lambda m, b: m(b[0]), lambda f, b: torch.nn.functional.cross_entropy(f, b[1]), batches)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    assert int((exact > 1e-12 * exact[0]).sum()) == 14
    for k in (5, 20):
        result = top_eigenvalues(ggn, k)
        assert result.all_converged and result.num_matvecs <= k + 16  # measured 16 and 20
        torch.testing.assert_close(result.eigenvalues, exact[:k], rtol=1e-8, atol=1e-12 * float(exact[0]))
