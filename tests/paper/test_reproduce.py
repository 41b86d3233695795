"""`lightning-hessian reproduce --quick` shows the paper's shapes; the exact paths agree with the engine."""

import json

import pytest
import torch

from lightning_hessian.cli import main
from lightning_hessian.engine.spectrum import dense_outliers
from lightning_hessian.paper.data import gaussian_mixture_tensors
from lightning_hessian.paper.spectra import compare_ggn, measure, train_net


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run of every section through the console script; its exit code and results."""
    out = tmp_path_factory.mktemp("reports")
    code = main(["reproduce", "--quick", "--out", str(out), "--work", str(out / "work")])
    return code, json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_every_check_passes(quick):
    code, results, _ = quick
    failed = [(key, name) for key, section in results.items() if isinstance(section, dict)
              for name, check in section.get("checks", {}).items() if not check["passed"]]
    assert failed == [] and code == 0


@pytest.mark.slow
def test_no_gap_at_initialization_and_a_bulk_at_zero_after_training(quick):
    spectra = quick[1]["init_vs_trained"]["spectra"]
    assert spectra["init"]["outliers"] == 0
    assert max(spectra["init"]["ratios"]) < 1.5
    assert spectra["trained"]["outliers"] in (9, 10)
    assert spectra["trained"]["slq_near_zero_fraction"] > 0.5
    assert spectra["trained"]["top"][0] > 5 * spectra["init"]["top"][0]
    assert max(spectra["trained"]["residuals"]) <= 1e-6


@pytest.mark.slow
def test_outliers_track_the_number_of_classes(quick):
    section = quick[1]["classes"]
    digits = {r["classes"]: r for r in section["digits"]}
    assert sorted(digits) == [2, 4, 10]
    # C = 4 and 10: C-1 isolated eigenvalues. C = 2 also isolates its cross-class eigenvalues (0.07, 0.031, 0.018 are
    # each a factor 2 or more above the next, down to the bulk at 0.009).
    assert (digits[4]["trained"]["outliers"], digits[10]["trained"]["outliers"]) == (3, 9)
    assert digits[2]["trained"]["outliers"] == 4 and digits[2]["trained"]["gap_outliers"] == 1
    for row in section["digits"]:
        assert row["init"]["outliers"] == 0 and not row["trained"]["saturated"]
        assert row["trained"]["bulk_edge"] < row["trained"]["top"][row["trained"]["outliers"] - 1] / 2
    assert len(section["mixtures"]) == 3
    rates = {(r["data"], r["point"]): r for r in section["hit_rates"]}
    assert rates[("digits", "trained")]["new_c_minus_1"] == 2 and rates[("digits", "init")]["new_zero"] == 3
    assert rates[("digits", "trained")]["exact_runs"] == 0  # --quick builds no dense matrices


@pytest.mark.slow
def test_width_scales_the_bulk_not_the_outliers(quick):
    narrow, wide = quick[1]["width"]["rows"]
    assert (narrow["width"], wide["width"]) == (20, 40)
    assert wide["trained"]["num_params"] == 4650
    assert wide["slq_near_zero_count"] > 1.5 * narrow["slq_near_zero_count"]
    for a, b in zip(narrow["trained"]["top"][:10], wide["trained"]["top"][:10], strict=True):
        assert 0.5 < a / b < 2


@pytest.mark.slow
def test_small_batch_continuation_stays_in_the_basin(quick):
    checks = quick[1]["sblb"]["checks"]
    assert set(checks) == {"rise_then_fall", "no_barrier", "lb_sharper"}
    assert quick[1]["sblb"]["summary"]["passed"]


@pytest.mark.slow
def test_gauss_newton_explains_the_top_after_training(quick):
    rows = {(r["point"], r["width"]): r for r in quick[1]["ggn"]["rows"]}
    for key in (("trained", 20), ("trained", 40)):
        assert rows[key]["relative_gap"] < 0.05
        assert rows[key]["residual_norm"] < 0.1 * rows[key]["lambda_1"]
    assert rows[("init", 20)]["residual_norm"] > 0.3 * rows[("init", 20)]["lambda_1"]


@pytest.mark.slow
def test_report_and_figures(quick):
    out = quick[2]
    report = (out / "REPORT.md").read_text()
    for title in ("1. Spectrum at initialization", "2. Outliers track", "3. Width scales", "4. The outliers come",
                  "5. Small batch vs large batch", "6. Beyond the paper"):
        assert title in report
    assert report.count("**Paper's claim.**") == 6 and report.count("**Verdict:**") == 6
    figures = ["fig1_init_vs_trained.png", "fig2_classes.png", "fig3_width.png", "fig4_ggn.png",
               "fig5_continuation.png", "fig5_interpolation.png", "fig5_spectra.png", "fig6_class_structure.png"]
    for name in figures:
        data = (out / name).read_bytes()
        assert f"({name})" in report
        assert data.startswith(b"\x89PNG") and 10_000 < len(data) < 150_000


@pytest.fixture(scope="module")
def small_net():
    """A 10-6-6-3 MLP (M = 129) fitted to a 3-cluster mixture: small enough for dense matrices."""
    split = gaussian_mixture_tensors(3, 10, 200, cluster_std=4.0, seed=1)
    return train_net(split, 6, seed=0, mixture_steps=300)


def test_exact_spectrum_agrees_with_the_engine(small_net):
    spectrum, hessian = measure(small_net.model, small_net.x, small_net.y, k=6, num_probes=4, num_steps=60,
                                exact=True)
    exact = torch.tensor(spectrum.exact, dtype=torch.float64)
    torch.testing.assert_close(exact, torch.linalg.eigvalsh(hessian).flip(0))
    assert hessian.shape == (129, 129) and spectrum.num_params == 129
    assert spectrum.lanczos_error < 1e-8
    assert spectrum.exact_outliers == dense_outliers(exact) and spectrum.outliers == spectrum.exact_outliers
    assert spectrum.negative_count == int((exact < 0).sum())
    near_zero = float((exact.abs() < 1e-3 * exact[0]).double().mean())
    assert spectrum.near_zero_fraction == pytest.approx(near_zero)
    # SLQ with 60 steps on a 129-dimensional operator is nearly a full eigendecomposition.
    assert spectrum.slq_near_zero_fraction == pytest.approx(spectrum.exact_near_zero_fraction_coarse, abs=0.1)


def test_dense_gauss_newton_agrees_with_the_operator(small_net):
    row = compare_ggn(small_net, small_net.model, "trained", exact=True, k=4)
    torch.testing.assert_close(torch.tensor(row["exact_top_g"]), torch.tensor(row["top_g"]), atol=1e-8, rtol=1e-6)
    assert row["residual_norm"] == pytest.approx(row["exact_residual_norm"], rel=1e-3)
    assert 0 < row["ggn_rank"] <= 2 * 100  # rank(G) <= N (C - 1) with N = 100 samples, C = 3
