"""linear_interpolation: exact endpoints, no side effects, checkpoints, BatchNorm, outputs and logging."""

import copy
import csv

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import InterpolationResult, linear_interpolation
from lightning_hessian.interpolation import DEFAULT_ALPHAS, evaluate
from lightning_hessian.loggers import log_interpolation
from lightning_hessian.paper.data import digits_tensors
from lightning_hessian.paper.models import MLPClassifier


@pytest.fixture(scope="module")
def digits():
    x, y, x_test, y_test = digits_tensors(num_train=300)
    return x, y, x_test[:200], y_test[:200]


@pytest.fixture
def loaders(digits):
    x, y, x_test, y_test = digits
    return {
        "train": DataLoader(TensorDataset(x, y), batch_size=64),
        "test": DataLoader(TensorDataset(x_test, y_test), batch_size=64),
    }


def _mlp(seed, hidden=(20, 20), dtype=torch.float32):
    torch.manual_seed(seed)
    return MLPClassifier(64, hidden, 10).to(dtype)


def _at(result, alpha, split="train"):
    return next(r for r in result.rows if r["alpha"] == alpha and r["split"] == split)


def _lerped(model_a, model_b, alpha):
    """A copy of model_a holding theta_a + alpha (theta_b - theta_a), built by hand."""
    model = copy.deepcopy(model_a)
    b = model_b.state_dict()
    model.load_state_dict(
        {k: v + alpha * (b[k] - v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    )
    return model


def test_endpoints_reproduce_the_models_exactly(loaders):
    a, b = _mlp(0), _mlp(1)
    result = linear_interpolation(a, b, loaders, progress=False)
    for alpha, model in ((0.0, a), (1.0, b)):
        for split, loader in loaders.items():
            row = _at(result, alpha, split)
            model.eval()
            with torch.no_grad():
                outputs = [(model(x), y) for x, y in loader]
            by_hand = sum(F.cross_entropy(logits, y).item() * len(y) for logits, y in outputs) / len(loader.dataset)
            correct = sum(int((logits.argmax(1) == y).sum()) for logits, y in outputs)
            assert row["loss"] == by_hand
            assert (row["loss"], row["accuracy"]) == evaluate(model, loader)
            assert row["accuracy"] == pytest.approx(correct / len(loader.dataset), abs=1e-7)


def test_the_given_models_are_not_changed(loaders):
    a, b = _mlp(0), nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    b_twin = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    a.train()
    b.train()
    b(torch.randn(32, 64))  # non-trivial running statistics
    b.eval()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b, b_twin)]
    linear_interpolation(a, _mlp(1), loaders, [0.5], progress=False)
    linear_interpolation(b, b_twin, loaders, [0.5, 2.0], bn="recompute", progress=False)
    for model, state in zip((a, b, b_twin), before, strict=True):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert a.training and not b.training and b_twin.training
    assert [m.momentum for m in b.modules() if isinstance(m, nn.BatchNorm1d)] == [0.1]


def test_default_grid_is_keskars_with_exact_endpoints():
    assert len(DEFAULT_ALPHAS) == 25 and DEFAULT_ALPHAS[0] == -1.0 and DEFAULT_ALPHAS[-1] == 2.0
    assert 0.0 in DEFAULT_ALPHAS and 1.0 in DEFAULT_ALPHAS
    assert torch.allclose(
        torch.tensor(DEFAULT_ALPHAS, dtype=torch.float64), torch.linspace(-1, 2, 25, dtype=torch.float64)
    )
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    result = linear_interpolation(a, b, data, torch.tensor([0.7, -0.5, 0.7], dtype=torch.float64), progress=False)
    assert result.alphas == (-0.5, 0.0, 0.7, 1.0) and result.splits == ("train",)


def test_interpolated_and_extrapolated_points_match_models_built_by_hand(loaders):
    a, b = _mlp(0, dtype=torch.float64), _mlp(1, dtype=torch.float64)
    result = linear_interpolation(a, b, loaders, [-0.75, 0.5, 1.5], progress=False)
    for alpha in (-0.75, 0.5, 1.5):
        loss, accuracy = evaluate(_lerped(a, b, alpha), loaders["test"])
        assert _at(result, alpha, "test")["loss"] == pytest.approx(loss, rel=1e-12)
        assert _at(result, alpha, "test")["accuracy"] == accuracy
    params_a = torch.cat([p.detach().flatten() for p in a.parameters()])
    params_b = torch.cat([p.detach().flatten() for p in b.parameters()])
    assert result.num_params == 1930
    assert result.norm_a == pytest.approx(float(params_a.norm()), rel=1e-12)
    assert result.distance == pytest.approx(float((params_b - params_a).norm()), rel=1e-12)


def test_checkpoints_give_the_same_result_as_modules(loaders, tmp_path):
    a, b = _mlp(0), _mlp(1)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(b, loaders["train"])
    trainer.save_checkpoint(tmp_path / "b.ckpt")  # a Lightning checkpoint
    torch.save(a.state_dict(), tmp_path / "a.pt")  # a plain state dict
    from_modules = linear_interpolation(a, b, loaders, progress=False)
    from_files = linear_interpolation(
        tmp_path / "a.pt", str(tmp_path / "b.ckpt"), loaders, model_template=_mlp(5), progress=False
    )
    mixed = linear_interpolation(a, tmp_path / "b.ckpt", loaders, progress=False)
    assert from_files.rows == from_modules.rows == mixed.rows
    assert (from_files.norm_a, from_files.norm_b, from_files.distance) == (
        from_modules.norm_a,
        from_modules.norm_b,
        from_modules.distance,
    )


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": _mlp(0).state_dict(), "extra": InterpolationResult}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*arbitrary Python objects.*weights_only=True"):
        linear_interpolation(_mlp(0), path, [(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))], progress=False)


def test_both_paths_need_a_template(tmp_path):
    torch.save(_mlp(0).state_dict(), tmp_path / "a.pt")
    with pytest.raises(TypeError, match="model_template"):
        linear_interpolation(tmp_path / "a.pt", tmp_path / "a.pt", [], progress=False)


@pytest.mark.parametrize(
    ("hidden_b", "expected"),
    [
        pytest.param(
            (20, 30), ["net.2.weight: (20, 20) in model_a vs (30, 20) in model_b", "net.4.weight"], id="width"
        ),
        pytest.param((20,), ["net.4.bias: (10,) in model_a, missing in model_b", "net.2.weight"], id="depth"),
    ],
)
def test_mismatched_architectures_list_every_difference(hidden_b, expected):
    with pytest.raises(ValueError, match="different architectures") as error:
        linear_interpolation(_mlp(0), _mlp(1, hidden_b), [], progress=False)
    for line in expected:
        assert line in str(error.value)
    assert "net.0.weight" not in str(error.value)


def test_barrier_height_is_the_largest_excess_over_the_chord(digits, loaders):
    def result(losses):
        alphas = (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0)
        rows = [
            {"alpha": a, "split": "train", "loss": v, "accuracy": None} for a, v in zip(alphas, losses, strict=True)
        ]
        return InterpolationResult(rows, alphas, ("train",), "none", 1.0, 1.0, 1.0, 1, ("a", "b"), 0.0)

    assert result([9.0, 1.0, 2.0, 3.0, 2.0, 9.0]).barrier_height() == pytest.approx(1.5)
    assert result([9.0, 1.0, 0.5, 0.2, 0.1, 9.0]).barrier_height() == 0.0
    # a real barrier: a trained network and the same one with its hidden units permuted (same function)
    a, (x, y) = _mlp(0), digits[:2]
    optimizer = torch.optim.SGD(a.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(a(x), y).backward()
        optimizer.step()
    b = copy.deepcopy(a)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b.net[0].weight.copy_(a.net[0].weight[perm])
        b.net[0].bias.copy_(a.net[0].bias[perm])
        b.net[2].weight.copy_(a.net[2].weight[:, perm])
    line = linear_interpolation(a, b, loaders, [0.5], progress=False)
    assert _at(line, 0.0)["loss"] == pytest.approx(_at(line, 1.0)["loss"], rel=1e-6)
    assert line.barrier_height() == pytest.approx(_at(line, 0.5)["loss"] - _at(line, 0.0)["loss"], rel=1e-5)
    assert line.barrier_height() > 0.1


def _bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).double()


def test_batchnorm_statistics_recomputed_like_update_bn(loaders):
    a, b = _bn_net(0), _bn_net(1)
    for model in (a, b):  # give both endpoints their own running statistics
        model.train()
        with torch.no_grad():
            for x, _ in loaders["test"]:
                model(x.double())
        model.eval()
    recomputed = linear_interpolation(a, b, loaders, [0.5], bn="recompute", progress=False)
    interpolated = linear_interpolation(a, b, loaders, [0.5], progress=False)
    assert (recomputed.bn, interpolated.bn) == ("recompute", "interpolate")
    for alpha in (0.0, 0.5, 1.0):
        oracle = _lerped(a, b, alpha)
        train_inputs = [x.double() for x, _ in loaders["train"]]
        torch.optim.swa_utils.update_bn(train_inputs, oracle)
        loss, _ = evaluate(oracle, loaders["test"])
        assert _at(recomputed, alpha, "test")["loss"] == pytest.approx(loss, rel=1e-10)
    assert _at(interpolated, 0.5, "test")["loss"] != pytest.approx(_at(recomputed, 0.5, "test")["loss"], rel=1e-3)
    assert linear_interpolation(_mlp(0), _mlp(1), loaders, [0.5], bn="recompute", progress=False).bn == "none"


def test_custom_loss_fn_sees_the_interpolated_weights(loaders):
    a, b = _mlp(0, dtype=torch.float64), _mlp(1, dtype=torch.float64)
    default = linear_interpolation(a, b, loaders, [0.5], progress=False)
    custom = linear_interpolation(
        a, b, loaders["train"], [0.5], loss_fn=lambda m, batch: m.hessian_loss(batch), accuracy=False, progress=False
    )
    assert [r["accuracy"] for r in custom.rows] == [None] * 3
    for alpha in (0.0, 0.5, 1.0):
        assert _at(custom, alpha)["loss"] == pytest.approx(_at(default, alpha)["loss"], rel=1e-12)


def test_csv_plot_progress_and_tensorboard(loaders, tmp_path, capsys):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    result = linear_interpolation(_mlp(0), _mlp(1), loaders)
    result.to_csv(tmp_path / "line.csv")
    result.save_plot(tmp_path / "line.png")
    log_interpolation(result, trainer.loggers, step=trainer.global_step)
    logger.experiment.flush()
    assert "linear interpolation: alphas" in capsys.readouterr().err
    with open(tmp_path / "line.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["alpha"]), r["split"], float(r["loss"])) for r in rows] == [
        (r["alpha"], r["split"], pytest.approx(r["loss"], rel=1e-12)) for r in result.rows
    ]
    assert (tmp_path / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    barrier = events.Scalars("interpolation/barrier_height/train")
    assert [(e.step, e.value) for e in barrier] == [(0, pytest.approx(result.barrier_height(), rel=1e-6))]
    assert "interpolation/distance" in events.Tags()["scalars"]
    assert "interpolation/curve" in events.Tags()["images"]
    assert any(tag.startswith("interpolation/table") for tag in events.Tags()["tensors"])


def test_wandb_gets_a_table_a_line_plot_and_the_figure(loaders, tmp_path, monkeypatch):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    logged = []
    original = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(data)
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    logger = WandbLogger(save_dir=tmp_path, mode="offline")
    try:
        result = linear_interpolation(_mlp(0), _mlp(1), loaders["test"], [0.5], progress=False)
        log_interpolation(result, [logger], step=7)
    finally:
        wandb.finish()
    values = {key: value for data in logged for key, value in data.items()}
    assert isinstance(values["interpolation/table"], wandb.Table)
    assert values["interpolation/table"].columns == ["alpha", "split", "loss", "accuracy"]
    assert isinstance(values["interpolation/curve"], wandb.Image)
    assert "interpolation/loss_curve" in values and values["trainer/global_step"] == 7
    assert "interpolation/barrier_height/train" in values


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"bn": "reset"}, ValueError, "bn='reset'", id="bn"),
        pytest.param({"alphas": [0.5, float("nan")]}, ValueError, "finite", id="alphas"),
        pytest.param({"dataloaders": {}}, ValueError, "dataloaders is empty", id="no-loaders"),
        pytest.param({"model_b": 3}, TypeError, "model_b must be an nn.Module or a checkpoint path", id="model"),
    ],
)
def test_bad_arguments_fail_early(kwargs, error, match):
    arguments = {"model_a": _mlp(0), "model_b": _mlp(1), "dataloaders": [], "progress": False} | kwargs
    with pytest.raises(error, match=match):
        linear_interpolation(**arguments)


class _TiedLanguageModel(nn.Module):
    """Token embedding -> tanh -> decoder whose weight is the embedding's, tied as in language models."""

    def __init__(self, seed, vocab=12, dim=5):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embedding.weight
        self.double()

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.embedding(tokens)))


def _next_tokens(seed, vocab=12):
    tokens = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(tokens[:-1], tokens[1:]), batch_size=16)


def test_tied_weights_are_interpolated_once_and_match_a_copy_built_by_hand(tmp_path):
    a, b, loader = _TiedLanguageModel(0), _TiedLanguageModel(1), _next_tokens(0)
    torch.save(b.state_dict(), tmp_path / "b.pt")
    result = linear_interpolation(a, b, loader, [-0.5, 0.25, 0.5, 1.5], progress=False)
    assert (
        linear_interpolation(a, tmp_path / "b.pt", loader, [-0.5, 0.25, 0.5, 1.5], progress=False).rows == result.rows
    )
    for alpha in (-0.5, 0.25, 0.5, 1.5):
        oracle = _lerped(a, b, alpha)
        assert oracle.decoder.weight is oracle.embedding.weight
        loss, accuracy = evaluate(oracle, loader)
        assert _at(result, alpha)["loss"] == pytest.approx(loss, rel=1e-12)
        assert _at(result, alpha)["accuracy"] == accuracy
    for alpha, model in ((0.0, a), (1.0, b)):
        assert (_at(result, alpha)["loss"], _at(result, alpha)["accuracy"]) == evaluate(model, loader)
    assert result.num_params == 12 * 5 + 12
    assert a.decoder.weight is a.embedding.weight and b.decoder.weight is b.embedding.weight


def test_an_endpoint_not_tied_like_the_template_is_refused():
    a, untied = _TiedLanguageModel(0), _TiedLanguageModel(1)
    untied.decoder.weight = nn.Parameter(untied.embedding.weight.detach() + 1.0)
    with pytest.raises(
        ValueError, match=r"model_b is not tied like.*decoder\.weight differs from embedding\.weight.*model_template"
    ):
        linear_interpolation(a, untied, _next_tokens(0), progress=False)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param("notes.ckpt", b"hello, not a checkpoint\n", id="text"),
        pytest.param("empty.pt", b"", id="empty"),
        pytest.param("zeros.npy", None, id="numpy"),
    ],
)
def test_a_file_that_is_no_torch_checkpoint_is_named(tmp_path, name, content):
    import numpy

    path = tmp_path / name
    if content is None:
        numpy.save(path, numpy.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint file.*torch\.save") as error:
        linear_interpolation(_mlp(0), path, [(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))], progress=False)
    assert str(path) in str(error.value) and "arbitrary Python objects" not in str(error.value)


def _regression_net(outputs):
    torch.manual_seed(0)
    return nn.Linear(3, outputs)


@pytest.mark.parametrize(
    ("kwargs", "batch", "error", "match"),
    [
        pytest.param(
            {},
            {"x": torch.randn(6, 3), "y": torch.zeros(6, dtype=torch.long)},
            TypeError,
            r"default loss .*needs \(x, y\) batches.*dict with keys \['x', 'y'\].*loss_fn=",
            id="dict-batches-default-loss",
        ),
        pytest.param(
            {"loss_fn": lambda m, batch: F.cross_entropy(m(batch["x"]), batch["y"])},
            {"x": torch.randn(6, 3), "y": torch.zeros(6, dtype=torch.long)},
            TypeError,
            r"accuracy needs \(x, y\) batches.*accuracy=False",
            id="dict-batches-accuracy",
        ),
        pytest.param(
            {
                "model_a": _regression_net(1),
                "model_b": _regression_net(1),
                "loss_fn": lambda m, b: F.mse_loss(m(b[0]), b[1]),
            },
            (torch.randn(6, 3), torch.randn(6, 1)),
            ValueError,
            r"accuracy needs class logits \[n, C\] with C >= 2 and integer labels.*\(6, 1\).*accuracy=False",
            id="regression-one-output",
        ),
        pytest.param(
            {
                "model_a": _regression_net(2),
                "model_b": _regression_net(2),
                "loss_fn": lambda m, b: F.mse_loss(m(b[0]), b[1]),
            },
            (torch.randn(6, 3), torch.randn(6, 2)),
            ValueError,
            r"accuracy needs class logits \[n, C\] with C >= 2 and integer labels.*torch\.float.*accuracy=False",
            id="regression-float-targets",
        ),
    ],
)
def test_batches_and_outputs_the_defaults_cannot_use_are_named(kwargs, batch, error, match):
    arguments = {"model_a": _regression_net(2), "model_b": _regression_net(2), "progress": False} | kwargs
    with pytest.raises(error, match=match):
        linear_interpolation(dataloaders=[batch], **arguments)
