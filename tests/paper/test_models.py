"""Models: architecture, the Hessian protocol against an independent oracle, training with a real Trainer."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_hessian import GGNOperator, HessianOperator, dense_ggn
from lightning_hessian.paper.data import DigitsDataModule
from lightning_hessian.paper.models import MLPClassifier, SmallCNN


def _batch(n=24, d=64, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64), torch.randint(0, classes, (n,),
                                                                                     generator=generator)


def test_mlp_architecture():
    model = MLPClassifier(64, (20, 20), 10)
    assert sum(p.numel() for p in model.parameters()) == 1930
    assert [type(m).__name__ for m in model.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    tanh = MLPClassifier(5, (7,), 3, activation="tanh")
    assert isinstance(tanh.net[1], torch.nn.Tanh) and tanh.net[-1].out_features == 3


def test_cnn_architecture():
    model = SmallCNN(num_classes=4, channels=(3, 5))
    assert model(torch.zeros(2, 64)).shape == (2, 4)
    expected = (1 * 9 + 1) * 3 + (3 * 9 + 1) * 5 + (5 * 4 + 1) * 4
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(("model", "dim"), [(MLPClassifier(8, (5, 4), 3), 8), (SmallCNN(3, (2, 3)), 64)],
                         ids=["mlp", "cnn"])
def test_hessian_protocol_matches_an_independent_oracle(model, dim):
    model = model.double()
    batch = _batch(d=dim, classes=3)
    torch.testing.assert_close(model.hessian_loss(batch), F.cross_entropy(model(batch[0]), batch[1]))
    split_loss = model.hessian_output_loss(model.hessian_outputs(batch), batch)
    torch.testing.assert_close(split_loss, model.hessian_loss(batch))

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        parts = theta.split([s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    oracle = torch.func.hessian(loss_of)(flat)
    op = HessianOperator(model, lambda m, b: m.hessian_loss(b), [batch])
    identity = torch.eye(op.num_params, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(identity), oracle, atol=1e-10, rtol=1e-8)
    ggn = GGNOperator(model, lambda m, b: m.hessian_outputs(b), model.hessian_output_loss, [batch])
    dense = dense_ggn(model, lambda m, b: m.hessian_outputs(b), model.hessian_output_loss, [batch])
    torch.testing.assert_close(ggn.matmat(identity), dense, atol=1e-10, rtol=1e-8)


def test_optimizer_settings():
    sgd = MLPClassifier(lr=0.3, momentum=0.9, weight_decay=1e-4).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == 0.3 and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["weight_decay"] == 1e-4
    adam = SmallCNN(optimizer="adam", lr=1e-3).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MLPClassifier(activation="swish"), "activation"),
        (lambda: MLPClassifier(hidden_sizes=(20, 0)), "hidden_sizes"),
        (lambda: MLPClassifier(num_classes=1), "num_classes"),
        (lambda: MLPClassifier(optimizer="lbfgs"), "optimizer"),
        (lambda: MLPClassifier(lr=0.0), "lr"),
        (lambda: SmallCNN(channels=(8,)), "channels"),
        (lambda: SmallCNN(image_size=10), "image_size"),
    ],
    ids=["activation", "width", "classes", "optimizer", "lr", "channels", "image-size"],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("factory", [MLPClassifier, SmallCNN], ids=["mlp", "cnn"])
def test_trains_and_logs_with_a_trainer(factory, tmp_path):
    model = factory(lr=0.3)
    data = DigitsDataModule(num_train=400, batch_size=32)
    x, y, _, _ = data.split
    with torch.no_grad():
        before = float(model.hessian_loss((x, y)))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    with torch.no_grad():
        assert float(model.hessian_loss((x, y))) < 0.7 * before
    (result,) = trainer.test(model, data, verbose=False)
    assert {"test_loss", "test_acc"} <= set(result) and 0 <= result["test_acc"] <= 1
