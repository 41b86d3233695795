"""The progress line: silent for short calls, one line on standard error for long ones, counting every product."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lightning_hessian import HessianOperator
from lightning_hessian.callback import progress
from lightning_hessian.callback.progress import ProgressOperator, progress_line

F64 = torch.float64


def _operator() -> HessianOperator:
    torch.manual_seed(0)
    x = torch.randn(6, 2, dtype=F64)
    return HessianOperator(nn.Linear(2, 1).to(F64), lambda m, b: m(b).pow(2).mean(), [x], dtype=F64)


def test_a_call_shorter_than_the_delay_prints_nothing(capsys):
    bar = progress_line("hessian", 60, enabled=True)
    counted = ProgressOperator(_operator(), bar)
    counted.matmat(torch.ones(3, 4, dtype=F64))
    bar.close()
    assert bar.n == 4
    assert capsys.readouterr().err == ""


def test_a_call_longer_than_the_delay_shows_the_solver_and_the_products_on_standard_error(capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY_SECONDS", 0.05)
    bar = progress_line("curvature/cheap", 60, enabled=True)
    counted = ProgressOperator(_operator(), bar)
    time.sleep(0.2)
    counted.matmat(torch.ones(3, 4, dtype=F64))
    bar.close()
    captured = capsys.readouterr()
    assert "curvature/cheap: measuring" in captured.err and "4/60" in captured.err
    assert captured.out == ""


def test_the_line_counts_every_vector_multiplied():
    bar = progress_line("hessian", 60, enabled=True)
    counted = ProgressOperator(_operator(), bar)
    counted.matmat(torch.ones(3, 5, dtype=F64))
    counted.matmat(torch.ones(3, dtype=F64))
    counted.matvec(torch.ones(3, dtype=F64))
    assert (bar.n, bar.total, bar.desc) == (7, 60, "hessian: measuring")
    bar.close()


def test_a_disabled_line_is_none_and_the_products_pass_through_unchanged():
    assert progress_line("hessian", 60, enabled=False) is None
    op, vectors = _operator(), torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    counted = ProgressOperator(_operator(), bar=None)
    assert torch.equal(counted.matmat(vectors), op.matmat(vectors))


def test_everything_but_matmat_is_the_wrapped_operators():
    op = _operator()
    counted = ProgressOperator(op, bar=None)
    assert (counted.num_params, counted.dtype, counted.num_samples, counted.device) == (3, F64, 6, op.device)
    torch.testing.assert_close(counted.gradient(), op.gradient(), rtol=0, atol=0)
    counted.matmat(torch.ones(3, 2, dtype=F64))
    assert counted.num_matvecs == op.num_matvecs == 2
    with pytest.raises(AttributeError, match="no_such_setting"):
        counted.no_such_setting  # noqa: B018
