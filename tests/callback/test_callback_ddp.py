"""HessianSpectrumCallback under DDP: 2 CPU processes (gloo) agree with one process on the same probe set."""

from __future__ import annotations

import copy
import json
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, DistributedSampler

from lightning_hessian import HessianSpectrumCallback

from helpers import (
    ProtocolMLP,
    assert_eigenvalues,
    dataset,
    top_dense,
    trainer,
)

SEED = 3


class RankFileLogger(Logger):
    """A logger without rank-zero guards: every rank that calls it leaves a file behind."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    @property
    def name(self) -> str:
        return "rank-files"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self.directory

    def _append(self, entry: dict) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(os.path.join(self.directory, f"rank{rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def log_metrics(self, metrics, step=None) -> None:
        self._append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._append({"hyperparams": sorted(params)})


@pytest.mark.slow
def test_ddp_spawn_matches_one_process(tmp_path):
    pl.seed_everything(SEED, verbose=False)
    model = ProtocolMLP(dtype=torch.float64)
    initial = copy.deepcopy(model)
    train = dataset(32, dtype=torch.float64)
    # 3 probe batches over 2 ranks: rank 0 holds two, rank 1 one (and must not hang)
    probe = DataLoader(dataset(24, seed=5, dtype=torch.float64), batch_size=8)
    given = HessianSpectrumCallback(budget=None, k=3, tol=1e-6, dataloader=probe, num_samples=None, num_steps=8,
                                    num_probes=2, history_file="given.json")
    # the training loader gets a DistributedSampler: each rank draws 6 of the 12 probe samples, in whole batches
    sharded = HessianSpectrumCallback(budget=None, at_end=False, k=2, tol=1e-6, num_samples=12, density=False,
                                      history_file="sharded.json")
    # one probe batch: rank 1 has none, and still takes part in every all-reduce
    single = DataLoader(dataset(8, seed=6, dtype=torch.float64), batch_size=8)
    lonely = HessianSpectrumCallback(budget=None, at_end=False, k=2, tol=1e-6, dataloader=single, density=False,
                                     history_file="lonely.json")
    run = trainer(strategy="ddp_spawn", devices=2, max_steps=2, logger=RankFileLogger(str(tmp_path)),
                  callbacks=[given, sharded, lonely])
    run.fit(model, DataLoader(train, batch_size=4))

    assert os.path.exists(tmp_path / "rank0.jsonl") and not os.path.exists(tmp_path / "rank1.jsonl")
    with open(tmp_path / "given.json") as handle:
        history = json.load(handle)["history"]
    assert [r["step"] for r in history] == [0, 2] and history[0]["num_samples"] == 24
    batches = list(probe)
    for record, weights in zip(history, (initial, model), strict=True):
        assert_eigenvalues(record["hessian"]["eigenvalues"], top_dense(weights, batches, 3))
    # callback_metrics hold float32 tensors (the Lightning convention)
    last = history[-1]["hessian"]["eigenvalues"][0]
    assert float(run.callback_metrics["hessian/eig_1"]) == pytest.approx(last, rel=1e-6)
    # the measurements ran in the spawned processes: the file brings them into this process's callback
    with open(tmp_path / "given.json") as handle:
        given.load_state_dict(json.load(handle))
    assert [m.step for m in given.history] == [0, 2]
    assert list(given.history[-1].hessian.eigenvalues) == history[-1]["hessian"]["eigenvalues"]

    with open(tmp_path / "sharded.json") as handle:
        [record] = json.load(handle)["history"]
    # Lightning's training sampler shuffles with the global seed and epoch 0: rank r draws whole batches of 4 of
    # its part until it has 6 samples, i.e. the first 8
    shares = [list(DistributedSampler(train, num_replicas=2, rank=r, seed=SEED))[:8] for r in range(2)]
    batches = [tuple(t[share] for t in train.tensors) for share in shares]
    assert record["num_samples"] == 16
    assert_eigenvalues(record["hessian"]["eigenvalues"], top_dense(initial, batches, 2))

    with open(tmp_path / "lonely.json") as handle:
        [record] = json.load(handle)["history"]
    assert_eigenvalues(record["hessian"]["eigenvalues"], top_dense(initial, list(single), 2))
