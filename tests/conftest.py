"""Shared test settings: quiet, offline, deterministic."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PL_DISABLE_FORK", "1")
# One thread: the test models are tiny, and two threads per process oversubscribe a 2-core
# machine as soon as a DDP test or a second job runs (measured 5-10x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_env_and_seed():
    """Each test starts from the same global seed and leaves the environment as it found it."""
    saved = dict(os.environ)
    torch.manual_seed(0)
    yield
    os.environ.clear()
    os.environ.update(saved)
