"""HessianSpectrumCallback under Lightning's ModelParallelStrategy with fully_shard (FSDP2), on CPU devices.

Lightning runs ModelParallelStrategy on a CPU with gloo. With one device the sharded operator's
collectives are local; with two, Lightning's launcher runs this file as a script in two processes
(``python test_callback_sharded.py OUT``), each writing what it measured to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback

from helpers import ProtocolMLP, assert_eigenvalues, dataset, top_dense, trainer


class ShardedMLP(ProtocolMLP):
    """ProtocolMLP whose layers ``configure_model`` shards with ``fully_shard`` on the strategy's mesh."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


ROOT = Path(__file__).resolve().parents[2]


class AdamShardedMLP(ShardedMLP):
    """ShardedMLP trained with Adam: the stability measures read its (sharded) state."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(callbacks: list) -> list[torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = ShardedMLP(dtype=torch.float64)
    run = trainer(strategy=ModelParallelStrategy(), devices=1, max_steps=3, callbacks=callbacks)
    try:
        run.fit(model, DataLoader(dataset(24, dtype=torch.float64), batch_size=8, shuffle=True))
    finally:  # Lightning leaves its one-process group behind, which the next test's group would collide with
        if dist.is_initialized():
            dist.destroy_process_group()
    return [p.to_local().detach().clone() for p in model.parameters()]


def test_the_callback_measures_fully_shard_parameters_against_the_dense_hessian():
    pl.seed_everything(0, verbose=False)
    initial = ProtocolMLP(dtype=torch.float64)  # the same seed: the parameters at the first measurement
    probe = DataLoader(dataset(16, seed=4, dtype=torch.float64), batch_size=8)
    callback = HessianSpectrumCallback(budget=None, k=3, tol=1e-6, dataloader=probe, num_steps=8, num_probes=2,
                                       layers=["net.2.*"])
    measured = _fit([callback])
    first = callback.history[0].hessian
    assert [record.step for record in callback.history] == [0, 3]
    assert_eigenvalues(first.eigenvalues, top_dense(initial, list(probe), 3), rtol=1e-7)
    assert all(first.converged) and first.density is not None and first.num_params == 51
    assert "net.2" in first.layers
    assert all(torch.equal(a, b) for a, b in zip(measured, _fit([]), strict=True))  # training unchanged


def test_fsdp1_and_deepspeed_are_refused_and_model_parallel_settings_that_need_whole_vectors_too():
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # constructing one needs DeepSpeed installed
    with pytest.raises(RuntimeError, match="does not support DeepSpeedStrategy"):
        HessianSpectrumCallback().setup(types.SimpleNamespace(strategy=deepspeed), ProtocolMLP(), "fit")
    module = copy.deepcopy(ProtocolMLP())
    for settings, named in [({"matrix": "both"}, "matrix='both'"), ({"layer_views": True}, "layer_views=True"),
                            ({"grad_overlap": True}, "grad_overlap=True")]:
        with pytest.raises(RuntimeError, match=f"under ModelParallelStrategy.*{named}"):
            HessianSpectrumCallback(**settings).setup(types.SimpleNamespace(strategy=ModelParallelStrategy()),
                                                      module, "fit")


def _two_ranks(directory: str) -> None:
    """The script's run: 4 steps on 2 CPU ranks, measured every 2 steps, each rank's history to a file."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = AdamShardedMLP(dtype=torch.float64)
    probe = DataLoader(dataset(24, seed=4, dtype=torch.float64), batch_size=8)  # rank 0: 2 batches, rank 1: 1
    callback = HessianSpectrumCallback(budget=None, k=3, tol=1e-6, dataloader=probe, num_steps=8, num_probes=2,
                                       every_n_steps=2, progress=False)
    run = trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2,
                  max_steps=4, callbacks=[callback])
    run.fit(model, DataLoader(dataset(32, dtype=torch.float64), batch_size=8))
    records = [{"step": r.step, "eigenvalues": r.hessian.eigenvalues, "residuals": r.hessian.residuals,
                "trace": r.hessian.density.trace, "preconditioned": r.stability.preconditioned_eig_1,
                "batch_sharpness": r.stability.batch_sharpness} for r in callback.history]
    Path(directory, f"rank{run.global_rank}.json").write_text(json.dumps(records))


@pytest.mark.slow
def test_two_ranks_agree_with_each_other_and_with_the_dense_hessian(tmp_path):
    pl.seed_everything(0, verbose=False)
    initial = ProtocolMLP(dtype=torch.float64)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=tmp_path, env=environment, check=True,
                   capture_output=True, timeout=300)
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert first == second and [record["step"] for record in first] == [0, 2, 4]
    # Adam's preconditioner (after its first step) and the trained batch's sharpness, the same on both ranks
    assert all(record["preconditioned"] > 0 and record["batch_sharpness"] > 0 for record in first[1:])
    probe = list(DataLoader(dataset(24, seed=4, dtype=torch.float64), batch_size=8))
    assert_eigenvalues(first[0]["eigenvalues"], top_dense(initial, probe, 3), rtol=1e-7)


if __name__ == "__main__":
    _two_ranks(sys.argv[1])
