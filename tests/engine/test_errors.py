"""Bad input fails early with an error that names the problem, raised by the engine, not deep inside autograd."""

from pathlib import Path

import cases
import pytest
import torch
from torch import nn

import lightning_hessian.engine
from lightning_hessian import (
    GGNOperator,
    HessianOperator,
    NonFiniteError,
    dense_ggn,
    dense_hessian,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.engine.errors import all_finite

ENGINE = Path(lightning_hessian.engine.__file__).parent


def _raised_by_engine(excinfo):
    """The exception was raised by engine code (its last frame is an engine file) and wraps nothing."""
    assert Path(str(excinfo.traceback[-1].path)).parent == ENGINE, excinfo.traceback[-1]
    assert excinfo.value.__cause__ is None and excinfo.value.__context__ is None
    return True


def _model_and_batches():
    return cases.mlp((6, 5, 3)), cases.split(*cases.gaussian_mixture(20, 3, 6), [8, 12])


def _per_sample_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


# --- the list: non-scalar loss, no trainable parameters, k > P, non-finite loss or product -----


@pytest.mark.parametrize("run", [
    pytest.param(lambda m, b: HessianOperator(m, _per_sample_loss, b).matvec(torch.ones(53)), id="hessian-product"),
    pytest.param(lambda m, b: top_eigenvalues(HessianOperator(m, _per_sample_loss, b), 2), id="top-eigenvalues"),
    pytest.param(lambda m, b: spectral_density(HessianOperator(m, _per_sample_loss, b), num_steps=3), id="density"),
    pytest.param(lambda m, b: dense_hessian(m, _per_sample_loss, b), id="dense-hessian"),
    pytest.param(lambda m, b: GGNOperator(m, cases.outputs_of, lambda f, batch: (f - 1).pow(2), b)
                 .matvec(torch.ones(53)), id="ggn-product"),
    pytest.param(lambda m, b: dense_ggn(m, cases.outputs_of, lambda f, batch: (f - 1).pow(2), b), id="dense-ggn"),
])
def test_non_scalar_loss_names_the_shape_and_the_fix(run):
    model, batches = _model_and_batches()
    expected = r"must return a scalar tensor .* got \((8,|8, 3)\); reduce it with \.mean\(\)"
    with pytest.raises(ValueError, match=expected) as excinfo:
        run(model, batches)
    assert _raised_by_engine(excinfo)


def test_a_python_float_loss_is_rejected():
    model, batches = _model_and_batches()
    op = HessianOperator(model, lambda m, b: float(cases.cross_entropy(m, b).detach()), batches)
    with pytest.raises(ValueError, match=r"scalar tensor .* got float") as excinfo:
        op.matvec(torch.ones(op.num_params))
    assert _raised_by_engine(excinfo)


@pytest.mark.parametrize("build", [
    pytest.param(lambda: cases.mlp((6, 5, 3)).requires_grad_(False), id="all-frozen"),
    pytest.param(nn.ReLU, id="no-parameters"),
])
@pytest.mark.parametrize("make", [
    pytest.param(lambda m, b: HessianOperator(m, cases.cross_entropy, b), id="hessian"),
    pytest.param(lambda m, b: GGNOperator(m, cases.outputs_of, cases.cross_entropy_on_outputs, b), id="ggn"),
    pytest.param(lambda m, b: dense_hessian(m, cases.cross_entropy, b), id="dense"),
])
def test_no_trainable_parameters(build, make):
    with pytest.raises(ValueError, match="no parameter with requires_grad=True") as excinfo:
        make(build(), _model_and_batches()[1])
    assert _raised_by_engine(excinfo)


def test_k_larger_than_the_parameter_count():
    model, batches = _model_and_batches()
    op = HessianOperator(model, cases.cross_entropy, batches)
    with pytest.raises(ValueError, match=r"k=54 must be an integer between 1 and the number of parameters \(53\)"):
        top_eigenvalues(op, 54)
    assert op.num_matvecs == 0


@pytest.mark.parametrize("run", [
    pytest.param(lambda op: op.matvec(torch.ones(op.num_params)), id="product"),
    pytest.param(lambda op: top_eigenvalues(op, 2), id="top-eigenvalues"),
    pytest.param(lambda op: spectral_density(op, num_probes=2, num_steps=3), id="density"),
])
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_nan_inputs_give_a_non_finite_loss_error(run, operator):
    model, batches = _model_and_batches()
    batches[1][0][3, 2] = float("nan")
    op = (HessianOperator(model, cases.cross_entropy, batches) if operator == "hessian"
          else GGNOperator(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches))
    with pytest.raises(NonFiniteError, match=r"returned a non-finite loss \(nan\)") as excinfo:
        run(op)
    assert _raised_by_engine(excinfo)


def test_nan_inputs_in_the_dense_oracles():
    model, batches = _model_and_batches()
    batches[0][0][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="dense Hessian is not finite"):
        dense_hessian(model, cases.cross_entropy, batches)
    with pytest.raises(NonFiniteError, match="dense Gauss-Newton matrix is not finite"):
        dense_ggn(model, cases.outputs_of, cases.cross_entropy_on_outputs, batches)


@pytest.mark.parametrize("run", [
    pytest.param(lambda op: op.matvec(torch.ones(op.num_params)), id="product"),
    pytest.param(lambda op: top_eigenvalues(op, 2), id="top-eigenvalues"),
    pytest.param(lambda op: spectral_density(op, num_probes=2, num_steps=3), id="density"),
])
def test_non_finite_product_of_a_finite_loss(run):
    # |f|^1.5 at f = 0: the loss and its gradient are 0, its second derivative is infinite.
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    op = HessianOperator(model, lambda m, x: m(x).abs().pow(1.5).mean(), [torch.randn(5, 3)])
    with pytest.raises(NonFiniteError, match="product is not finite") as excinfo:
        run(op)
    assert _raised_by_engine(excinfo)
    assert op.num_matvecs == 0


# --- more bad input ------------------------------------------------------------------------------


def test_a_detached_loss_or_a_selection_the_loss_ignores():
    model, batches = cases.WithUnused(), cases.split(*cases.gaussian_mixture(20, 3, 6), [20])
    detached = HessianOperator(model, lambda m, b: cases.cross_entropy(m, b).detach(), batches)
    ignored = HessianOperator(model, cases.cross_entropy, batches, params=["unused"])
    for op in (detached, ignored):
        with pytest.raises(ValueError, match="does not depend on the selected parameters") as excinfo:
            op.matvec(torch.ones(op.num_params))
        assert _raised_by_engine(excinfo)
    ggn = GGNOperator(model, lambda m, b: cases.outputs_of(m, b).detach(), cases.cross_entropy_on_outputs, batches)
    with pytest.raises(ValueError, match="output_fn returned outputs that do not depend"):
        ggn.matvec(torch.ones(ggn.num_params))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    pytest.param({"params": "0.*"}, TypeError, "list of name patterns", id="params-string"),
    pytest.param({"params": ["fc.*"]}, ValueError, r"params=\['fc.\*'\] matches no parameter; the model has: 0.weight",
                 id="params-no-match"),
    pytest.param({"mode": "training"}, ValueError, "mode='training' must be 'eval' or 'train'", id="mode"),
    pytest.param({"dtype": torch.int64}, ValueError, "dtype=torch.int64 must be a floating dtype", id="dtype"),
])
def test_bad_operator_arguments(kwargs, error, match):
    model, batches = _model_and_batches()
    with pytest.raises(error, match=match):
        HessianOperator(model, cases.cross_entropy, batches, **kwargs)


def test_bad_batches_and_vectors():
    model, batches = _model_and_batches()
    with pytest.raises(ValueError, match="batches is empty"):
        HessianOperator(model, cases.cross_entropy, [])
    with pytest.raises(TypeError, match=r"cannot count the samples of a batch of type str.*num_samples_fn="):
        HessianOperator(model, cases.cross_entropy, ["not a batch"])
    op = HessianOperator(model, cases.cross_entropy, batches)
    with pytest.raises(ValueError, match=r"vectors have shape \(52,\); the operator takes \[P\] or \[P, S\]"):
        op.matvec(torch.ones(52))
    ggn = GGNOperator(model, lambda m, b: (m(b[0]),), cases.cross_entropy_on_outputs, batches)
    with pytest.raises(ValueError, match="output_fn must return a tensor of model outputs, got tuple"):
        ggn.matvec(torch.ones(53))


@pytest.mark.parametrize(("values", "finite"), [
    pytest.param([1.0, -2.0], True, id="finite"), pytest.param([], True, id="empty"),
    pytest.param([1.0, float("nan")], False, id="nan"), pytest.param([float("inf"), 1.0], False, id="inf"),
    pytest.param([1.0, -float("inf")], False, id="minus-inf"),
    pytest.param([float("nan"), float("inf")], False, id="nan-and-inf"),
])
def test_all_finite_finds_every_kind_of_non_finite_entry(values, finite):
    assert all_finite(torch.tensor(values)) is finite
