"""Oracle tests for the class/cross-class decomposition: Gram eigenvalues vs a dense construction."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from lightning_hessian import class_structure, dense_ggn


def _logits(model, batch):
    return model(batch[0])


def _dense_parts(model, x, y, num_classes):
    """Per-sample delta vectors from explicit Jacobians, and G, G0, G1, G2 as dense matrices."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def outputs(theta):
        parts = {n: c.reshape(p.shape) for (n, p), c in zip(params.items(), theta.split(sizes), strict=True)}
        return functional_call(model, parts, (x,))

    jac = jacrev(outputs)(flat)  # [N, C, P]
    probs = torch.softmax(outputs(flat), dim=1)
    eye = torch.eye(num_classes, dtype=flat.dtype)
    delta = torch.stack(
        [probs[:, k : k + 1].sqrt() * torch.einsum("ncp,nc->np", jac, eye[k] - probs) for k in range(num_classes)],
        dim=1,
    )  # [N, C', P]
    weights = torch.stack([(y == c).double().mean() for c in range(num_classes)])
    means = torch.stack([delta[y == c].mean(dim=0) for c in range(num_classes)])  # [C, C', P]
    class_mean = torch.stack([(means[c].sum(0) - means[c, c]) / (num_classes - 1) for c in range(num_classes)])
    pairs = [(c, k) for c in range(num_classes) for k in range(num_classes) if k != c]
    g0 = sum(weights[c] * torch.outer(means[c, c], means[c, c]) for c in range(num_classes))
    g1 = sum(weights[c] * (num_classes - 1) * torch.outer(class_mean[c], class_mean[c]) for c in range(num_classes))
    g2 = sum(weights[c] * torch.outer(means[c, k] - class_mean[c], means[c, k] - class_mean[c]) for c, k in pairs)
    full = torch.einsum("nkp,nkq->pq", delta, delta) / x.shape[0]
    return means, full, {"g0": g0, "g1": g1, "g2": g2}


@pytest.mark.parametrize("num_classes", [2, 4], ids=["C2", "C4"])
def test_matches_dense_construction(num_classes):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, num_classes)).double()
    x = torch.randn(61, 5, dtype=torch.float64)
    y = torch.randint(0, num_classes, (61,))
    y[:num_classes] = torch.arange(num_classes)
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]

    result = class_structure(model, _logits, batches, num_classes)
    means, full, parts = _dense_parts(model, x, y, num_classes)

    torch.testing.assert_close(result.class_means, means, rtol=0, atol=1e-12)
    ggn = dense_ggn(model, _logits, lambda f, b: F.cross_entropy(f, b[1]), batches)
    torch.testing.assert_close(full, ggn, rtol=0, atol=1e-12)
    for name in ("g0", "g1", "g2"):
        exact = torch.linalg.eigvalsh(parts[name]).flip(0).clamp_min(0)
        estimate = getattr(result, name)
        torch.testing.assert_close(estimate, exact[: estimate.numel()], rtol=0, atol=1e-12)
        factor = result.factors()[name]
        torch.testing.assert_close(factor.T @ factor, parts[name], rtol=0, atol=1e-12)
    assert result.g1.numel() == num_classes and result.g2.numel() == num_classes * (num_classes - 1)
    # The between-class part is dominated by G: its top eigenvalue cannot exceed G's.
    assert result.between[0] <= torch.linalg.eigvalsh(ggn)[-1] + 1e-12


def test_model_untouched_and_errors():
    model = nn.Sequential(nn.Linear(3, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(12, 3), torch.arange(12) % 3
    class_structure(model, _logits, [(x, y)], 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="num_classes"):
        class_structure(model, _logits, [(x, y)], 4)
    with pytest.raises(ValueError, match=r"classes \[2\] have no sample"):
        class_structure(model, _logits, [(x, y % 2)], 3)
    with pytest.raises(ValueError, match="num_classes"):
        class_structure(model, _logits, [(x, y)], 1)
