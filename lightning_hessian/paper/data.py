"""The paper's data, offline: scikit-learn digits and Gaussian mixtures, with deterministic splits.

Symbols: n samples, d input features, C classes.

Inputs are standardized feature by feature with the *training* statistics (features that are
constant on the training set are only centred), as the authors' code standardizes its blobs; digits
can instead keep their pixel scale (``scaling="unit"``: values in [0, 1]), as the pilot runs did. Splits
depend only on the arguments, never on a global random state: digits keep scikit-learn's order (the
first ``num_train`` kept images train, the rest test); mixtures are drawn with
:func:`sklearn.datasets.make_blobs` under ``seed`` (the generator the authors' code uses) and split
in drawing order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

Split = tuple[Tensor, Tensor, Tensor, Tensor]

DIGITS_CLASSES = 10
DIGITS_FEATURES = 64
DIGITS_SAMPLES = 1797
DIGITS_PIXEL_MAX = 16.0
DigitsScaling = Literal["standardize", "unit"]


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and scale both parts with the training mean and standard deviation per feature."""
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


def _class_list(classes: int | Sequence[int] | None) -> list[int]:
    """Normalize the ``classes`` argument of :func:`digits_tensors` to a sorted list of digit labels."""
    if classes is None:
        return list(range(DIGITS_CLASSES))
    if isinstance(classes, int):
        if not 2 <= classes <= DIGITS_CLASSES:
            raise ValueError(f"classes={classes} must be between 2 and {DIGITS_CLASSES} (digits 0..classes-1)")
        return list(range(classes))
    chosen = sorted(set(int(c) for c in classes))
    if len(chosen) < 2 or chosen[0] < 0 or chosen[-1] >= DIGITS_CLASSES:
        raise ValueError(
            f"classes={list(classes)!r} must name at least two distinct digits in 0..{DIGITS_CLASSES - 1}"
        )
    return chosen


def _check_scaling(scaling: str) -> None:
    if scaling not in ("standardize", "unit"):
        raise ValueError(f"scaling={scaling!r} must be 'standardize' or 'unit'")


def digits_tensors(
    classes: int | Sequence[int] | None = None,
    num_train: int | float = 1000,
    scaling: DigitsScaling = "standardize",
) -> Split:
    """The scikit-learn digits (8x8 images, bundled with scikit-learn) as float32 tensors.

    Args:
        classes: ``None`` for all ten digits, an int ``k`` for digits ``0..k-1``, or a list of digits.
        num_train: the first ``num_train`` kept images (scikit-learn's order) train, the rest test;
            a float in (0, 1) is a fraction of the kept images (all ten digits: 1797 images, so
            ``1000`` and ``0.5565`` agree; digits 0 and 1 alone have 360).
        scaling: ``"standardize"`` (each pixel centred and scaled with the training statistics) or
            ``"unit"`` (pixel values 0..16 divided by 16, in [0, 1]: the scaling of the pilot runs of
            this reproduction, whose spectra show the paper's outliers after 30 epochs; standardized
            inputs train faster, the loss falls near zero and the outliers shrink into the bulk).

    Returns:
        ``(x_train [n, 64] float32, y_train [n] int64, x_test [m, 64] float32, y_test [m] int64)``;
        labels are relabelled ``0..C-1`` in increasing digit order.

    Raises:
        ValueError: if ``classes`` names fewer than two digits or digits outside 0..9, if
            ``num_train`` leaves no test image, or for an unknown ``scaling``.

    Example:
        >>> x, y, xt, yt = digits_tensors(classes=2, num_train=200)
        >>> tuple(x.shape), sorted(set(y.tolist())), x.dtype
        ((200, 64), [0, 1], torch.float32)
    """
    from sklearn.datasets import load_digits

    _check_scaling(scaling)
    chosen = _class_list(classes)
    images, labels = load_digits(return_X_y=True)
    keep = torch.isin(torch.as_tensor(labels), torch.tensor(chosen))
    x = torch.as_tensor(images, dtype=torch.float32)[keep]
    relabel = {digit: index for index, digit in enumerate(chosen)}
    y = torch.tensor([relabel[int(label)] for label in labels[keep.numpy()]], dtype=torch.int64)
    if isinstance(num_train, float):
        if not 0 < num_train < 1:
            raise ValueError(f"num_train={num_train} as a float is a fraction and must lie in (0, 1)")
        num_train = round(num_train * len(y))
    if not 1 <= num_train < len(y):
        raise ValueError(
            f"num_train={num_train} must be between 1 and {len(y) - 1}: these classes have {len(y)} images "
            "and at least one must be left for the test split"
        )
    if scaling == "unit":
        x_train, x_test = x[:num_train] / DIGITS_PIXEL_MAX, x[num_train:] / DIGITS_PIXEL_MAX
    else:
        x_train, x_test = _standardize(x[:num_train], x[num_train:])
    return x_train, y[:num_train], x_test, y[num_train:]


def _check_mixture(num_classes: int, dim: int, num_samples: int, cluster_std: float, test_fraction: float) -> int:
    """Validate the mixture arguments; return the number of test samples."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    if dim < 1 or cluster_std <= 0:
        raise ValueError(f"dim={dim} and cluster_std={cluster_std} must be positive")
    num_test = round(test_fraction * num_samples)
    if not 0 < num_test < num_samples:
        raise ValueError(
            f"test_fraction={test_fraction} with num_samples={num_samples} leaves an empty split; "
            "use 0 < test_fraction < 1 and more samples"
        )
    return num_test


def gaussian_mixture_tensors(
    num_classes: int = 4,
    dim: int = 10,
    num_samples: int = 1000,
    cluster_std: float = 1.0,
    seed: int = 0,
    test_fraction: float = 0.5,
) -> Split:
    """One isotropic Gaussian cluster per class (``make_blobs``), standardized, split train/test.

    Cluster centres are drawn uniformly in ``[-10, 10]^dim`` (scikit-learn's default box), so
    ``cluster_std`` sets the separation: 1 gives well separated clusters, 6 heavily overlapping ones.

    Args:
        num_classes: C, the number of clusters (one class each).
        dim: d, the input dimension.
        num_samples: samples drawn in total, before the split.
        cluster_std: standard deviation of each cluster.
        seed: seeds the centres and the samples.
        test_fraction: the last ``round(test_fraction * num_samples)`` drawn samples form the test split.

    Returns:
        ``(x_train [n, d] float32, y_train [n] int64, x_test [m, d] float32, y_test [m] int64)``.

    Raises:
        ValueError: for fewer than two classes, a non-positive size or spread, or a split that leaves
            either part empty.
    """
    from sklearn.datasets import make_blobs

    num_test = _check_mixture(num_classes, dim, num_samples, cluster_std, test_fraction)
    x, y = make_blobs(
        n_samples=num_samples, n_features=dim, centers=num_classes, cluster_std=cluster_std, random_state=seed
    )
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    num_train = num_samples - num_test
    x_train, x_test = _standardize(x[:num_train], x[num_train:])
    return x_train, y[:num_train], x_test, y[num_train:]


class _TensorDataModule(pl.LightningDataModule):
    """Train/val/test loaders over a fixed split; validation and test both use the held-out part."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.seed = seed
        self._split: Split | None = None

    def _make_split(self) -> Split:
        raise NotImplementedError

    @property
    def split(self) -> Split:
        """``(x_train, y_train, x_test, y_test)``, built on first use."""
        if self._split is None:
            self._split = self._make_split()
        return self._split

    @property
    def num_features(self) -> int:
        """d, the input dimension."""
        return self.split[0].shape[1]

    def train_dataloader(self) -> DataLoader:
        x, y, _, _ = self.split
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True, generator=generator)

    def _held_out(self) -> DataLoader:
        _, _, x, y = self.split
        return DataLoader(TensorDataset(x, y), batch_size=max(self.batch_size, 256))

    def val_dataloader(self) -> DataLoader:
        return self._held_out()

    def test_dataloader(self) -> DataLoader:
        return self._held_out()


class DigitsDataModule(_TensorDataModule):
    """scikit-learn digits as a LightningDataModule (see :func:`digits_tensors`).

    Args:
        classes: ``None`` for all ten digits, ``k`` for digits ``0..k-1``, or a list of digits.
        num_train: training images (the first ones in scikit-learn's order), or a fraction of them
            as a float in (0, 1); the rest validate and test.
        batch_size: training batch size (held-out loaders use at least 256).
        seed: seeds the training loader's shuffle.
        scaling: ``"standardize"`` or ``"unit"`` (see :func:`digits_tensors`).
    """

    def __init__(
        self,
        classes: int | list[int] | None = None,
        num_train: int | float = 1000,
        batch_size: int = 32,
        seed: int = 0,
        scaling: DigitsScaling = "standardize",
    ) -> None:
        super().__init__(batch_size, seed)
        self.classes = _class_list(classes)
        self.num_train = num_train
        self.scaling = scaling
        _check_scaling(scaling)
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        """C, the number of classes kept."""
        return len(self.classes)

    def _make_split(self) -> Split:
        return digits_tensors(self.classes, self.num_train, self.scaling)


class GaussianMixtureDataModule(_TensorDataModule):
    """Gaussian-mixture classification data as a LightningDataModule (see :func:`gaussian_mixture_tensors`).

    Args:
        num_classes, dim, num_samples, cluster_std, seed, test_fraction: as in
            :func:`gaussian_mixture_tensors`; ``seed`` also seeds the training loader's shuffle.
        batch_size: training batch size (held-out loaders use at least 256).
    """

    def __init__(
        self,
        num_classes: int = 4,
        dim: int = 10,
        num_samples: int = 1000,
        cluster_std: float = 1.0,
        seed: int = 0,
        test_fraction: float = 0.5,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size, seed)
        self.num_classes = num_classes
        self.dim = dim
        self.num_samples = num_samples
        self.cluster_std = cluster_std
        self.test_fraction = test_fraction
        self.save_hyperparameters()
        _check_mixture(num_classes, dim, num_samples, cluster_std, test_fraction)

    def _make_split(self) -> Split:
        return gaussian_mixture_tensors(
            self.num_classes, self.dim, self.num_samples, self.cluster_std, self.seed, self.test_fraction
        )
