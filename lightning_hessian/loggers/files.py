"""Files: strict JSON for the history and the paper's results."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch


def json_ready(value: Any, *, significant_digits: int | None = None) -> Any:
    """A copy fit for strict JSON: tensors as lists, non-finite floats as ``None``, floats rounded if asked.

    Example:
        >>> json_ready({"a": float("nan"), "b": [1.23456789]}, significant_digits=3)
        {'a': None, 'b': [1.23]}
    """
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist(), significant_digits=significant_digits)
    if isinstance(value, Mapping):
        return {str(k): json_ready(v, significant_digits=significant_digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, significant_digits=significant_digits) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{significant_digits}g}") if significant_digits is not None else value
    return value


def write_json(path: str | os.PathLike, payload: Any, *, significant_digits: int | None = None) -> None:
    """Write ``payload`` as strict JSON (NaN and infinities as ``null``), creating the folder.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "runs", "history.json")  # the folder is created
        >>> write_json(path, {"eig_1": [2.123456, float("nan")]}, significant_digits=3)
        >>> with open(path) as handle:
        ...     json.load(handle)
        {'eig_1': [2.12, None]}
    """
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(json_ready(payload, significant_digits=significant_digits), handle, allow_nan=False, indent=1)
