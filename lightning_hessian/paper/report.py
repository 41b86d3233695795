"""The report of ``lightning-hessian reproduce``: ``REPORT.md`` and its PNG figures.

Reads only the plain results dict of :func:`lightning_hessian.paper.experiments.reproduce`. Figures are
drawn with matplotlib's Agg backend at a size that keeps each PNG under ~100 KB.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_hessian.engine.spectrum import ISOLATION_RATIO
from lightning_hessian.loggers.figures import new_figure, save_figure

# Figures: two panels side by side.
_FIGSIZE = (10, 3.6)

# Figures of section 5 written by lightning_hessian.paper.sblb, copied into the report folder.
_SBLB_FIGURES = {
    "sb_continuation_loss.png": "fig5_continuation.png",
    "interpolation_lb_to_lbsb.png": "fig5_interpolation.png",
    "interpolation_keskar.png": "fig5_keskar.png",
    "spectra.png": "fig5_spectra.png",
}

_CLAIMS = {
    "init_vs_trained": (
        "1. Spectrum at initialization vs after training",
        "After training the Hessian spectrum is a bulk concentrated at zero plus a few outliers away from it "
        "(about one per class); at a random initial point there is no such gap. Small negative eigenvalues remain.",
    ),
    "classes": (
        "2. Outliers track the number of classes",
        "Fixing the model and changing the data (more classes or clusters, less separable clusters) changes the "
        "outliers: their number follows the number of classes C (with softmax cross-entropy: C - 1).",
    ),
    "width": (
        "3. Width scales the bulk, not the outliers",
        "Fixing the data and adding parameters merely scales the bulk: the number of near-zero eigenvalues grows "
        "with M while the top eigenvalues stay about the same.",
    ),
    "ggn": (
        "4. The outliers come from the Gauss-Newton part",
        "H = G + H_res with G = (1/N) sum J^T (diag p - p p^T) J; near a minimum H_res is small, so the top "
        "eigenvalues of G match those of H and ‖H - G‖₂ is small compared with lambda_1.",
    ),
    "class_structure": (
        "6. Beyond the paper: class and cross-class structure of G",
        "Papyan (2019, 2020): the outliers of G come from the class means of its gradient terms; the class "
        "term G1 (rank <= C) and the cross-class term G2 (rank <= C(C-1)) carry the outlier structure, all "
        "computable from small Gram matrices. (Not a claim of the paper; the checks test the structure, not "
        "the magnitudes, which match only for nets trained to zero error.)",
    ),
    "sblb": (
        "5. Small batch vs large batch: one basin",
        "Small-batch SGD started at the large-batch solution w_LB first climbs, then descends; the straight line "
        "from w_LB to where it lands has no barrier (same basin), and w_LB is the sharper point.",
    ),
}


def check(passed: bool, criterion: str, **values: float) -> dict[str, Any]:
    """One check of a claim, as plain values: whether it passed, its criterion in words, the numbers compared.

    Example:
        >>> check(2.0 > 1.0, "lambda_1 grows", before=1.0, after=2.0)
        {'passed': True, 'criterion': 'lambda_1 grows', 'before': 1.0, 'after': 2.0}
    """
    return {"passed": bool(passed), "criterion": criterion, **values}


def sblb_markdown(summary: dict[str, Any]) -> str:
    """The small-batch vs large-batch summary (``summary.md``): points, lines and checks as Markdown tables."""
    points = summary["points"]
    lines = [
        "# Small batch vs large batch (digits)",
        "",
        f"{summary['seconds']:.1f} s; config: `{json.dumps(summary['config'])}`",
        "",
        "| point | train loss | train acc | test acc | lambda_1 | top eigenvalues | trace |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in points.items():
        top = ", ".join(f"{v:.3g}" for v in p["top_eigenvalues"])
        lines.append(
            f"| {name} | {p['train_loss']:.4g} | {p['train_accuracy']:.3f} | {p['test_accuracy']:.3f} | "
            f"{p['top_eigenvalues'][0]:.4g} | {top} | {p['trace']:.4g} |"
        )
    lines += ["", "| line | barrier (train) | barrier (test) | distance | loss at alpha=-1 | loss at alpha=2 |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, line in summary["interpolation"].items():
        lines.append(
            f"| {name} | {line['barrier_height']['train']:.3g} | {line['barrier_height']['test']:.3g} | "
            f"{line['distance']:.3g} | {line['loss_at_ends'][0]:.4g} | {line['loss_at_ends'][1]:.4g} |"
        )
    lines += ["", "| check | passed | criterion | values |", "| --- | --- | --- | --- |"]
    for name, result in summary["checks"].items():
        values = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k not in ("passed", "criterion"))
        lines.append(f"| {name} | {result['passed']} | {result['criterion']} | {values} |")
    return "\n".join(lines) + "\n"



def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table: the header, its rule and one line per row of cells.

    Example:
        >>> table(["C", "outliers"], [[2, 1], [3, 2]])
        ['| C | outliers |', '| --- | --- |', '| 2 | 1 |', '| 3 | 2 |']
    """
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _top_eigenvalue_axes(ax: Any, title: str, ylabel: str = "lambda_i", xlabel: str = "index i") -> None:
    """Log-scale axes for a top-eigenvalue curve (eigenvalue against its index)."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _save(fig: Any, path: Path) -> str:
    return save_figure(fig, path).name


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}g}" for v in values)


def _verdict(checks: dict[str, dict[str, Any]]) -> str:
    return "**holds**" if all(c["passed"] for c in checks.values()) else "**does not fully hold**"


def _histogram(ax: Any, spectrum: dict[str, Any], label: str) -> None:
    """Exact eigenvalue counts (log scale); without an exact spectrum, the top eigenvalues only."""
    values = spectrum["exact"] or spectrum["top"]
    ax.hist(values, bins=80, histtype="step", label=label, log=True)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count" + ("" if spectrum["exact"] else " (top-k only)"))


def _figure_spectra(spectra: dict[str, dict[str, Any]], titles: tuple[str, str], path: Path) -> str:
    """Top eigenvalues (left) and the whole spectrum (right) of named spectra."""
    fig = new_figure(*_FIGSIZE)
    left, right = fig.subplots(1, 2)
    for label, spectrum in spectra.items():
        left.plot(range(1, len(spectrum["top"]) + 1), spectrum["top"], "o-", ms=3, label=label)
        _histogram(right, spectrum, label)
    _top_eigenvalue_axes(left, titles[0])
    right.set_title(titles[1])
    left.legend()
    right.legend()
    return _save(fig, path)


def _figure_init_vs_trained(section: dict[str, Any], out: Path) -> str:
    return _figure_spectra(section["spectra"], ("top eigenvalues (C = 10)", "whole spectrum"),
                           out / "fig1_init_vs_trained.png")


def _figure_classes(section: dict[str, Any], out: Path) -> str:
    fig = new_figure(*_FIGSIZE)
    left, right = fig.subplots(1, 2)
    seed = section["digits"][0]["seed"]
    for row in (r for r in section["digits"] if r["seed"] == seed):
        top = torch.tensor(row["trained"]["top"])
        left.plot(range(1, len(top) + 1), (top / top[0]).tolist(), "o-", ms=3, label=f"C = {row['classes']}")
        if row["trained"]["outliers"]:
            left.axvline(row["trained"]["outliers"] + 0.5, ls=":", lw=0.8, color=left.lines[-1].get_color())
    _top_eigenvalue_axes(left, "digits, trained MLP 64-20-20-C", ylabel="lambda_i / lambda_1",
                         xlabel="index i (dotted: left of it, the isolated eigenvalues)")
    left.legend(fontsize=6, ncol=2)
    series = [("digits", section["digits"], "o")]
    for std in sorted({r["cluster_std"] for r in section["mixtures"]}):
        series.append((f"mixture, std {std:g}", [r for r in section["mixtures"] if r["cluster_std"] == std], "s"))
    for offset, (label, rows, marker) in enumerate(series):
        shift = 0.12 * (offset - (len(series) - 1) / 2)
        xs = [r["classes"] + shift for r in rows]
        (line,) = right.plot(xs, [r["trained"]["outliers"] for r in rows], marker, alpha=0.7, label=label)
        right.plot(xs, [r["trained"]["gap_outliers"] for r in rows], marker, mfc="none", ms=4, alpha=0.5,
                   color=line.get_color())
    classes = sorted({r["classes"] for _, rows, _ in series for r in rows})
    right.plot(classes, [c - 1 for c in classes], "k:", lw=0.8, label="C - 1")
    right.set_xlabel("number of classes C")
    right.set_ylabel("outliers (hollow: largest ratio gap)")
    right.set_title("isolated eigenvalues after training")
    right.legend(fontsize=7)
    return _save(fig, out / "fig2_classes.png")


def _figure_width(section: dict[str, Any], out: Path) -> str:
    spectra = {f"h = {row['width']} (M = {row['trained']['num_params']})": row["trained"] for row in section["rows"]}
    return _figure_spectra(spectra, ("top eigenvalues after training", "whole spectrum after training"),
                           out / "fig3_width.png")


def _figure_ggn(section: dict[str, Any], out: Path) -> str:
    fig = new_figure(*_FIGSIZE)
    left, right = fig.subplots(1, 2)
    for row in section["rows"]:
        label = f"{row['point']}, h = {row['width']}"
        index = range(1, len(row["top_h"]) + 1)
        (line,) = left.plot(index, row["top_h"], "o", ms=5, mfc="none", label=f"H, {label}")
        left.plot(index, row["top_g"], "x", ms=5, color=line.get_color(), label=f"G, {label}")
    _top_eigenvalue_axes(left, "top eigenvalues of H (o) and G (x)")
    left.legend(fontsize=7)
    names = [f"{r['point']}\nh = {r['width']}" for r in section["rows"]]
    right.bar(names, [r["residual_norm"] / r["lambda_1"] for r in section["rows"]])
    right.set_yscale("log")
    right.set_ylabel(r"$\|H - G\|_2 / \lambda_1(H)$")
    right.set_title("the residual term")
    return _save(fig, out / "fig4_ggn.png")


def _figure_class_structure(section: dict[str, Any], out: Path) -> str:
    fig = new_figure(6.4, 3.6)
    axes = fig.subplots()
    for (name, values), marker in zip(section["rows"].items(), "os^vDx", strict=True):
        positive = [v for v in values if v > 0]
        axes.plot(range(1, len(positive) + 1), positive, marker + "-", ms=4, lw=0.8, label=name)
    _top_eigenvalue_axes(axes, f"digits MLP after training (C = {section['num_classes']})")
    axes.legend(fontsize=7, ncol=2)
    return _save(fig, out / "fig6_class_structure.png")


def _section_class_structure(section: dict[str, Any], figure: str) -> list[str]:
    lines = [
        f"The trained digits net of section 1 (train loss {section['train_loss']:.4f}). Top eigenvalues of H "
        "and G by Lanczos; those of G0, G1, G2 and of the whole between-class part from "
        "`class_structure` (Gram matrices, one pass over the data).",
        "",
        "| matrix | top eigenvalues |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {_fmt(values[:12])} |" for name, values in section["rows"].items()]
    lines += ["", f"The between-class part reaches {section['magnitude_ratio']:.0%} of lambda_1(H): after 30 "
              "epochs the within-class variation still carries most of the outliers' size (the class means dominate "
              "only for nets trained to zero error, as Papyan's are), while the position of the gap already comes "
              "from the class means."]
    return [*lines, "", f"![class structure]({figure})"]


def _checks_table(checks: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| check | criterion | result |", "| --- | --- | --- |"]
    lines += [f"| {name} | {c['criterion']} | {'pass' if c['passed'] else 'FAIL'} |" for name, c in checks.items()]
    return lines


def _spectrum_cells(s: dict[str, Any]) -> str:
    exact = "n/a" if s["exact"] is None else f"{s['near_zero_fraction']:.3f}"
    return (f"{s['outliers']} | {s['gap_outliers']} ({s['gap_ratio']:.2f}) | {exact} | "
            f"{s['slq_near_zero_fraction']:.3f}")


def _section_init_vs_trained(section: dict[str, Any], figure: str) -> list[str]:
    net = section["net"]
    lines = [
        f"MLP 64-20-20-10 on 1,000 digits after {net['steps']} SGD steps: train loss {net['train_loss']:.4f}, "
        f"train accuracy {net['train_acc']:.3f}, test accuracy {net['test_acc']:.3f}. Outliers: eigenvalues isolated "
        "from the bulk (section 2); largest gap: the index of the largest ratio among the top 22, with that ratio.",
        "",
        "| point | top eigenvalues (Lanczos) | outliers (isolated) | largest gap (ratio) "
        "| near-zero, exact (<1e-3 lambda_1) | near-zero, SLQ (<=1e-2 lambda_1) | negatives (exact) | lambda_min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in section["spectra"].items():
        negatives = "n/a" if s["exact"] is None else f"{s['negative_count']} of {s['num_params']}"
        lines.append(f"| {name} | {_fmt(s['top'][:12])} | {_spectrum_cells(s)} | {negatives} | {s['lambda_min']:.3g} |")
    trained = section["spectra"]["trained"]
    if trained["exact"] is not None:
        lines += [
            "",
            f"Engine vs exact (trained): the top-22 Lanczos eigenvalues differ from `eigvalsh` of the dense Hessian "
            f"by at most {trained['lanczos_error']:.1e} lambda_1; SLQ puts {trained['slq_near_zero_fraction']:.3f} "
            f"of the mass within 1e-2 lambda_1 of zero, the exact spectrum "
            f"{trained['exact_near_zero_fraction_coarse']:.3f}.",
        ]
    return [*lines, "", f"![init vs trained]({figure})"]


def _rate(count: int, runs: int) -> str:
    return f"{count}/{runs}" if runs else "n/a"


def _hit_rate_table(rates: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| trained nets | runs | isolated = C-1 | isolated = C-1 or C | isolated = dense count | largest gap = C-1 "
        "| largest gap = C-1 or C |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in rates if r["point"] == "trained"):
        lines.append(f"| {r['data']} | {r['runs']} | {_rate(r['new_c_minus_1'], r['runs'])} | "
                     f"{_rate(r['new_c_or_c_minus_1'], r['runs'])} | {_rate(r['new_exact'], r['exact_runs'])} | "
                     f"{_rate(r['old_c_minus_1'], r['runs'])} | {_rate(r['old_c_or_c_minus_1'], r['runs'])} |")
    return lines


def _dense_cell(spectrum: dict[str, Any]) -> str:
    return "n/a" if spectrum["exact_outliers"] < 0 else str(spectrum["exact_outliers"])


def _section_classes(section: dict[str, Any], figure: str) -> list[str]:
    slq = section["slq"]
    lines = [
        "Digits restricted to classes 0..C-1 (MLP 64-20-20-C, 30 epochs of SGD) and Gaussian mixtures. Each spectrum "
        f"is read as the callback reads it: the top 2C+2 eigenvalues by Lanczos and an SLQ density of "
        f"{slq['num_probes']} probes x {slq['num_steps']} steps deflated by them. **Isolated** counts the eigenvalues "
        "isolated from the bulk (`bulk_outliers`): from the bulk's edge, read from the density, walk up through "
        f"the remaining SLQ nodes and the top eigenvalues; the first one at least {ISOLATION_RATIO:g} times the one "
        "below it and all "
        "above it are the outliers; the bulk edge is the point below that step (lambda_1 when nothing is isolated). "
        "**Largest gap** is the former reading (`outlier_gap`): the index of the largest "
        "ratio between consecutive top eigenvalues, if at least 1.5. **Dense** is the isolated count of every "
        "eigenvalue of the dense float64 Hessian (`dense_outliers` of `eigvalsh`), the exact answer to what the "
        "estimate reads from 2C+2 eigenvalues and a few quadrature nodes.",
        "",
        *_hit_rate_table(section["hit_rates"]),
    ]
    init = next(r for r in section["hit_rates"] if r["point"] == "init")
    lines += [
        "",
        f"At initialization the isolated count was 0 in {init['new_zero']} of {init['runs']} digits nets; the "
        f"largest gap reached 1.5 in {init['runs'] - init['old_zero']} of them.",
        "",
        "| C | seed | train loss | test acc | init: isolated (largest gap) | trained: top C+1 | bulk edge "
        "| isolated | ratio across the gap | largest gap (ratio) | dense | near-zero (SLQ) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in section["digits"]:
        c, init_row, t = r["classes"], r["init"], r["trained"]
        lines.append(
            f"| {c} | {r['seed']} | {r['train_loss']:.4f} | {r['test_acc']:.3f} | {init_row['outliers']} "
            f"({init_row['gap_outliers']}) | {_fmt(t['top'][:c + 1])} | {t['bulk_edge']:.3g} | {t['outliers']} | "
            f"{t['isolation']:.2f} | {t['gap_outliers']} ({t['gap_ratio']:.2f}) | {_dense_cell(t)} | "
            f"{t['slq_near_zero_fraction']:.3f} |"
        )
    misses = [f"C = {r['classes']}, seed {r['seed']}: {r['trained']['outliers']}" for r in section["digits"]
              if r["trained"]["outliers"] != r["classes"] - 1]
    if misses:
        lines += ["", "Digits runs whose isolated count is not C-1: " + "; ".join(misses) + "."]
    lines += [
        "",
        "Reading the misses: the count exceeds C - 1 when eigenvalues below the class outliers are themselves a "
        f"factor {ISOLATION_RATIO:g} above the bulk (the cross-class outliers of Papyan 2019, C(C-1) of them, "
        "show most clearly for C = 2), and it falls short or reads 0 when the outliers descend to the bulk in "
        f"steps smaller than {ISOLATION_RATIO:g} "
        "(overlapping mixtures; digits nets that end at a higher loss; separable mixtures at near-zero loss, whose "
        "top is a smooth tail). Where the dense "
        "column agrees, these are properties of the spectra, not errors of the estimate.",
        "",
        f"Gaussian mixtures (`make_blobs`, d = 10, 1,000 training points, MLP 10-20-20-C, full-batch gradient "
        f"descent, {section['mixtures'][0]['steps'] if section['mixtures'] else 0} steps):",
        "",
    ]
    lines += table(["C", "cluster std", "train loss", "test acc", "top C+1", "bulk edge", "isolated",
                    "largest gap (ratio)", "dense"],
                   ([r["classes"], f"{r['cluster_std']:g}", f"{r['train_loss']:.2g}", f"{r['test_acc']:.3f}",
                     _fmt(r["trained"]["top"][:r["classes"] + 1]), f"{r['trained']['bulk_edge']:.3g}",
                     r["trained"]["outliers"], f"{r['trained']['gap_outliers']} ({r['trained']['gap_ratio']:.2f})",
                     _dense_cell(r["trained"])] for r in section["mixtures"]))
    return [*lines, "", f"![classes]({figure})"]


def _section_width(section: dict[str, Any], figure: str) -> list[str]:
    def cells(r: dict[str, Any]) -> list[Any]:
        t = r["trained"]
        exact = "n/a" if t["exact"] is None else f"{r['near_zero_count']:.0f} ({t['near_zero_fraction']:.3f})"
        return [r["width"], t["num_params"], f"{r['train_loss']:.4f}", f"{r['test_acc']:.3f}", _fmt(t["top"][:10]),
                t["outliers"], exact, f"{r['slq_near_zero_count']:.0f} ({t['slq_near_zero_fraction']:.3f})"]

    lines = table(["h", "M", "train loss", "test acc", "top 10", "outliers",
                   "near-zero count, exact (<1e-3 lambda_1)", "near-zero count, SLQ (<1e-2 lambda_1)"],
                  (cells(r) for r in section["rows"]))
    return [*lines, "", f"![width]({figure})"]


def _section_ggn(section: dict[str, Any], figure: str) -> list[str]:
    def cells(r: dict[str, Any]) -> list[Any]:
        exact = f"{r['exact_residual_norm']:.3g}" if "exact_residual_norm" in r else "n/a"
        rank = f"{r['ggn_rank']} of {r['num_params']}" if "ggn_rank" in r else "n/a"
        return [r["point"], r["width"], f"{r['loss']:.4f}", _fmt(r["top_h"][:5]), _fmt(r["top_g"][:5]),
                f"{r['relative_gap']:.2e}", f"{r['residual_norm']:.3g}", exact,
                f"{r['residual_norm'] / r['lambda_1']:.3f}", rank]

    lines = [
        "Top-10 of H (`HessianOperator`) and of G (`GGNOperator`) by Lanczos; ‖H - G‖₂ by Lanczos on the "
        "difference operator and, where dense matrices were built, exactly (`dense_hessian` - `dense_ggn`).",
        "",
    ]
    lines += table(["point", "h", "train loss", "top 5 of H", "top 5 of G", "max relative difference (top 10)",
                    "‖H - G‖₂", "exact ‖H - G‖₂", "‖H - G‖₂ / lambda_1", "rank G (exact)"],
                   (cells(r) for r in section["rows"]))
    return [*lines, "", f"![ggn]({figure})"]


def _section_sblb(section: dict[str, Any], out: Path, sblb_dir: Path) -> list[str]:
    lines = sblb_markdown(section["summary"]).splitlines()[2:]
    lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("| check |")), len(lines))]
    for source, target in _SBLB_FIGURES.items():
        if (sblb_dir / source).exists():
            shutil.copyfile(sblb_dir / source, out / target)
            lines += ["", f"![{target}]({target})"]
    return lines


def write(results: dict[str, Any], out: Path, *, sblb_dir: Path) -> Path:
    """Write ``REPORT.md`` and the figures for ``results`` into ``out``; return the report's path."""
    renderers = {
        "init_vs_trained": lambda s: _section_init_vs_trained(s, _figure_init_vs_trained(s, out)),
        "classes": lambda s: _section_classes(s, _figure_classes(s, out)),
        "width": lambda s: _section_width(s, _figure_width(s, out)),
        "ggn": lambda s: _section_ggn(s, _figure_ggn(s, out)),
        "sblb": lambda s: _section_sblb(s, out, sblb_dir),
        "class_structure": lambda s: _section_class_structure(s, _figure_class_structure(s, out)),
    }
    config, seconds = results["config"], results["seconds"]
    quick = " --quick" if config["preset"] == "quick" else ""
    lines = [
        "# Reproducing Sagun et al. 2017 on a CPU",
        "",
        f"`lightning-hessian reproduce{quick}`: {seconds['total']:.0f} s on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, float64. "
        "Every number below comes from this run; `results.json` holds them (all but the full exact spectra).",
        "",
        "| section | claim | verdict |",
        "| --- | --- | --- |",
    ]
    present = [key for key in renderers if key in results]
    lines += [f"| {_CLAIMS[k][0]} | {_CLAIMS[k][1]} | {_verdict(results[k]['checks'])} |" for k in present]
    for key in present:
        title, claim = _CLAIMS[key]
        section = results[key]
        lines += ["", f"## {title}", "", f"**Paper's claim.** {claim}", "", "**Our measurement.**", ""]
        lines += renderers[key](section)
        lines += ["", f"**Verdict:** the claim {_verdict(section['checks'])} here.", ""]
        lines += _checks_table(section["checks"])
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
