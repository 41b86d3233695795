"""The paper's experiments (Sagun et al. 2017) on a CPU, in minutes: ``lightning-hessian reproduce``.

Symbols: C classes, h hidden width, M parameters, k top eigenvalues.

Sections:

1. the spectrum at initialization and after training (bulk at zero, outliers appear);
2. outliers against the number of classes: digits restricted to classes ``0..C-1``, and Gaussian
   mixtures with C clusters; the outlier count (isolated from the bulk, from the top 2C + 2 and a deflated
   SLQ density, as the callback reads it) against C - 1, against the largest-ratio-gap count and, with
   ``exact``, against the same definition on the dense spectrum;
3. a width sweep at fixed data (the bulk grows, the outliers stay);
4. the Hessian against its Gauss-Newton part G (top eigenvalues match, ``||H - G||_2`` small);
5. small batch against large batch (:mod:`lightning_hessian.paper.sblb`);
6. beyond the paper: the class and cross-class parts of G (Papyan 2019, 2020) against the top
   eigenvalues of G and H (:func:`lightning_hessian.class_structure`).

Protocol (that of the pilot runs behind this reproduction): float64; ReLU MLPs with PyTorch's default initialization;
digits scaled to [0, 1], the first 5,565 per mille of the kept images train (1,000 of 1,797 for all
ten classes); plain SGD, lr 0.1, batch 32, 30 epochs; mixtures of 2,000 points in 10 dimensions
(half train) fitted by full-batch gradient descent. Every Hessian is that of the mean loss over the
whole training set. Training uses plain PyTorch loops: for these 2,000-parameter nets a Lightning step
costs more than the step itself. Top eigenvalues come from the engine (Lanczos, certified by
residuals); full spectra from dense Hessians where ``exact`` is on (M up to ~5k), and SLQ densities
everywhere; where both exist the report compares them.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_hessian import loggers
from lightning_hessian.engine import GGNOperator, HessianOperator, top_eigenvalues
from lightning_hessian.engine.class_structure import class_structure
from lightning_hessian.engine.spectrum import ISOLATION_RATIO, outlier_gap
from lightning_hessian.paper import report
from lightning_hessian.paper.data import digits_tensors, gaussian_mixture_tensors
from lightning_hessian.paper.models import cross_entropy, cross_entropy_of_logits
from lightning_hessian.paper.report import check
from lightning_hessian.paper.spectra import TrainedNet, compare_ggn, logits, measure, train_net

# 1,000 of the 1,797 digits train when all ten classes are kept (as in the paper); the same fraction of
# the kept images for fewer classes.
TRAIN_FRACTION = 0.5565
MIXTURE_DIM = 10
MIXTURE_SAMPLES = 2000


@dataclass(frozen=True)
class ReproduceConfig:
    """What :func:`reproduce` runs; :meth:`full` and :meth:`quick` are the two presets.

    Attributes:
        digits_classes: C values of the digits class sweep (10 is also the section 1 and 3 net).
        seeds: initialization and shuffle seeds of the class sweep (sections 1, 3, 4 use the first).
        mixture_classes, mixture_stds: the Gaussian-mixture sweep (cluster count, spread).
        mixture_steps: full-batch gradient-descent steps on the mixtures.
        widths: hidden widths h of the width sweep (MLP 64-h-h-10).
        exact: dense float64 Hessians (and Gauss-Newton matrices) for the section 1, 3 and 4 nets and
            every trained net of section 2.
        num_probes, num_steps: SLQ probes and Lanczos steps per probe.
        classes_slq: probes and steps of the section 2 densities, as few as the callback affords on a large
            model: the outlier counts are validated at that cost.
        sblb_quick: run section 5 with the ``quick`` overrides of its config.
        preset: ``"full"`` or ``"quick"`` (named in the report).
        sections: which sections to run (1..5).
    """

    digits_classes: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    mixture_classes: tuple[int, ...] = (2, 3, 5, 7, 10)
    mixture_stds: tuple[float, ...] = (1.0, 3.0, 6.0)
    mixture_steps: int = 2000
    widths: tuple[int, ...] = (20, 30, 40)
    exact: bool = True
    num_probes: int = 5
    num_steps: int = 80
    classes_slq: tuple[int, int] = (2, 40)
    sblb_quick: bool = False
    preset: str = "full"
    sections: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

    @classmethod
    def full(cls, sections: Sequence[int] = (1, 2, 3, 4, 5, 6)) -> ReproduceConfig:
        """The report's run (about 5 minutes on 2 shared CPU cores, 3 of them in section 2)."""
        return cls(sections=tuple(sections))

    @classmethod
    def quick(cls, sections: Sequence[int] = (1, 2, 3, 4, 5, 6)) -> ReproduceConfig:
        """A short run with the same shapes: one seed, C in {2, 4, 10}, no dense matrices."""
        return cls(digits_classes=(2, 4, 10), seeds=(0,), mixture_classes=(2, 3, 5), mixture_stds=(6.0,),
                   widths=(20, 40), exact=False, num_probes=3, num_steps=40, sblb_quick=True, preset="quick",
                   sections=tuple(sections))


def _slq(config: ReproduceConfig) -> dict[str, int]:
    return {"num_probes": config.num_probes, "num_steps": config.num_steps}


def _digits(classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return digits_tensors(classes, TRAIN_FRACTION, scaling="unit")


def _net_row(net: TrainedNet) -> dict[str, Any]:
    return {"train_loss": net.train_loss, "train_acc": net.train_acc, "test_acc": net.test_acc,
            "steps": net.steps, "train_seconds": net.seconds}


def section_init_vs_trained(config: ReproduceConfig, net: TrainedNet) -> dict[str, Any]:
    """Section 1: the digits MLP (C = 10, h = 20) at initialization and after training."""
    rows = {}
    for name, model in (("init", net.init), ("trained", net.model)):
        spectrum, hessian = measure(model, net.x, net.y, k=22, **_slq(config), exact=config.exact)
        if hessian is not None:
            net.dense[name] = hessian
        rows[name] = asdict(spectrum)
    init, trained = rows["init"], rows["trained"]
    near_zero = trained["near_zero_fraction"] if config.exact else trained["slq_near_zero_fraction"]
    checks = {
        "no gap at init": check(init["outliers"] == 0, "no top-22 eigenvalue isolated from the bulk (a factor "
                                 f"{ISOLATION_RATIO:g} above the eigenvalue below it)"),
        "gap after training": check(trained["outliers"] in (9, 10), "isolated eigenvalues: C-1 = 9 or C = 10"),
        "bulk at zero": check(near_zero > 0.5, "near-zero fraction > 0.5 after training"),
    }
    if config.exact:
        checks["small negatives"] = check(
            -trained["lambda_min"] < 0.1 * trained["top"][0], "abs(lambda_min) < 0.1 lambda_1 after training"
        )
    return {"net": _net_row(net), "spectra": rows, "checks": checks}


def _spectrum_row(model: torch.nn.Module, net: TrainedNet, classes: int, config: ReproduceConfig,
                  exact: bool) -> dict[str, Any]:
    """The top 2C + 2 with a deflated SLQ density (and, with ``exact``, the dense spectrum) of ``model``."""
    known = net.dense.get("trained") if model is net.model else None
    num_probes, num_steps = config.classes_slq
    spectrum, _ = measure(model, net.x, net.y, k=2 * classes + 2, num_probes=num_probes, num_steps=num_steps,
                          exact=exact, hessian=known)
    return asdict(spectrum)


def hit_rates(rows: Sequence[dict[str, Any]], label: str, point: str = "trained") -> dict[str, Any]:
    """How often each reading of the outliers gives C - 1, C - 1 or C, and the dense spectrum's count.

    Args:
        rows: section 2 rows, each with ``classes`` and a spectrum under ``point``.
        label: the rows' name in the report.
        point: ``"trained"`` or ``"init"``.

    Returns:
        ``runs``, and per reading (``new``: isolated from the bulk, ``old``: largest ratio gap) the number of
        runs at C - 1, at C - 1 or C, at 0 and, where the dense spectrum was computed (``exact_runs``), at its count.

    Example:
        >>> rows = [{"classes": 3, "trained": {"outliers": 2, "gap_outliers": 1, "exact_outliers": 2}}]
        >>> rates = hit_rates(rows, "digits")
        >>> rates["new_c_minus_1"], rates["old_c_minus_1"], rates["new_exact"], rates["exact_runs"]
        (1, 0, 1, 1)
    """
    rates: dict[str, Any] = {"data": label, "point": point, "runs": len(rows)}
    dense = [r for r in rows if r[point].get("exact_outliers", -1) >= 0]
    for name, key in (("new", "outliers"), ("old", "gap_outliers")):
        counts = [(r[point][key], r["classes"]) for r in rows]
        rates[f"{name}_c_minus_1"] = sum(n == c - 1 for n, c in counts)
        rates[f"{name}_c_or_c_minus_1"] = sum(n in (c - 1, c) for n, c in counts)
        rates[f"{name}_zero"] = sum(n == 0 for n, _ in counts)
        rates[f"{name}_exact"] = sum(r[point][key] == r[point]["exact_outliers"] for r in dense)
    rates["exact_runs"] = len(dense)
    return rates


def section_classes(config: ReproduceConfig, base: TrainedNet) -> dict[str, Any]:
    """Section 2: outliers against the number of classes, on digits and on Gaussian mixtures."""
    digits = []
    for classes in config.digits_classes:
        split = _digits(classes)
        for seed in config.seeds:
            net = base if (classes, seed) == (10, config.seeds[0]) else train_net(split, 20, seed)
            digits.append({"classes": classes, "seed": seed, **_net_row(net),
                           "init": _spectrum_row(net.init, net, classes, config, exact=False),
                           "trained": _spectrum_row(net.model, net, classes, config, exact=config.exact)})
    mixtures = []
    for std in config.mixture_stds:
        for classes in config.mixture_classes:
            split = gaussian_mixture_tensors(classes, MIXTURE_DIM, MIXTURE_SAMPLES, std, seed=0)
            net = train_net(split, 20, 0, mixture_steps=config.mixture_steps)
            mixtures.append({"classes": classes, "cluster_std": std, **_net_row(net),
                             "trained": _spectrum_row(net.model, net, classes, config, exact=config.exact)})
    rates = [hit_rates(digits, "digits"), hit_rates(digits, "digits", "init")]
    rates += [hit_rates([r for r in mixtures if r["cluster_std"] == std], f"mixtures, std {std:g}")
              for std in config.mixture_stds]
    slq = dict(zip(("num_probes", "num_steps"), config.classes_slq, strict=True))
    return {"digits": digits, "mixtures": mixtures, "hit_rates": rates, "slq": slq,
            "checks": _classes_checks(config, digits, mixtures, rates)}


def _classes_checks(config: ReproduceConfig, digits: list[dict[str, Any]], mixtures: list[dict[str, Any]],
                    rates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The checks of section 2 (``rates[0]``: trained digits, ``rates[1]``: digits at initialization)."""
    trained, init = rates[0], rates[1]
    runs = trained["runs"]
    medians = [statistics.median(r["trained"]["outliers"] for r in digits if r["classes"] == c)
               for c in config.digits_classes]
    tracking = sum(m == c - 1 for m, c in zip(medians, config.digits_classes, strict=True))
    first = [r for r in digits if r["seed"] == config.seeds[0]]
    top = [r["trained"]["top"][0] for r in first]
    checks = {
        "outliers at C-1": check(
            3 * trained["new_c_minus_1"] >= 2 * runs,
            f"eigenvalues isolated from the bulk = C-1 in at least 2/3 of the digits runs "
            f"({trained['new_c_minus_1']}/{runs})"),
        "outliers track C": check(
            3 * tracking >= 2 * len(medians),
            f"median count over seeds = C-1 for at least 2/3 of the C values ({tracking}/{len(medians)}: {medians})"),
        "none at initialization": check(
            init["new_zero"] == init["runs"],
            f"no isolated eigenvalue at initialization ({init['new_zero']}/{init['runs']})"),
        "lambda_1 grows with C": check(top[-1] > top[0], "lambda_1 at the largest C exceeds lambda_1 at the smallest"),
    }
    dense = [r["trained"] for r in (*digits, *mixtures) if r["trained"]["exact_outliers"] >= 0]
    if dense:
        agree = sum(s["outliers"] == s["exact_outliers"] for s in dense)
        checks["estimate matches the dense spectrum"] = check(
            20 * agree >= 19 * len(dense),
            f"the count from the top 2C+2 and {' x '.join(map(str, config.classes_slq))} SLQ equals the count on the "
            f"dense spectrum in at least 95% of the trained nets ({agree}/{len(dense)})")
    for classes in config.mixture_classes:
        by_std = {r["cluster_std"]: r["trained"]["top"][0] for r in mixtures if r["classes"] == classes}
        if len(by_std) > 1:
            ordered = [by_std[s] for s in sorted(by_std)]
            checks[f"mixtures, C = {classes}: spread moves the outliers"] = check(
                all(a < b for a, b in itertools.pairwise(ordered)),
                "lambda_1 grows as the clusters overlap more (larger cluster std)",
            )
    return checks


def section_width(config: ReproduceConfig, base: TrainedNet) -> dict[str, Any]:
    """Section 3: MLP 64-h-h-10 for each width h on the same digits."""
    rows, nets = [], {}
    for width in config.widths:
        net = base if width == 20 else train_net(_digits(10), width, config.seeds[0])
        spectrum, hessian = measure(net.model, net.x, net.y, k=12, **_slq(config), exact=config.exact,
                                    hessian=net.dense.get("trained"))
        if hessian is not None:
            net.dense["trained"] = hessian
        nets[width] = net
        row = {"width": width, **_net_row(net), "trained": asdict(spectrum)}
        row["slq_near_zero_count"] = spectrum.slq_near_zero_fraction * spectrum.num_params
        row["near_zero_count"] = spectrum.near_zero_fraction * spectrum.num_params
        rows.append(row)
    count = "near_zero_count" if config.exact else "slq_near_zero_count"
    grows = all(a[count] < b[count] for a, b in itertools.pairwise(rows))
    narrow = rows[0]["trained"]["top"][:10]
    change = max(max(a / b, b / a) for row in rows[1:] for a, b in zip(narrow, row["trained"]["top"][:10], strict=True))
    checks = {
        "bulk grows": check(grows, f"{count.replace('_', ' ')} grows with every increase of the width"),
        "outliers stay": check(change < 2, f"top-10 eigenvalues change by less than 2x from the narrowest net "
                                f"(max ratio {change:.2f})"),
    }
    return {"rows": rows, "checks": checks, "nets": nets}


def section_ggn(config: ReproduceConfig, base: TrainedNet, wide: dict[int, TrainedNet]) -> dict[str, Any]:
    """Section 4: the Gauss-Newton part against the Hessian, at initialization and after training."""
    rows = [{"width": 20, **compare_ggn(base, base.init, "init", exact=config.exact)}]
    for width, net in wide.items():
        rows.append({"width": width, **compare_ggn(net, net.model, "trained", exact=config.exact)})
    trained = [r for r in rows if r["point"] == "trained"]
    checks = {
        "top eigenvalues match": check(all(r["relative_gap"] < 0.05 for r in trained),
                                        "top-10 of G within 5% of those of H after training"),
        "H - G small near a minimum": check(all(r["residual_norm"] < 0.1 * r["lambda_1"] for r in trained),
                                             "‖H - G‖₂ < 0.1 lambda_1 after training"),
        "H - G larger far from it": check(rows[0]["residual_norm"] / rows[0]["lambda_1"]
                                           > trained[0]["residual_norm"] / trained[0]["lambda_1"],
                                           "‖H - G‖₂ / lambda_1 larger at initialization than after training"),
    }
    return {"rows": rows, "checks": checks}


def section_class_structure(net: TrainedNet, k: int = 12) -> dict[str, Any]:
    """Section 6: the class (G1), cross-class (G2) and G0 parts of G at the trained digits net, beside
    the top eigenvalues of G and H. The parts' eigenvalues come from C x C and C(C-1) x C(C-1) Gram
    matrices; ``G0 + G1 + G2`` is the between-class part of G, so its top eigenvalue cannot exceed G's."""
    batches = [(net.x, net.y)]
    num_classes = int(net.y.max()) + 1
    parts = class_structure(net.model, logits, batches, num_classes)
    top_h = top_eigenvalues(HessianOperator(net.model, cross_entropy, batches), k).eigenvalues
    top_g = top_eigenvalues(GGNOperator(net.model, logits, cross_entropy_of_logits, batches), k).eigenvalues
    rows = {"H": top_h.tolist(), "G": top_g.tolist(), "G0 + G1 + G2": parts.between[:k].tolist(),
            "G1 (class)": parts.g1.tolist(), "G2 (cross-class)": parts.g2[:k].tolist(), "G0": parts.g0.tolist()}
    between_count, _ = outlier_gap(parts.between[:k])
    hessian_count, _ = outlier_gap(top_h)
    checks = {
        "same outlier count": check(between_count == hessian_count > 0,
                                     "the largest gap of G0 + G1 + G2 sits where that of H does"),
        "between-class part inside G": check(parts.between[0] <= top_g[0] * (1 + 1e-9),
                                              "lambda_1(G0 + G1 + G2) <= lambda_1(G), as G minus it is PSD"),
    }
    return {"rows": rows, "num_classes": num_classes, "train_loss": net.train_loss,
            "magnitude_ratio": float(parts.between[0] / top_h[0]), "checks": checks}


def section_sblb(quick: bool, out: Path) -> dict[str, Any]:
    """Section 5: :func:`lightning_hessian.paper.sblb.run_sb_lb` with ``configs/sb_vs_lb.yaml``'s defaults."""
    from lightning_hessian.paper.sblb import SBLBConfig, run_sb_lb

    summary = run_sb_lb(SBLBConfig(), out, quick=quick)
    checks = {name: check(c["passed"], c["criterion"]) for name, c in summary["checks"].items()}
    return {"summary": summary, "checks": checks}


def reproduce(out_dir: str | Path = "reports", config: ReproduceConfig | None = None,
              *, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the sections in ``config`` (default :meth:`ReproduceConfig.full`) and write the report.

    Torch runs on one thread meanwhile (restored afterwards): for these small nets a second thread
    only adds synchronization, and on a machine whose cores are busy it makes every step many times slower.

    Args:
        out_dir: where ``REPORT.md``, ``results.json`` (the numbers of the run, without the full exact
            spectra) and the PNG figures go.
        config: what to run.
        work_dir: bulky outputs of section 5 (TensorBoard logs, CSVs); default ``runs/reproduce``.

    Returns:
        The results: per section its rows and ``checks`` (each ``passed`` with its ``criterion``),
        plus ``seconds`` per section and in total.
    """
    config = config or ReproduceConfig.full()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, Path(out_dir), Path(work_dir) if work_dir is not None else Path("runs/reproduce"))
    finally:
        torch.set_num_threads(threads)


def _run(config: ReproduceConfig, out: Path, work: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"config": asdict(config), "seconds": {}}

    def timed(name: str, run: Any) -> Any:
        began = time.perf_counter()
        value = run()
        results["seconds"][name] = time.perf_counter() - began
        print(f"reproduce: {name} done in {results['seconds'][name]:.0f} s", flush=True)
        return value

    base = timed("train", lambda: train_net(_digits(10), 20, config.seeds[0]))
    if 1 in config.sections:
        results["init_vs_trained"] = timed("section 1", lambda: section_init_vs_trained(config, base))
    if 2 in config.sections:
        results["classes"] = timed("section 2", lambda: section_classes(config, base))
    if 3 in config.sections or 4 in config.sections:
        width = timed("section 3", lambda: section_width(config, base))
        nets = width.pop("nets")
        results["width"] = width
    if 4 in config.sections:
        results["ggn"] = timed("section 4", lambda: section_ggn(config, base, nets))
    if 6 in config.sections:
        results["class_structure"] = timed("section 6", lambda: section_class_structure(base))
    if 5 in config.sections:
        results["sblb"] = timed("section 5", lambda: section_sblb(config.sblb_quick, work / "sb_lb"))
    results["seconds"]["total"] = time.perf_counter() - started
    loggers.write_json(out / "results.json", _without_exact_spectra(results), significant_digits=6)
    report.write(results, out, sblb_dir=work / "sb_lb")
    return results


def _without_exact_spectra(value: Any) -> Any:
    """``value`` without the full exact spectra (thousands of numbers each; the figures show them)."""
    if isinstance(value, dict):
        return {k: _without_exact_spectra(v) for k, v in value.items() if k != "exact"}
    if isinstance(value, (list, tuple)):
        return [_without_exact_spectra(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-hessian reproduce [--quick] [--out reports] [--sections 1 2 3 4 5 6]``.

    Returns:
        0 when every check of the sections run passed, 1 otherwise (the report says which).
    """
    parser = argparse.ArgumentParser(prog="lightning-hessian reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer classes, no dense matrices (~20 s)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default reports)")
    parser.add_argument("--work", type=Path, default=Path("runs/reproduce"), help="logs of section 5")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], choices=range(1, 7))
    args = parser.parse_args(argv)
    preset = ReproduceConfig.quick if args.quick else ReproduceConfig.full
    results = reproduce(args.out, preset(args.sections), work_dir=args.work)
    outcomes = [(section, name, outcome) for section, value in results.items() if isinstance(value, dict)
                for name, outcome in value.get("checks", {}).items()]
    for section, name, outcome in outcomes:
        print(f"{'PASS' if outcome['passed'] else 'FAIL'}  {section}: {name} ({outcome['criterion']})")
    print(f"report: {args.out / 'REPORT.md'} ({results['seconds']['total']:.0f} s)")
    return 0 if all(outcome["passed"] for _, _, outcome in outcomes) else 1
