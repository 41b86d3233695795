"""Shared test settings: quiet, offline, deterministic."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _restore_env_and_seed():
    """Each test starts from the same global seed and leaves the environment as it found it."""
    saved = dict(os.environ)
    torch.manual_seed(0)
    yield
    os.environ.clear()
    os.environ.update(saved)
