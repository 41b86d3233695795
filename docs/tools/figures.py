"""Make the docs' pictures from the TensorBoard logs of a real run (``docs/img/*.png``).

    python examples/compare_runs.py                                  # writes runs/compare
    python docs/tools/figures.py runs/compare/tensorboard docs/img   # the pictures of the docs

Two kinds of picture:

- matplotlib figures drawn from the event files (``compare_eos.png``, ``compare_spectrum.png``),
  with what TensorBoard cannot draw: each run's 2 / lr and a log count axis;
- screenshots of TensorBoard itself (``tensorboard_custom_scalars.png``,
  ``tensorboard_density.png``), taken by headless Chromium from a TensorBoard server started on
  127.0.0.1 for the purpose and stopped afterwards. Skipped, with a message, where ``chromium`` is
  not installed (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RUN_COLORS = ("tab:orange", "tab:blue", "tab:green", "tab:red")


def _runs(logdir: Path) -> dict[str, object]:
    """``{run name: EventAccumulator}`` for every run folder under ``logdir``, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for folder in sorted(p for p in logdir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        runs[folder.name] = events
    return runs


def _series(events: object, tag: str) -> tuple[list[int], list[float]]:
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def _lr(folder: Path, prefix: str = "hessian") -> float:
    """The run's learning rate, from the callback's history file."""
    with open(folder / f"{prefix}_history.json") as handle:
        return float(json.load(handle)["history"][0]["lr"])


def edge_of_stability_figure(logdir: Path, path: Path, prefix: str = "hessian") -> None:
    """lambda_1 against 2 / lr, the stability ratio against 1, and the outlier count, for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(logdir)
    figure, (sharpness, ratio, outliers) = plt.subplots(1, 3, figsize=(13, 3.6))
    for (name, events), color in zip(runs.items(), RUN_COLORS, strict=False):
        lr = _lr(logdir / name, prefix)
        steps, values = _series(events, f"{prefix}/eig_1")
        sharpness.plot(steps, values, "o-", ms=3, color=color, label=name)
        sharpness.axhline(2 / lr, color=color, ls="--", lw=1, label=f"2 / lr = {2 / lr:g}")
        steps, values = _series(events, f"{prefix}/stability")
        ratio.plot(steps, values, "o-", ms=3, color=color, label=name)
        steps, values = _series(events, f"{prefix}/outliers")
        outliers.plot(steps, values, "o-", ms=3, color=color, label=name)
    ratio.axhline(1, color="black", ls="--", lw=1, label="edge of stability (1)")
    sharpness.set_title(r"$\lambda_1$ (hessian/eig_1)")
    ratio.set_title("stability (hessian/stability)")
    outliers.set_title("outliers (hessian/outliers)")
    for axes in (sharpness, ratio, outliers):
        axes.set_xlabel("step")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def spectrum_figure(logdir: Path, path: Path, prefix: str = "hessian") -> None:
    """The last measurement of every run: the bulk on a log count axis and the top k as point masses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(logdir)
    figure, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 3.6), squeeze=False, sharey=True)
    for panel, ((name, events), color) in zip(axes[0], zip(runs.items(), RUN_COLORS, strict=False), strict=True):
        bulk = events.Histograms(f"{prefix}/density/bulk")[-1]
        top = events.Histograms(f"{prefix}/density/top_k")[-1]
        value = bulk.histogram_value
        edges = [value.min, *value.bucket_limit[:-1], value.bucket_limit[-1]]
        panel.stairs(value.bucket, edges, fill=True, color=color, alpha=0.5,
                     label=f"bulk (hessian/density/bulk): {sum(value.bucket):.0f} eigenvalues")
        limits, counts = top.histogram_value.bucket_limit, top.histogram_value.bucket
        centres = [limits[i] - (limits[1] - limits[0]) / 2 for i, c in enumerate(counts) if c > 0]
        heights = [c for c in counts if c > 0]
        panel.vlines(centres, 0, heights, color="black", lw=1.5,
                     label=f"top {sum(counts):.0f} (hessian/density/top_k), one count each")
        panel.set_yscale("log")
        panel.set_ylim(0.1, None)
        panel.set_xlabel("eigenvalue")
        panel.set_title(f"{name}, step {bulk.step}")
        panel.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("eigenvalues per bin (log)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def screenshots(logdir: Path, out: Path, timeout: float = 60.0) -> list[Path]:
    """TensorBoard's Custom Scalars and Histograms tabs, as headless Chromium renders them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: no TensorBoard screenshots (apt-get install chromium)", file=sys.stderr)
        return []
    from PIL import Image

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    made = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/custom_scalars/layout", timeout=5) as response:
                    if json.loads(response.read()):
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("TensorBoard did not start")
            time.sleep(0.5)
        # (file name, page, window size, crop box): the boxes fit TensorBoard 2.21's layout at this width.
        views = [
            ("tensorboard_custom_scalars.png", "#custom_scalars&_smoothingWeight=0", (1400, 1200),
             (0, 0, 1095, 740)),
            ("tensorboard_density.png", "#histograms&tagFilter=density", (1400, 1200), (0, 0, 1020, 960)),
        ]
        with tempfile.TemporaryDirectory() as scratch:
            for name, page, (width, height), box in views:
                raw = Path(scratch) / name
                subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--window-size={width},{height}", "--virtual-time-budget=25000",
                                f"--screenshot={raw}", base + "/" + page],
                               check=True, timeout=120, capture_output=True)
                Image.open(raw).crop(box).save(out / name, optimize=True)
                made.append(out / name)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="TensorBoard directory with one folder per run")
    parser.add_argument("out", type=Path, help="folder for the PNG files (docs/img)")
    parser.add_argument("--no-screenshots", action="store_true", help="only the matplotlib figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    edge_of_stability_figure(args.logdir, args.out / "compare_eos.png")
    spectrum_figure(args.logdir, args.out / "compare_spectrum.png")
    made = [args.out / "compare_eos.png", args.out / "compare_spectrum.png"]
    if not args.no_screenshots:
        made += screenshots(args.logdir, args.out)
    for path in made:
        print(path)


if __name__ == "__main__":
    main()
