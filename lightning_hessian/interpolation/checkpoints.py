"""The endpoints of a line: checkpoint files read as data, checked against the template, tied weights once.

Checkpoints are read with ``torch.load(weights_only=True)`` (checkpoints are data, not code). A
tensor the template holds under several names (tied weights: a decoder sharing the embedding's
weight) is kept once, under its first name.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

ModelLike = nn.Module | str | os.PathLike


# torch.save writes a zip archive holding "<name>/data.pkl", or (legacy format) a pickle opening with this number.
_LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")


def _check_torch_file(path: Path) -> None:
    """Raise a ValueError naming ``path`` and what it holds unless :func:`torch.save` wrote it."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/data.pkl") for name in archive.namelist()):
                return
        found = "a zip archive without the data.pkl that torch.save writes"
    else:
        with path.open("rb") as handle:
            head = handle.read(32)
        if _LEGACY_MAGIC in head:
            return
        found = f"a file starting with {head[:16]!r}" if head else "an empty file"
    raise ValueError(
        f"{str(path)!r} is not a PyTorch checkpoint file: it is {found}. Expected a file written by torch.save: "
        "a Lightning .ckpt or torch.save(model.state_dict(), path)"
    )


def load_checkpoint_state(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The tensors of a checkpoint file: a Lightning ``.ckpt`` (its ``state_dict``) or a saved state dict.

    Loaded with ``torch.load(weights_only=True)``: tensors and plain Python values only.

    Args:
        path: the file, written by :func:`torch.save` (a Lightning ``.ckpt`` is one).
        map_location: the device the tensors are loaded onto (default the CPU).

    Returns:
        ``{name: tensor}`` in the file's order, shapes and dtypes as saved.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a PyTorch checkpoint (e.g. text, empty, or a NumPy ``.npy``),
            needs unpickling arbitrary Python objects (it is refused), or holds no state dict.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save(nn.Linear(3, 2).state_dict(), Path(folder) / "linear.pt")
        ...     state = load_checkpoint_state(Path(folder) / "linear.pt")
        >>> {name: tuple(tensor.shape) for name, tensor in state.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    _check_torch_file(path)
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: it needs unpickling arbitrary Python objects, and checkpoints are read "
            "with torch.load(weights_only=True) because they are data, not code. Save tensors and plain values "
            "only, e.g. torch.save(model.state_dict(), path), or pass the model itself. "
            f"torch said: {str(error).splitlines()[0]}"
        ) from error
    state = content.get("state_dict", content) if isinstance(content, Mapping) else content
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} holds no state dict: expected a Lightning checkpoint (with a 'state_dict' entry) "
            "or the output of torch.save(model.state_dict(), path)"
        )
    return dict(state)


def _check_same_layout(first: Mapping[str, Tensor], second: Mapping[str, Tensor], names: tuple[str, str]) -> None:
    """Raise a ValueError listing every tensor name that is missing on one side or differs in shape."""
    differences = []
    for key in sorted(set(first) | set(second)):
        if key not in second:
            differences.append(f"{key}: {tuple(first[key].shape)} in {names[0]}, missing in {names[1]}")
        elif key not in first:
            differences.append(f"{key}: missing in {names[0]}, {tuple(second[key].shape)} in {names[1]}")
        elif first[key].shape != second[key].shape:
            differences.append(
                f"{key}: {tuple(first[key].shape)} in {names[0]} vs {tuple(second[key].shape)} in {names[1]}"
            )
    if differences:
        raise ValueError(
            f"{names[0]} and {names[1]} have different architectures; differing parameters and buffers:\n  "
            + "\n  ".join(differences)
        )


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every state dict name of a tensor that an earlier name holds too (tied weights)."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first = first_name.setdefault(id(tensor), name)
        if first != name:
            aliases[name] = first
    return aliases


def _without_aliases(state: Mapping[str, Tensor], aliases: Mapping[str, str], name: str) -> dict[str, Tensor]:
    """``state`` less the ``aliases``, each checked to hold the same values as the name it is tied to.

    Raises:
        ValueError: naming each alias whose values differ (``name`` is not tied like the template).
    """
    untied = [
        f"{alias} differs from {first}"
        for alias, first in aliases.items()
        if alias in state and first in state and not torch.equal(state[alias], state[first])
    ]
    if untied:
        raise ValueError(
            f"{name} is not tied like the module evaluated with (model_template, else the first module): "
            f"{', '.join(untied)}, names that module ties to one tensor; pass a model_template tied like the endpoints"
        )
    return {key: value for key, value in state.items() if key not in aliases}


def resolve_endpoints(
    model_a: ModelLike, model_b: ModelLike, model_template: nn.Module | None
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """The module to evaluate with and the two endpoints' state dicts (checked to match it).

    Names of tied tensors (a decoder sharing the embedding's weight) are dropped from the state dicts
    but the first of each tensor's names in the template, so that each tensor is interpolated once and
    :func:`torch.func.functional_call` swaps it under all its names.

    Example:
        >>> first, second = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> template, state_a, state_b = resolve_endpoints(first, second, None)
        >>> template is first, sorted(state_a), torch.equal(state_b["weight"], second.weight)
        (True, ['bias', 'weight'], True)
    """
    for name, value in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(value, (nn.Module, str, os.PathLike)):
            raise TypeError(f"{name} must be an nn.Module or a checkpoint path, got {type(value).__name__}")
    modules = [m for m in (model_template, model_a, model_b) if isinstance(m, nn.Module)]
    template = modules[0] if modules else None
    if template is None:
        raise TypeError(
            "model_a and model_b are both checkpoint paths: pass model_template=<a module of that architecture>"
        )
    device = next(template.parameters()).device
    aliases = _tied_aliases(template)

    def state_of(model: ModelLike, name: str) -> dict[str, Tensor]:
        state = model.state_dict() if isinstance(model, nn.Module) else load_checkpoint_state(model, device)
        return _without_aliases(state, aliases, name)

    state_a, state_b = state_of(model_a, "model_a"), state_of(model_b, "model_b")
    _check_same_layout(state_a, state_b, ("model_a", "model_b"))
    if template is not model_a:
        _check_same_layout(state_of(template, "model_template"), state_a, ("model_template", "model_a"))
    return template, state_a, state_b
