"""The console script: every fit config in configs/ trains and logs spectra; subcommands dispatch."""

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_hessian.cli import _EXPERIMENTS, _load, main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _is_fit_config(path: Path) -> bool:
    return not path.read_text().startswith("# not a fit config")


def _scalars(root: Path) -> dict[str, list[float]]:
    (events,) = root.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_configs_exist():
    assert {"digits.yaml", "gaussian_mixture.yaml", "cnn_digits.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_fit_config_trains_and_logs_the_spectrum(config, tmp_path, monkeypatch):
    if not _is_fit_config(config):
        pytest.skip(f"{config.name} is marked '# not a fit config'")
    monkeypatch.chdir(tmp_path)  # relative paths in a config land in tmp_path
    (callback,) = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_hessian.HessianSpectrumCallback"
    args = ["fit", "--config", str(config), "--trainer.max_steps=5", f"--trainer.default_root_dir={tmp_path}",
            *QUIET]
    assert main(args) == 0
    scalars = _scalars(tmp_path)
    k = callback["init_args"]["k"]
    # One measurement at step 0 and one after the last step.
    assert len(scalars["hessian/eig_1"]) == 2
    assert scalars["hessian/eig_1"][-1] >= scalars[f"hessian/eig_{k}"][-1] > 0


def test_print_config(capsys):
    digits = next(p for p in CONFIGS if p.name == "digits.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(digits), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_hessian.paper.models.MLPClassifier"
    assert printed["model"]["init_args"]["hidden_sizes"] == [20, 20]
    assert printed["data"]["init_args"]["scaling"] == "unit"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lightning_hessian.HessianSpectrumCallback"


def test_classes_by_import_path_without_a_config(tmp_path):
    args = ["fit", "--model", "lightning_hessian.paper.models.MLPClassifier", "--model.hidden_sizes=[8]",
            "--data", "lightning_hessian.paper.data.DigitsDataModule", "--data.classes=3", "--data.num_train=100",
            "--model.num_classes=3", "--trainer.max_steps=2", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    assert main(args) == 0


def test_experiments_are_registered(capsys):
    assert callable(_load(_EXPERIMENTS["reproduce"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
