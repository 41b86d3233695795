"""The benchmark harness: its metrics against closed forms, and `python -m benchmarks.run` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder of the repository, not an installed package

from benchmarks.measure import relative_errors, wasserstein1, wasserstein1_grid  # noqa: E402
from benchmarks.scale import FIXED_MMAP_THRESHOLD  # noqa: E402


def test_wasserstein1_of_shifted_spectrum_is_the_shift_over_the_range():
    exact = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    shifted = exact + 0.1
    assert wasserstein1(shifted, torch.ones(5), exact) == pytest.approx(0.1 / 4)
    assert wasserstein1(exact, torch.ones(5), exact) == pytest.approx(0.0, abs=1e-15)


def test_wasserstein1_of_all_mass_at_the_mean():
    # Moving every eigenvalue of {0, 4} to 2 costs |0 - 2| / 2 + |4 - 2| / 2 = 2, over a range of 4.
    assert wasserstein1(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0, 4.0])) == pytest.approx(0.5)


def test_wasserstein1_grid_of_a_gaussian_matches_the_quantile_coupling():
    # N(1.2, s^2) against {1 (mass 3/4), 3 (mass 1/4)}: the lower 3/4 of the Gaussian goes to 1, the rest
    # to 3, which costs 0.75 * 0.2 + 0.25 * 1.8 - 2 s phi(z) with z the 3/4 quantile; the range is 2.
    sigma = 0.01
    grid = torch.linspace(-1, 3, 4001, dtype=torch.float64)
    bump = torch.exp(-0.5 * ((grid - 1.2) / sigma) ** 2)
    normal = NormalDist()
    expected = (0.6 - 2 * sigma * normal.pdf(normal.inv_cdf(0.75))) / 2
    assert wasserstein1_grid(grid, bump, torch.tensor([1.0, 1.0, 1.0, 3.0])) == pytest.approx(expected, rel=1e-4)


def test_relative_errors_sort_and_penalize_ghost_copies():
    exact = torch.tensor([3.0, 2.0, 1.0])
    assert relative_errors(torch.tensor([1.0, 3.0, 2.0]), exact, (1, 3)) == {1: 0.0, 3: 0.0}
    errors = relative_errors(torch.tensor([3.0, 3.0, 2.0]), exact, (1, 2, 3))  # a ghost copy of the top one
    assert errors[1] == 0.0 and errors[2] == pytest.approx(0.5) and errors[3] == pytest.approx(1.0)


@pytest.mark.slow
def test_run_writes_results_with_verdicts(tmp_path):
    out = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "benchmarks.run", "--smoke", "--no-peers", "--workloads", "mixture-mlp",
               "--callback-epochs", "0", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    text = out.read_text()
    assert "python -m benchmarks.run --smoke --no-peers" in text
    assert "GPU figures: pending" in text
    verdict = next(line for line in text.splitlines() if line.startswith("| mixture-mlp | top-10 relative error"))
    assert verdict.endswith("| yes |"), verdict
    for heading in ("### Top-10 eigenvalues", "### Spectral density (SLQ)", "### Trace (exact:",
                    "### Product cost relative to one gradient", "### Warm start", "## Memory"):
        assert heading in text


def _fingerprints(environment: dict[str, str]) -> list[dict]:
    """`python -m benchmarks.workloads --smoke` on the float32 workloads in a fresh process with extra
    environment variables: one JSON line per workload (weights digest, reference, product rounding,
    our default top-10 error measured with one thread)."""
    command = [sys.executable, "-m", "benchmarks.workloads", "--smoke", "--workloads", "digits-mlp-250k,digits-cnn"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **environment}, check=True, capture_output=True,
                          text=True, timeout=180)
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def one_thread_build() -> list[dict]:
    return _fingerprints({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


@pytest.mark.slow
def test_float32_workloads_and_their_errors_do_not_depend_on_the_thread_count(one_thread_build):
    # Trained in float32 with the caller's threads, the smoke digits-cnn came out with other weights
    # (and a reference 1e-4 away) under two threads than under one.
    two = _fingerprints({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert [w["name"] for w in one_thread_build] == ["digits-mlp-250k", "digits-cnn"]
    assert all(w["dtype"] == "float32" and w["product_rounding"] > 0 for w in one_thread_build)
    for first, second in zip(one_thread_build, two, strict=True):
        assert first == second, (first["name"], first, second)  # weights, reference, rounding, error, products


@pytest.mark.slow
def test_float32_workloads_survive_other_cpu_kernels(one_thread_build):
    # AVX2 kernels in place of wider ones (a no-op on a CPU without them): float32 training gave other
    # weights; float64 training cast to float32 gives the same ones. The products, hence the measured
    # error and the rounding, may differ: they are float32.
    other = _fingerprints({"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                           "DNNL_MAX_CPU_ISA": "AVX2"})
    for first, second in zip(one_thread_build, other, strict=True):
        assert first["sha256"] == second["sha256"], first["name"]
        assert second["reference"] == pytest.approx(first["reference"], rel=1e-12), first["name"]


@pytest.mark.slow
def test_scale_suite_writes_every_table_and_a_verdict_per_target(tmp_path):
    out = tmp_path / "RESULTS-scale.md"
    command = [sys.executable, "-m", "benchmarks.scale", "--smoke", "--workloads", "mlp", "--no-overhead-run",
               "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    for heading in ("## One default call", "## Memory of a call", "## Warm starts along training", "## Verdicts"):
        assert heading in text
    assert f"MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD['MALLOC_MMAP_THRESHOLD_']}" in text
    verdicts = [line for line in text.splitlines() if line.startswith(("| mlp | at most", "| mlp | median warm"))]
    assert len(verdicts) == 3, verdicts


@pytest.mark.slow
def test_warm_start_benchmark_tabulates_both_starts_in_both_phases(tmp_path):
    out = tmp_path / "RESULTS-warm.md"
    command = [sys.executable, "-m", "benchmarks.warm_start", "--smoke", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "| from initialization: median |" in text and "| after 300 steps: median |" in text
    rows = [line for line in text.splitlines() if line.startswith("| after 300 steps | ")]
    assert len(rows) == 5 and all(int(line.split("|")[5]) >= 5 for line in rows)  # a warm start costs at least k


@pytest.mark.slow
def test_overhead_benchmark_sets_the_steps_that_hold_a_call_apart(tmp_path):
    out = tmp_path / "RESULTS-overhead.md"
    command = [sys.executable, "-m", "benchmarks.overhead", "--smoke", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| with")]
    calls = {row[1].strip(): int(row[5]) for row in rows}
    assert calls == {"without, 1": 0, "with, 1": 3, "without, 2": 0, "with, 2": 3}


@pytest.mark.slow
def test_memory_report_measures_a_call_a_product_and_a_training_step_in_fresh_processes(tmp_path):
    out = tmp_path / "RESULTS-memory.md"
    command = [sys.executable, "-m", "benchmarks.scale", "--smoke", "--memory", "--workloads", "cnn", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    row = next(line.split("|") for line in out.read_text().splitlines() if line.startswith("| cnn | "))
    cold, warm = (float(value) for value in row[5].split(";"))
    micro_batch, product, step = (float(row[i].replace(",", "")) for i in (6, 7, 8))
    assert cold > 0 and warm > 0 and product > 0 and step > 0 and 1 <= micro_batch <= 64
    assert "| cnn | at most 100 bytes per parameter" in out.read_text()


@pytest.mark.slow
def test_budgeted_runs_alternate_and_report_wall_and_cpu_overhead(tmp_path):
    out = tmp_path / "RESULTS-scale.md"
    command = [sys.executable, "-m", "benchmarks.scale", "--smoke", "--workloads", "mlp", "--calls", "2",
               "--no-allocation-peak", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    row = next(line.split("|") for line in text.splitlines() if line.startswith("| mlp | 100 |"))
    assert len(row[4].split(",")) == 2 and len(row[5].split(",")) == 2  # two runs without, two with
    assert "overhead of a default run at most the budget plus one call (wall; CPU)" in text
    assert "top-k products of the calls after the first along the run" in text


@pytest.mark.slow
def test_curves_writes_every_part(tmp_path):
    out = tmp_path / "RESULTS-curves.md"
    command = [sys.executable, "-m", "benchmarks.curves", "--smoke", "--workloads", "mlp", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    for title in ("What one call costs", "A short run at defaults", "A tracked value against the snapshot's",
                  "Tracking every step", "A budgeted run of the MLP"):
        assert f"## {title}" in text, title
