"""A real TensorBoard server shows what the callback logs: read over its HTTP API, as the web page reads it.

One short fit (a 51-parameter MLP, 4 steps, measured at 0, 2 and 4: top 10 of the Hessian and of the
Gauss-Newton matrix), then ``python -m tensorboard.main`` on 127.0.0.1 over its logs, stopped at the
end. The custom-scalars layout, each chart's tags and values, and the density views (whole spectrum,
bulk, top k) come back.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback

from helpers import ProtocolMLP, dataset, trainer

# A server process or W&B runs: seconds to a minute each.
pytestmark = pytest.mark.slow

STEPS = [0, 2, 4]
K = 10  # ten, so that the chart of eig_1 could wrongly draw eig_10 too
RUN = "fit/v0"  # TensorBoard's name for the run: its folder, relative to --logdir
STARTUP_SECONDS = 60  # bound on the server's start and first load (it takes 3-10 s here)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(base: str, path: str, **query: str) -> object:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The callback's logs, served by a TensorBoard process on a free local port."""
    root = tmp_path_factory.mktemp("tensorboard")
    callback = HessianSpectrumCallback(every_n_steps=2, k=K, matrix="both", num_samples=16, num_steps=8,
                                       num_probes=2)
    run = trainer(max_steps=4, logger=TensorBoardLogger(root, name="fit", version="v0"), callbacks=[callback])
    run.fit(ProtocolMLP(), DataLoader(dataset(), batch_size=8))
    port = _free_port()
    errors = root / "tensorboard.log"
    with open(errors, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", "127.0.0.1",
             "--port", str(port), "--load_fast", "false", "--reload_interval", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert server.poll() is None, f"TensorBoard exited: {errors.read_text()[-2000:]}"
            try:
                if RUN in _get(base, "/data/runs") and _get(base, "/data/plugin/custom_scalars/layout"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            assert time.monotonic() < deadline, f"TensorBoard not ready in {STARTUP_SECONDS} s: {errors.read_text()}"
            time.sleep(0.25)
        yield {"base": base, "history": callback.history}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _charts(layout: dict) -> dict[str, dict[str, list[str]]]:
    """``{category: {chart title: [tag regex, ...]}}`` of the layout TensorBoard serves."""
    return {category["title"]: {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
            for category in layout["category"]}


def test_layout_has_the_top_k_on_one_chart_h_and_g_together_trace_outliers_and_cost(served):
    charts = _charts(_get(served["base"], "/data/plugin/custom_scalars/layout"))
    assert set(charts) == {"hessian: spectrum", "hessian: cost"}
    spectrum, cost = charts["hessian: spectrum"], charts["hessian: cost"]
    # The top k's curve, and eig_1 at the snapshots (here every call) as a marker on it.
    assert spectrum[f"top-{K} eigenvalues of H"] == [f"^hessian/eig_{i}$" for i in range(1, K + 1)] \
        + ["^hessian/snapshot/eig_1$"]
    assert spectrum[f"top-{K} eigenvalues of G (Gauss-Newton)"] == [f"^hessian/ggn/eig_{i}$" for i in range(1, K + 1)] \
        + ["^hessian/ggn/snapshot/eig_1$"]
    assert spectrum["eig_1 of H and G"] == ["^hessian/eig_1$", "^hessian/ggn/eig_1$"]
    assert spectrum["trace"] == ["^hessian/trace$", "^hessian/ggn/trace$"]
    assert spectrum["outlier count"] == ["^hessian/outliers$", "^hessian/ggn/outliers$"]
    assert sorted(tag for tags in cost.values() for tag in tags) == [
        "^hessian/matvecs$", "^hessian/overhead$", "^hessian/seconds$", "^hessian/snapshot$"]


def test_every_chart_draws_its_tags_at_every_measured_step(served):
    """What the page requests for each line of a chart: the regex matches exactly its tag, with all steps."""
    base, history = served["base"], served["history"]
    charts = _charts(_get(base, "/data/plugin/custom_scalars/layout"))
    for category in charts.values():
        for title, regexes in category.items():
            for regex in regexes:
                answer = _get(base, "/data/plugin/custom_scalars/scalars", run=RUN, tag=regex)
                assert answer["regex_valid"], (title, regex)
                tag = regex.strip("^$")
                assert list(answer["tag_to_events"]) == [tag], (title, regex)  # eig_1 does not draw eig_10
                assert [step for _, step, _ in answer["tag_to_events"][tag]] == STEPS, (title, tag)
    together = _get(base, "/data/plugin/custom_scalars/scalars", run=RUN, tag="^hessian/eig_1$")["tag_to_events"]
    assert [value for _, _, value in together["hessian/eig_1"]] == pytest.approx(
        [m.hessian.eigenvalues[0] for m in history])
    ggn = _get(base, "/data/plugin/scalars/scalars", run=RUN, tag="hessian/ggn/eig_1")
    assert [value for _, _, value in ggn] == pytest.approx([m.ggn.eigenvalues[0] for m in history])


def _histograms(base: str, tag: str) -> list[tuple[int, list[list[float]]]]:
    """``[(step, [[left, right, count], ...]), ...]`` as the histograms dashboard receives them."""
    return [(step, buckets) for _, step, buckets in _get(base, "/data/plugin/histograms/histograms", run=RUN, tag=tag)]


def test_density_views_show_the_bulk_and_the_top_k_apart(served):
    base, history = served["base"], served["history"]
    for matrix, prefix in (("hessian", "hessian"), ("ggn", "hessian/ggn")):
        whole, bulk, top = (_histograms(base, f"{prefix}/{view}") for view in ("density", "density/bulk",
                                                                                  "density/top_k"))
        assert [step for step, _ in whole] == [step for step, _ in bulk] == [step for step, _ in top] == STEPS
        for measurement, (_, whole_buckets), (_, bulk_buckets), (_, top_buckets) in zip(history, whole, bulk, top,
                                                                                       strict=True):
            measured = getattr(measurement, matrix)
            params, eigenvalues = measured.num_params, measured.eigenvalues
            assert all(measured.converged)  # so the top k were deflated and placed exactly
            # Every view counts eigenvalues: P in all, P - k in the bulk, one per top eigenvalue.
            assert sum(c for _, _, c in whole_buckets) == pytest.approx(params, rel=0.02)
            assert sum(c for _, _, c in bulk_buckets) == pytest.approx(params - K, rel=0.02)
            assert sum(c for _, _, c in top_buckets) == pytest.approx(K)
            # Each top eigenvalue is a point mass: a filled bucket around it, all within the top k's range.
            filled = [(left, right, count) for left, right, count in top_buckets if count > 0]
            assert sum(count for _, _, count in filled) == pytest.approx(K)
            for value in eigenvalues:
                assert any(left - 1e-9 <= value <= right + 1e-9 for left, right, _ in filled), value
            # The outermost buckets are narrow ones around the smallest and the largest of the top k.
            span, slack = max(eigenvalues) - min(eigenvalues), 1e-6 * max(eigenvalues)
            (low_left, low_right, _), (high_left, high_right, _) = top_buckets[0], top_buckets[-1]
            assert low_left - slack <= min(eigenvalues) <= low_right + slack
            assert high_left - slack <= max(eigenvalues) <= high_right + slack
            assert max(low_right - low_left, high_right - high_left) < 0.05 * max(span, max(eigenvalues))
            # The bulk has its own range: below the largest eigenvalue, and narrower than the whole view.
            assert bulk_buckets[-1][1] < eigenvalues[0]
            assert bulk_buckets[-1][1] - bulk_buckets[0][0] < whole_buckets[-1][1] - whole_buckets[0][0]


def test_two_callbacks_share_one_layout_written_once_each(tmp_path):
    """TensorBoard reads the last layout of a run: a second callback's categories join the first's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    from lightning_hessian.loggers import tensorboard_layout, write_tensorboard_layout

    writer = SummaryWriter(str(tmp_path))
    for name in ("hessian", "other", "hessian"):  # the repeat changes nothing, so writes nothing
        write_tensorboard_layout(writer, tensorboard_layout(name, k=2))
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    written = events.Tensors("custom_scalars__config__")
    assert len(written) == 2
    layout = layout_pb2.Layout()
    layout.ParseFromString(written[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["hessian: spectrum", "hessian: cost", "other: spectrum",
                                                 "other: cost"]
