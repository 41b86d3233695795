"""What only TensorBoard shows: the custom-scalars layout and raw histograms."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from lightning_hessian.loggers.figures import Histogram

# The custom-scalars layout written so far to each SummaryWriter. TensorBoard reads one layout per run
# (the last one written), so a second callback in the same Trainer adds its categories to the first one's.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = weakref.WeakKeyDictionary()


def write_tensorboard_layout(writer: Any, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """Add ``layout``'s categories to what ``writer`` (a ``SummaryWriter``) shows in "Custom Scalars".

    The layout is merged with those written before to the same writer (a chart of the same category
    and title is replaced) and written again only when that changes something.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
        >>> from lightning_hessian.loggers.tags import tensorboard_layout
        >>> writer = SummaryWriter(tempfile.mkdtemp())
        >>> write_tensorboard_layout(writer, {"run": {"loss": ["Multiline", ["^train/loss$", "^val/loss$"]]}})
        >>> write_tensorboard_layout(writer, tensorboard_layout("hessian", k=2))
        >>> write_tensorboard_layout(writer, tensorboard_layout("hessian", k=2))  # nothing new: not written
        >>> writer.flush()
        >>> events = EventAccumulator(writer.log_dir)
        >>> _ = events.Reload()
        >>> written = events.Tensors("custom_scalars__config__")
        >>> len(written), [c.title for c in Layout.FromString(written[-1].tensor_proto.string_val[0]).category]
        (2, ['run', 'hessian: spectrum', 'hessian: cost'])
    """
    written = _LAYOUTS.get(writer, {})
    merged = {category: dict(charts) for category, charts in written.items()}
    for category, charts in layout.items():
        merged.setdefault(category, {}).update(charts)
    if merged != written:
        writer.add_custom_scalars(merged)
        _LAYOUTS[writer] = merged


def add_histogram(writer: Any, tag: str, histogram: Histogram | None, step: int) -> None:
    """Write a histogram of eigenvalue counts ``(edges, counts)`` to ``writer`` as it is (no rebinning).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> writer = SummaryWriter(tempfile.mkdtemp())
        >>> edges = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
        >>> add_histogram(writer, "hessian/density", (edges, torch.tensor([0.0, 3.0, 1.0])), step=2)
        >>> writer.flush()
        >>> events = EventAccumulator(writer.log_dir)
        >>> _ = events.Reload()
        >>> (event,) = events.Histograms("hessian/density")
        >>> event.step, event.histogram_value.num, event.histogram_value.min
        (2, 4.0, 1.0)
    """
    if histogram is None:
        return
    edges, counts = histogram
    centres = (edges[1:] + edges[:-1]) / 2
    filled = torch.nonzero(counts > 0).flatten()
    # TensorBoard drops empty buckets at both ends and stretches the outermost filled ones to min and
    # max: give it the filled range, so that a point mass keeps its narrow bucket.
    low, high = (int(filled[0]), int(filled[-1])) if filled.numel() else (0, counts.numel() - 1)
    writer.add_histogram_raw(
        tag, min=float(edges[low]), max=float(edges[high + 1]), num=float(counts.sum()),
        sum=float((counts * centres).sum()), sum_squares=float((counts * centres**2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step,
    )
