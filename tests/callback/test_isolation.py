"""The isolation helpers: a measurement leaves the module, the random streams and the loggers as it found them."""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_hessian.callback.isolation import PlainState, isolated, loggers_muted, plain_state_kept
from lightning_hessian.callback.saved_state import CLONED_ELEMENTS


class Stateful(nn.Module):
    """A forward that writes plain state of every kind, on itself and on a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.inner.note = "untouched"
        self.calls = 0
        self.seen = [1, 2]
        self.cache = {"a": 1}
        self.tags = {"x"}
        self.hidden = torch.zeros(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen.append(len(x))
        self.cache["last"] = len(x)
        self.tags.add("forward")
        self.hidden.add_(1.0)
        self.inner.note = "changed"
        return self.inner(x)


def test_a_forward_that_writes_plain_state_leaves_no_trace_inside_plain_state_kept():
    net = Stateful()
    seen, cache, tags, hidden = net.seen, net.cache, net.tags, net.hidden
    with plain_state_kept(net):
        net(torch.ones(4, 2))
        assert net.calls == 1 and net.hidden.tolist() == [1.0, 1.0, 1.0]
    assert net.calls == 0 and net.inner.note == "untouched"
    assert (net.seen, net.cache, net.tags, net.hidden.tolist()) == ([1, 2], {"a": 1}, {"x"}, [0.0, 0.0, 0.0])
    assert net.seen is seen and net.cache is cache and net.tags is tags and net.hidden is hidden
    net(torch.ones(4, 2))
    assert net.calls == 1 and net.seen == [1, 2, 4] and net.hidden.tolist() == [1.0, 1.0, 1.0]


def test_attributes_rebound_added_or_removed_get_their_old_objects_back():
    net = nn.Sequential(nn.Linear(2, 2))
    marker, hidden, label = object(), torch.zeros(2), "kept"
    net.marker, net[0].hidden, net[0].label = marker, hidden, label
    state = PlainState(net)
    net.marker, net[0].hidden = object(), torch.ones(2)
    del net[0].label
    net.extra, net[0].extra = "new", "new"
    state.restore()
    assert net.marker is marker and net[0].hidden is hidden and net[0].label is label
    assert not hasattr(net, "extra") and not hasattr(net[0], "extra")


@pytest.mark.parametrize("change", [
    pytest.param(lambda items, mapping, members: items.clear(), id="list-cleared"),
    pytest.param(lambda items, mapping, members: items.__setitem__(0, object()), id="list-item-replaced"),
    pytest.param(lambda items, mapping, members: items.reverse(), id="list-reordered"),
    pytest.param(lambda items, mapping, members: mapping.pop("first"), id="dict-key-removed"),
    pytest.param(lambda items, mapping, members: mapping.__setitem__("first", object()), id="dict-value-replaced"),
    pytest.param(lambda items, mapping, members: members.clear(), id="set-cleared"),
])
def test_lists_dicts_and_sets_get_their_items_back_one_level_deep(change):
    first, second = object(), object()
    net = nn.Linear(2, 2)
    net.items, net.mapping, net.members = [first, second], {"first": first}, {"a", "b"}
    with plain_state_kept(net):
        change(net.items, net.mapping, net.members)
    assert net.items[0] is first and net.items[1] is second and len(net.items) == 2
    assert list(net.mapping) == ["first"] and net.mapping["first"] is first
    assert net.members == {"a", "b"}


def test_a_tensor_made_under_inference_mode_is_kept_as_it_is():
    """``trainer.validate()`` runs under inference mode: a tensor a validation step stored on the module
    has no version counter, and cannot be changed in place outside inference mode anyway."""
    net = nn.Linear(2, 2)
    with torch.inference_mode():
        net.last_val_loss = net(torch.ones(1, 2)).sum()
    stored = net.last_val_loss
    with plain_state_kept(net):
        net.last_val_loss = torch.zeros(())
    assert net.last_val_loss is stored


def test_plain_state_is_put_back_when_the_block_raises():
    net = Stateful()
    with pytest.raises(RuntimeError, match="loss failed"), plain_state_kept(net):
        net(torch.ones(1, 2))
        raise RuntimeError("loss failed")
    assert net.calls == 0 and net.seen == [1, 2] and not net.hidden.any()


def test_a_tensor_of_cloned_elements_changed_in_place_is_restored_by_value():
    net = nn.Linear(2, 2)
    net.edge = edge = torch.zeros(CLONED_ELEMENTS)
    with plain_state_kept(net):
        net.edge += 1.0
        assert net.edge.sum() == CLONED_ELEMENTS
    assert net.edge is edge and not edge.any()


def test_a_larger_tensor_changed_in_place_gives_a_warning_naming_it():
    net = nn.Sequential(nn.Linear(2, 2))
    net[0].big = torch.zeros(CLONED_ELEMENTS + 1)
    with pytest.warns(RuntimeWarning, match=r"large tensor attribute Linear\.big in place"), plain_state_kept(net):
        net[0].big[0] = 1.0


def test_a_larger_tensor_left_alone_or_rebound_gives_no_warning():
    net = nn.Linear(2, 2)
    net.big, net.other = big, other = torch.zeros(CLONED_ELEMENTS + 1), torch.zeros(CLONED_ELEMENTS + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with plain_state_kept(net):
            net.big = torch.ones(3)
    assert net.big is big and net.other is other and not big.any()


def _draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_isolated_puts_the_torch_numpy_and_python_random_streams_back():
    net = nn.Linear(2, 2)
    pl.seed_everything(5, verbose=False)
    expected = _draws()
    pl.seed_everything(5, verbose=False)
    with isolated(net):
        assert _draws() == expected
    assert _draws() == expected


def test_isolated_puts_back_grads_requires_grad_module_modes_and_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    net[2].eval()
    weight, bias = net[0].weight, net[0].bias
    weight.grad = grad = torch.full_like(weight, 3.0)
    bias.requires_grad_(False)
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    with isolated(net):
        weight.grad = None
        bias.requires_grad_(True)
        net.train()
        net(torch.randn(8, 2)).sum().backward()
        net.eval()
        assert bias.grad is not None and not torch.equal(net[1].running_mean, buffers["1.running_mean"])
    assert weight.grad is grad and grad.eq(3.0).all()
    assert not bias.requires_grad and bias.grad is None
    assert [m.training for m in net.modules()] == [True, True, True, False]
    for name, saved in net.named_buffers():
        assert torch.equal(saved, buffers[name]), name


def test_isolated_puts_plain_state_back():
    net = Stateful()
    with isolated(net):
        net(torch.ones(2, 2))
    assert net.calls == 0 and net.seen == [1, 2] and not net.hidden.any() and net.inner.note == "untouched"


@pytest.mark.parametrize("outer", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_gradients_are_enabled_inside_isolated_even_under_inference_mode(outer):
    net = nn.Linear(2, 1)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with outer():
        with isolated(net):
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            (grad,) = torch.autograd.grad(net(x).sum(), net.weight)
        assert not torch.is_grad_enabled()
    assert grad.tolist() == [[4.0, 6.0]]


class Logging(pl.LightningModule):
    """A training_step that logs through every channel a LightningModule has."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = self(batch).pow(2).mean()
        self.log("train_loss", loss)
        self.log_dict({"a": loss, "b": loss})
        self.logger.log_metrics({"direct": loss.item()}, step=0)
        self.logger.experiment.log_metrics({"experiment": 1.0})
        for logger in self.loggers:
            logger.log_metrics({"each": loss.item()}, step=0)
        return loss


def test_log_and_the_loggers_swallow_what_training_step_sends_and_come_back_afterwards(tmp_path):
    model = Logging()
    csv = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(logger=csv, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    model.trainer = trainer
    with pytest.raises(MisconfigurationException):
        model.training_step(torch.ones(4, 2), 0)
    with isolated(model), loggers_muted(trainer):
        assert torch.isfinite(model.training_step(torch.ones(4, 2), -1))
    assert "log" not in vars(model) and "log_dict" not in vars(model)
    assert model.logger is csv and model.loggers == [csv] and trainer.loggers[0] is csv
    csv.save()
    assert not os.path.exists(os.path.join(csv.log_dir, "metrics.csv"))
    model.logger.log_metrics({"after": 1.0}, step=0)
    csv.save()
    with open(os.path.join(csv.log_dir, "metrics.csv")) as handle:
        assert handle.read().split() == ["after,step", "1.0,0"]
    with pytest.raises(MisconfigurationException):
        model.log("train_loss", 1.0)


def test_loggers_muted_puts_the_loggers_back_when_the_block_raises(tmp_path):
    csv = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(logger=csv, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="loss failed"), loggers_muted(trainer):
        assert trainer.loggers[0] is not csv
        raise RuntimeError("loss failed")
    assert trainer.loggers == [csv]


def test_isolated_runs_the_uncompiled_forward_and_training_step_of_a_compiled_module():
    from pytorch_lightning.utilities.compile import from_compiled

    model = from_compiled(torch.compile(Logging()))
    compiled_forward, compiled_step = model.forward, model.training_step
    originals = model._compiler_ctx
    with isolated(model):
        assert model.forward is originals["original_forward"]
        assert model.training_step is originals["original_training_step"]
    assert model.forward is compiled_forward and model.training_step is compiled_step
