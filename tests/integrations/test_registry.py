"""The report_to registry: names, "all", "none", and a missing package's error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember import Trainer, TrainingArguments
from ember.callbacks import build_callbacks
from ember.integrations import TRACKERS, TrackerNotInstalledError, available_trackers, rewrite_logs
from ember.integrations.jsonl import JsonlLoggerCallback
from tests.helpers import RegressionDataset, RegressionModel
from tests.integrations.tracking import train_tiny

TRACKER_FILES = ("runs", "wandb", "mlruns", "mlflow.db", "trackio")


def _block(monkeypatch, *modules: str) -> None:
    """Make `modules` unimportable: ``import x`` raises ImportError while sys.modules["x"] is None."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_registry_names_match_args_and_every_tracker_loads():
    from ember.args import REPORT_TO_BACKENDS

    assert REPORT_TO_BACKENDS == tuple(TRACKERS) == ("jsonl", "tensorboard", "wandb", "mlflow", "trackio")
    for tracker in TRACKERS.values():
        if tracker.is_available():
            assert callable(tracker.load().on_log)


def test_import_ember_and_validating_report_to_import_no_tracker_package():
    code = (
        "import sys, ember\n"
        "from ember import TrainingArguments\n"
        "TrainingArguments(output_dir='o', report_to='all')\n"
        "print(sorted(m for m in ('wandb', 'mlflow', 'trackio', 'tensorboard', 'torch.utils.tensorboard')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_all_means_jsonl_plus_the_installed_backends(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    _block(monkeypatch, "wandb", "mlflow", "trackio")
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlflow.db
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert available_trackers() == ["jsonl", "tensorboard"]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="all")
    assert args.report_to == ["jsonl", "tensorboard"]

    trainer = train_tiny(str(tmp_path / "out"), "all", eval_strategy="no")
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert "TensorBoardCallback" in names and names.count("JsonlLoggerCallback") == 1
    assert not any(n in names for n in ("WandbCallback", "MLflowCallback", "TrackioCallback"))
    assert (tmp_path / "out" / "runs").is_dir() and (tmp_path / "out" / "logs.jsonl").is_file()
    assert not any((tmp_path / d).exists() or (tmp_path / "out" / d).exists() for d in TRACKER_FILES[1:])


@pytest.mark.parametrize(
    ("name", "module"),
    [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard"), ("trackio", "trackio")],
)
def test_a_named_backend_that_is_not_installed_fails_at_construction(tmp_path, monkeypatch, name, module):
    _block(monkeypatch, module)
    assert name not in available_trackers()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["jsonl", name], use_cpu=True)
    with pytest.raises(TrackerNotInstalledError, match=rf"report_to='{name}'.*pip install {module}") as err:
        Trainer(RegressionModel(), args, train_dataset=RegressionDataset(8))
    assert isinstance(err.value, ImportError) and "report_to" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_none_adds_no_tracker_and_writes_no_tracker_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer = train_tiny(str(tmp_path / "out"), "none")
    modules = {type(cb).__module__ for cb in trainer.callback_handler.callbacks}
    assert not modules & {f"ember.integrations.{n}" for n in ("tensorboard", "wandb", "mlflow", "trackio")}
    for root in (tmp_path, tmp_path / "out"):
        assert not any((root / d).exists() for d in TRACKER_FILES)


def test_a_tracker_the_user_passed_is_not_added_twice(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from ember.integrations.tensorboard import TensorBoardCallback

    own = TensorBoardCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard"], disable_tqdm=True)
    callbacks = build_callbacks(args, [own])
    assert [cb for cb in callbacks if isinstance(cb, TensorBoardCallback)] == [own]
    assert not any(isinstance(cb, JsonlLoggerCallback) for cb in callbacks)  # jsonl was not asked for


def test_rewrite_logs_uses_section_prefixes():
    logs = {"loss": 1.0, "eval_loss": 2.0, "eval_f1": 0.5, "test_acc": 0.1, "evaluation_x": 3, "epoch": 1.0}
    assert rewrite_logs(logs) == {
        "train/loss": 1.0,
        "eval/loss": 2.0,
        "eval/f1": 0.5,
        "test/acc": 0.1,
        "train/evaluation_x": 3,
        "train/epoch": 1.0,
    }
