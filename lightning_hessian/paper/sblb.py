"""The paper's small-batch vs large-batch experiment (Sagun et al. 2017, section 4).

1. From one initialization w0, full-batch gradient descent to w_LB.
2. From w_LB, small-batch SGD (same learning rate) to w_LB->SB, recording the full training loss:
   it climbs, then falls ("climbing uphill then falling downhill").
3. The loss on the line from w_LB to w_LB->SB (no barrier: one basin), and Keskar et al.'s line from a
   small-batch run from w0 (alpha 0) to w_LB (alpha 1).
4. Hessian spectra (top-k by Lanczos, density by SLQ) at w_LB, w_LB->SB and the small-batch run.

Training uses plain PyTorch loops in float64: a Lightning step costs more than a whole full-batch step
on 1,000 digits. Outputs under ``out_dir``: TensorBoard logs, PNG plots, the interpolation rows as CSV,
``summary.json`` and ``summary.md``.

The three checks, with their exact criteria (constants below):

- **rise then fall**: along the continuation, ``peak >= RISE_FACTOR * start`` and
  ``final <= peak / FALL_FACTOR`` (full training loss; start at w_LB, final at w_LB->SB);
- **no barrier** on the w_LB -> w_LB->SB line: ``barrier_height(train) <= BARRIER_FRACTION *
  max(loss(0), loss(1))``;
- **LB sharper**: ``lambda_1(w_LB) > lambda_1(w_LB->SB)``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian import loggers
from lightning_hessian.engine import HessianOperator, spectral_density, top_eigenvalues
from lightning_hessian.interpolation import InterpolationResult, evaluate, linear_interpolation
from lightning_hessian.loggers.figures import new_figure, save_figure
from lightning_hessian.paper.data import DigitsScaling, digits_tensors
from lightning_hessian.paper.models import MLPClassifier, cross_entropy
from lightning_hessian.paper.report import check, sblb_markdown
from lightning_hessian.paper.training import train_sgd

RISE_FACTOR = 2.0
FALL_FACTOR = 10.0
BARRIER_FRACTION = 0.01

_SECTIONS = ("data", "model", "optimization", "interpolation", "spectrum")


@dataclass(frozen=True)
class SBLBConfig:
    """Settings of :func:`run_sb_lb`; ``configs/sb_vs_lb.yaml`` spells out the defaults.

    Attributes:
        seed: seeds the initialization and the small-batch shuffles.
        num_threads: torch intra-op threads during the run (1 is fastest for this size).
        num_train: the first ``num_train`` digits train, the rest test.
        scaling: ``"unit"`` (pixels / 16, in [0, 1], as the pilot runs) or ``"standardize"``
            (see :func:`lightning_hessian.paper.data.digits_tensors`).
        hidden_sizes, activation: the :class:`~lightning_hessian.paper.models.MLPClassifier`.
        lr: SGD learning rate of every phase.
        large_batch_size: batch of the large-batch run (``None``: full batch).
        large_batch_steps: steps from w0 to w_LB.
        small_batch_size: batch of the continuation and of the small-batch run from w0.
        small_batch_steps: steps of each of those two runs.
        record_every: full training loss recorded every this many small-batch steps.
        alphas: ``(start, stop, num)`` of the interpolation grid (0 and 1 are always added).
        k: top eigenvalues per endpoint.
        num_probes, num_steps: SLQ probes and Lanczos steps for the density.
        quick: overrides applied by ``quick=True`` (``--quick``): a shorter run that still shows the shapes.
    """

    seed: int = 0
    num_threads: int = 1
    num_train: int = 1000
    scaling: DigitsScaling = "unit"
    hidden_sizes: tuple[int, ...] = (20, 20)
    activation: str = "relu"
    lr: float = 0.1
    large_batch_size: int | None = None
    large_batch_steps: int = 2000
    small_batch_size: int = 10
    small_batch_steps: int = 2000
    record_every: int = 1
    alphas: tuple[float, float, int] = (-1.0, 2.0, 25)
    k: int = 10
    num_probes: int = 10
    num_steps: int = 80
    quick: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"large_batch_steps": 1000, "small_batch_steps": 1000, "k": 3, "num_steps": 30}
    )

    def __post_init__(self) -> None:
        counts = ("num_threads", "num_train", "large_batch_steps", "small_batch_size", "small_batch_steps")
        for name in (*counts, "record_every", "k", "num_probes", "num_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.scaling not in ("unit", "standardize"):
            raise ValueError(f"scaling={self.scaling!r} must be 'unit' or 'standardize'")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if len(self.alphas) != 3 or int(self.alphas[2]) < 2 or not self.alphas[0] < self.alphas[1]:
            raise ValueError(f"alphas={list(self.alphas)} must be [start, stop, num] with start < stop and num >= 2")
        if self.large_batch_size is not None and self.large_batch_size < 1:
            raise ValueError(f"large_batch_size={self.large_batch_size} must be positive, or null for full batch")
        unknown = set(self.quick) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"quick has unknown keys {sorted(unknown)}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> SBLBConfig:
        """Build from a (YAML) mapping; keys may be grouped in sections ``data``, ``model``, ... .

        Raises:
            ValueError: for a key that is not a setting.
        """
        flat: dict[str, Any] = {}
        for key, value in mapping.items():
            flat.update(value if key in _SECTIONS and isinstance(value, Mapping) else {key: value})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the settings are {sorted(known)}")
        for name in ("hidden_sizes", "alphas"):
            if name in flat:
                flat[name] = tuple(flat[name])
        return cls(**flat)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SBLBConfig:
        """Read a YAML file such as ``configs/sb_vs_lb.yaml``."""
        import yaml

        return cls.from_mapping(yaml.safe_load(Path(path).read_text()) or {})

    def quickened(self) -> SBLBConfig:
        """This config with the :attr:`quick` overrides applied."""
        return dataclasses.replace(self, **self.quick)


def _digits(config: SBLBConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test digits in float64, scaled as ``config.scaling`` says."""
    x, y, x_test, y_test = digits_tensors(num_train=config.num_train, scaling=config.scaling)
    return x.double(), y, x_test.double(), y_test


def _spectrum(model: nn.Module, x: Tensor, y: Tensor, config: SBLBConfig) -> dict[str, Any]:
    """Top-k eigenvalues (Lanczos) and SLQ density of the full-training-set Hessian."""
    op = HessianOperator(model, cross_entropy, [(x, y)])
    top = top_eigenvalues(op, config.k, seed=config.seed)
    density = spectral_density(op, num_probes=config.num_probes, num_steps=config.num_steps, seed=config.seed)
    return {"top": top, "density": density}


def _checks(curve: list[tuple[int, float]], line: InterpolationResult, sharp: float, flat: float) -> dict[str, Any]:
    """The three checks of the module docstring, from the continuation curve, the line and both lambda_1."""
    losses = [loss for _, loss in curve]
    peak = max(losses)
    start, end = line.values("train")[line.alphas.index(0.0)], line.values("train")[line.alphas.index(1.0)]
    barrier, threshold = line.barrier_height("train"), BARRIER_FRACTION * max(start, end)
    return {
        "rise_then_fall": check(
            peak >= RISE_FACTOR * losses[0] and losses[-1] <= peak / FALL_FACTOR,
            f"peak >= {RISE_FACTOR:g} * start and final <= peak / {FALL_FACTOR:g} (full training loss along the "
            "small-batch continuation)",
            start=losses[0],
            peak=peak,
            peak_step=curve[losses.index(peak)][0],
            final=losses[-1],
        ),
        "no_barrier": check(
            barrier <= threshold,
            f"barrier_height(train) <= {BARRIER_FRACTION:g} * max(loss(0), loss(1)) on the w_LB -> w_LB->SB line",
            barrier_height=barrier,
            threshold=threshold,
        ),
        "lb_sharper": check(
            sharp > flat, "lambda_1(w_LB) > lambda_1(w_LB->SB)", lambda_1_lb=sharp, lambda_1_lb_to_sb=flat
        ),
    }


def _plot_curves(curves: Mapping[str, list[tuple[int, float]]], path: Path) -> Any:
    """Full training loss against small-batch step (log scale), saved as PNG; returns the figure."""
    fig = new_figure(6, 4)
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("small-batch step")
    ax.set_ylabel("full training loss")
    ax.legend()
    save_figure(fig, path)
    return fig


def _plot_spectra(spectra: Mapping[str, dict[str, Any]], path: Path) -> Any:
    """SLQ densities on one grid and the top eigenvalues of each point, saved as PNG; returns the figure."""
    fig = new_figure(10, 4)
    density_ax, top_ax = fig.subplots(1, 2)
    low = min(s["density"].range[0] for s in spectra.values())
    high = max(s["density"].range[1] for s in spectra.values())
    sigma = 0.01 * (high - low)
    grid = torch.linspace(low - 3 * sigma, high + 3 * sigma, 1000, dtype=torch.float64)
    for label, spectrum in spectra.items():
        density_ax.plot(grid, spectrum["density"].density(grid, sigma).clamp_min(1e-8), label=label)
        values = spectrum["top"].eigenvalues
        top_ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    density_ax.set(yscale="log", ylim=(1e-5, None), xlabel="eigenvalue", ylabel="density (SLQ)")
    top_ax.set(yscale="log", xlabel="index", ylabel="top eigenvalues (Lanczos)")
    density_ax.legend()
    top_ax.legend()
    save_figure(fig, path)
    return fig


def _train_all(config: SBLBConfig, x: Tensor, y: Tensor) -> tuple[dict[str, nn.Module], dict[str, list]]:
    """Train w_LB, w_LB->SB and w_SB from one seeded w0; return the models and their loss curves."""
    torch.manual_seed(config.seed)
    w0 = MLPClassifier(x.shape[1], config.hidden_sizes, int(y.max()) + 1, config.activation, lr=config.lr).double()
    train = {"lr": config.lr, "generator": torch.Generator().manual_seed(config.seed)}
    large = {"batch_size": config.large_batch_size, "steps": config.large_batch_steps, "record_every": 1}
    small = dict(batch_size=config.small_batch_size, steps=config.small_batch_steps, record_every=config.record_every)
    models = {"w_LB": copy.deepcopy(w0)}
    curves = {"lb": train_sgd(models["w_LB"], x, y, **large, **train)}
    models["w_LB->SB"] = copy.deepcopy(models["w_LB"])
    curves["lb_to_sb"] = train_sgd(models["w_LB->SB"], x, y, **small, **train)
    models["w_SB"] = copy.deepcopy(w0)
    curves["sb"] = train_sgd(models["w_SB"], x, y, **small, **train)
    return models, curves


def _point(model: nn.Module, loaders: Mapping[str, list], spectrum: dict[str, Any]) -> dict[str, Any]:
    """Loss, accuracies, top eigenvalues with residuals, and trace of one trained model."""
    train_loss, train_acc = evaluate(model, loaders["train"])
    _, test_acc = evaluate(model, loaders["test"])
    top, density = spectrum["top"], spectrum["density"]
    return {
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "top_eigenvalues": top.eigenvalues.tolist(),
        "residuals": top.residuals.tolist(),
        "converged": bool(top.all_converged),
        "trace": density.trace,
        "trace_stderr": density.trace_stderr,
    }


def _line_summary(line: InterpolationResult) -> dict[str, Any]:
    """The JSON-ready summary of one interpolation line."""
    return {
        "barrier_height": {s: line.barrier_height(s) for s in line.splits},
        "distance": line.distance,
        "norm_a": line.norm_a,
        "norm_b": line.norm_b,
        "loss_at_ends": [line.values("train")[0], line.values("train")[-1]],
        "bn": line.bn,
        "rows": line.rows,
    }


def _log_curves(logger: Any, curves: Mapping[str, list[tuple[int, float]]]) -> None:
    """Stage 1's output: each training run's full loss against its step."""
    for tag, curve in curves.items():
        for step, loss in curve:
            loggers.log_metrics([logger], {f"{tag}/train_loss": loss}, step)


def _interpolate(models: Mapping[str, nn.Module], loaders: Mapping[str, list], config: SBLBConfig, out: Path,
                 logger: Any) -> dict[str, InterpolationResult]:
    """Stage 2: the two lines (w_LB to w_LB->SB, and Keskar's w_SB to w_LB), written as CSV, PNG and logged."""
    first, last, num = config.alphas
    alphas = [first + (last - first) * i / (num - 1) for i in range(int(num))]  # exact ends, as DEFAULT_ALPHAS
    lines = {}
    for name, (a, b), tag in (
        ("w_LB -> w_LB->SB", ("w_LB", "w_LB->SB"), "lb_to_lbsb"),
        ("w_SB -> w_LB (Keskar)", ("w_SB", "w_LB"), "keskar"),
    ):
        line = linear_interpolation(models[a], models[b], loaders, alphas, labels=(a, b), progress=False)
        line.to_csv(out / f"interpolation_{tag}.csv")
        line.save_plot(out / f"interpolation_{tag}.png")
        loggers.log_interpolation(line, [logger], name=f"interpolation/{tag}")
        lines[name] = line
    return lines


def _measure_points(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, loaders: Mapping[str, list],
                    config: SBLBConfig, logger: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Stage 3: each point's spectrum (top eigenvalues and density) and its summary, the top eigenvalues logged."""
    spectra = {name: _spectrum(model, x, y, config) for name, model in models.items()}
    points = {name: _point(model, loaders, spectra[name]) for name, model in models.items()}
    for name, point in points.items():
        key = name.replace("->", "_to_").removeprefix("w_")
        loggers.log_metrics([logger], {f"spectrum/{key}/eig_{i + 1}": v
                                       for i, v in enumerate(point["top_eigenvalues"])}, 0)
    return spectra, points


def _log_figures(logger: Any, curves: Mapping[str, list[tuple[int, float]]], spectra: Mapping[str, dict[str, Any]],
                 out: Path) -> None:
    """Stage 4: the continuation's loss curve and the three spectra, as PNG files and logged figures."""
    figures = {
        "sb_lb/continuation_loss": _plot_curves(
            {"continuation from w_LB": curves["lb_to_sb"], "from w0": curves["sb"]},
            out / "sb_continuation_loss.png",
        ),
        "sb_lb/spectra": _plot_spectra(spectra, out / "spectra.png"),
    }
    for tag, fig in figures.items():
        loggers.log_figure([logger], tag, fig)


def _summarize(config: SBLBConfig, curves: Mapping[str, list[tuple[int, float]]],
               lines: Mapping[str, InterpolationResult], points: Mapping[str, dict[str, Any]],
               seconds: float) -> dict[str, Any]:
    """Stage 5: the three checks and the JSON-ready summary."""
    checks = _checks(
        curves["lb_to_sb"],
        lines["w_LB -> w_LB->SB"],
        points["w_LB"]["top_eigenvalues"][0],
        points["w_LB->SB"]["top_eigenvalues"][0],
    )
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "quick"},
        "points": dict(points),
        "interpolation": {name: _line_summary(line) for name, line in lines.items()},
        "continuation": {
            "steps": [s for s, _ in curves["lb_to_sb"]],
            "train_loss": [v for _, v in curves["lb_to_sb"]],
        },
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
        "seconds": seconds,
    }


def run_sb_lb(config: SBLBConfig | Mapping[str, Any] | str | Path, out_dir: str | Path, *, quick: bool = False) -> dict:
    """Run the experiment and write its outputs to ``out_dir``.

    Args:
        config: an :class:`SBLBConfig`, a mapping of its settings, or a YAML path.
        out_dir: output folder (created): ``tensorboard/``, ``sb_continuation_loss.png``,
            ``interpolation_lb_to_lbsb.png``/``.csv``, ``interpolation_keskar.png``/``.csv``,
            ``spectra.png``, ``summary.json``, ``summary.md``.
        quick: apply ``config.quick`` (a shorter run).

    Returns:
        The summary (as in ``summary.json``): per point (``w_LB``, ``w_LB->SB``, ``w_SB``) loss,
        accuracy, top eigenvalues, residuals and trace; per line the barrier heights, distance,
        norms and rows; the continuation's loss curve; the three ``checks`` with their criteria and
        ``passed`` (all three); ``seconds``.
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    if isinstance(config, (str, Path)):
        config = SBLBConfig.from_yaml(config)
    elif not isinstance(config, SBLBConfig):
        config = SBLBConfig.from_mapping(config)
    if quick:
        config = config.quickened()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        x, y, x_test, y_test = _digits(config)
        loaders = {"train": [(x, y)], "test": [(x_test, y_test)]}
        logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version="")
        models, curves = _train_all(config, x, y)
        _log_curves(logger, curves)
        lines = _interpolate(models, loaders, config, out, logger)
        spectra, points = _measure_points(models, x, y, loaders, config, logger)
        _log_figures(logger, curves, spectra, out)
        summary = _summarize(config, curves, lines, points, time.perf_counter() - started)
        loggers.log_text([logger], "sb_lb/summary", sblb_markdown(summary))
        logger.finalize("success")
    finally:
        torch.set_num_threads(threads)
    loggers.write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(sblb_markdown(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-hessian sb-lb [--config FILE] [--out DIR] [--quick]``; exit code 0 when all checks pass."""
    parser = argparse.ArgumentParser(prog="lightning-hessian sb-lb", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML settings (default: the built-in defaults)")
    parser.add_argument("--out", type=Path, default=Path("runs/sb_lb"), help="output folder (default runs/sb_lb)")
    parser.add_argument("--quick", action="store_true", help="apply the config's `quick` overrides: a shorter run")
    args = parser.parse_args(argv)
    summary = run_sb_lb(args.config if args.config is not None else SBLBConfig(), args.out, quick=args.quick)
    print((args.out / "summary.md").read_text())
    print(f"outputs in {args.out}/ (TensorBoard: tensorboard --logdir {args.out / 'tensorboard'})")
    return 0 if summary["passed"] else 1
