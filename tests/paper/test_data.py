"""Data modules: deterministic splits, scaling from training statistics, class restriction, loaders."""

import pytest
import torch
from sklearn.datasets import load_digits

from lightning_hessian.paper.data import (
    DigitsDataModule,
    GaussianMixtureDataModule,
    digits_tensors,
    gaussian_mixture_tensors,
)


def test_digits_split_follows_scikit_learn_order():
    images, labels = load_digits(return_X_y=True)
    x, y, x_test, y_test = digits_tensors(num_train=1000, scaling="unit")
    assert x.shape == (1000, 64) and x_test.shape == (797, 64)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.as_tensor(labels[:1000]))
    assert torch.equal(y_test, torch.as_tensor(labels[1000:]))
    torch.testing.assert_close(x, torch.as_tensor(images[:1000], dtype=torch.float32) / 16)
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_digits_standardized_with_training_statistics():
    x, _, x_test, _ = digits_tensors()
    varying = x.std(0) > 0
    torch.testing.assert_close(x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-5, rtol=0)
    # The test split reuses the training statistics, so it is not exactly centred.
    assert float(x_test.mean(0).abs().max()) > 1e-3


@pytest.mark.parametrize(("classes", "digits"), [(4, [0, 1, 2, 3]), ([7, 3], [3, 7])], ids=["first-four", "list"])
def test_digits_restricted_to_classes_and_relabelled(classes, digits):
    images, labels = load_digits(return_X_y=True)
    kept = [i for i, label in enumerate(labels) if label in digits]
    x, y, _, y_test = digits_tensors(classes, num_train=0.5, scaling="unit")
    assert len(y) + len(y_test) == len(kept) and len(y) == round(0.5 * len(kept))
    expected = torch.tensor([digits.index(labels[i]) for i in kept])
    assert torch.equal(torch.cat([y, y_test]), expected)
    torch.testing.assert_close(x[0], torch.as_tensor(images[kept[0]], dtype=torch.float32) / 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": 1}, "classes=1"),
        ({"classes": [3, 12]}, "classes="),
        ({"classes": 2, "num_train": 1000}, "num_train=1000"),
        ({"num_train": 1.5}, "fraction"),
        ({"scaling": "minmax"}, "scaling"),
    ],
    ids=["one-class", "digit-out-of-range", "too-many-train", "bad-fraction", "bad-scaling"],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits_tensors(**kwargs)


def test_mixture_is_deterministic_and_split_in_order():
    first = gaussian_mixture_tensors(num_classes=3, dim=5, num_samples=300, seed=4, test_fraction=0.2)
    again = gaussian_mixture_tensors(num_classes=3, dim=5, num_samples=300, seed=4, test_fraction=0.2)
    other = gaussian_mixture_tensors(num_classes=3, dim=5, num_samples=300, seed=5, test_fraction=0.2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    x, y, x_test, _ = first
    assert x.shape == (240, 5) and x_test.shape == (60, 5)
    assert set(y.tolist()) == {0, 1, 2}
    torch.testing.assert_close(x.mean(0), torch.zeros(5), atol=1e-5, rtol=0)


def _nearest_mean_accuracy(split):
    x, y, x_test, y_test = split
    means = torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])
    return float((torch.cdist(x_test, means).argmin(1) == y_test).float().mean())


def test_mixture_spread_sets_separation():
    tight = _nearest_mean_accuracy(gaussian_mixture_tensors(4, 10, 1000, cluster_std=1.0))
    loose = _nearest_mean_accuracy(gaussian_mixture_tensors(4, 10, 1000, cluster_std=8.0))
    assert tight > 0.99 and loose < 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 1}, "num_classes"), ({"cluster_std": 0.0}, "cluster_std"), ({"test_fraction": 1.0}, "empty")],
)
def test_mixture_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mixture_tensors(**kwargs)
    with pytest.raises(ValueError, match=match):
        GaussianMixtureDataModule(**kwargs)


def _order(module):
    return torch.cat([y for _, y in module.train_dataloader()])


def test_digits_module_loaders_are_seeded():
    module = DigitsDataModule(classes=3, num_train=200, batch_size=16, seed=1, scaling="unit")
    assert module.num_classes == 3 and module.num_features == 64
    first = next(iter(module.train_dataloader()))
    assert first[0].shape == (16, 64)
    assert torch.equal(_order(module), _order(DigitsDataModule(3, 200, 16, seed=1, scaling="unit")))
    assert not torch.equal(_order(module), _order(DigitsDataModule(3, 200, 16, seed=2, scaling="unit")))
    held_out = torch.cat([y for _, y in module.val_dataloader()])
    assert torch.equal(held_out, module.split[3])
    assert torch.equal(torch.cat([y for _, y in module.test_dataloader()]), held_out)


def test_modules_reject_bad_arguments_early():
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="scaling"):
        DigitsDataModule(scaling="none")
    with pytest.raises(ValueError, match="classes"):
        DigitsDataModule(classes=[5])
