"""`ember report`: PNG plots and an offline HTML page from real runs' logs.jsonl (real matplotlib)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ember import Trainer, TrainingArguments
from ember.cli import main
from ember.report.plots import RunLog, find_runs, panels_for, run_names, smooth
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# tab10's first two colours: run 1 and run 2.
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def token_accuracy(pred: Any) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids
    guess = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    return {"token_accuracy": float((guess == target)[mask].mean())}


def train_run(folder: Path, learning_rate: float) -> Path:
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=12,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        report_to="jsonl",
        disable_tqdm=True,
        save_strategy="no",
        device_peak_flops=1e12,  # so the logs carry MFU
    )
    trainer = Trainer(
        tiny_gpt2(),
        args,
        train_dataset=lm_examples(32),
        eval_dataset=lm_examples(8, seed=1),
        data_collator=pad_lm_batch,
        compute_metrics=token_accuracy,
    )
    trainer.train()
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return train_run(root / "fast", 3e-3), train_run(root / "slow", 1e-4)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def has_colour(path: Path, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    from matplotlib.image import imread

    pixels = (imread(path)[..., :3] * 255).astype(np.int16)
    return bool((np.abs(pixels - np.array(rgb)).max(-1) <= tolerance).any())


EXPECTED = {
    "overview",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "mfu",
    "eval_token_accuracy",
}


def test_report_of_one_run_writes_readable_pngs_and_a_self_contained_page(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs[0]
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "train loss first / last" in printed and "report.html" in printed
    out = run / "report"
    pngs = {p.stem: p for p in out.glob("*.png")}
    assert set(pngs) == EXPECTED
    for path in pngs.values():
        width, height = png_size(path)
        assert 400 <= width <= 2000 and 250 <= height <= 2000, (path.name, width, height)
        assert has_colour(path, BLUE) and not has_colour(path, ORANGE)  # one run, one colour
    assert png_size(pngs["overview"])[1] > png_size(pngs["loss"])[1]  # all panels in a grid
    page = (out / "report.html").read_text()
    for path in pngs.values():  # embedded, so the page shows the plots offline and alone
        assert f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" in page
    assert "train loss first / last" in page and 'src="http' not in page


def test_two_runs_are_overlaid_one_colour_each(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    for name in EXPECTED:
        path = out / f"{name}.png"
        png_size(path)
        assert has_colour(path, BLUE) and has_colour(path, ORANGE), name
    page = (out / "report.html").read_text()
    assert page.count("<pre>") == 2 and "fast" in page and "slow" in page

    # Without --out, the report goes next to the runs.
    assert main(["report", str(runs[0]), str(runs[1]), "--no-plots"]) == 0
    assert not (runs[0].parent / "report").exists()
    assert main(["report", str(runs[0]), str(runs[1])]) == 0
    assert (runs[0].parent / "report" / "report.html").is_file()


def test_lines_per_panel_follow_the_runs(runs: tuple[Path, Path]) -> None:
    from matplotlib.figure import Figure

    from ember.cli.main import read_logs
    from ember.report.plots import _colors, _draw

    logs = [RunLog(p.name, read_logs(p / "logs.jsonl")) for p in runs]
    panels = {p.name: p for p in panels_for(logs)}
    colors = _colors(2)
    ax = Figure().add_subplot()
    _draw(ax, panels["loss"], logs, colors, run_legend=True)
    # Per run: faint raw train loss, smoothed train loss (12 points), eval loss (3 points).
    lines = ax.get_lines()
    assert len(lines) == 6
    assert [len(line.get_xdata()) for line in lines] == [12, 12, 3] * 2
    assert {tuple(line.get_color()) for line in lines[:3]} == {tuple(colors[0])}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["fast", "slow", "train", "eval"]
    ax = Figure().add_subplot()
    _draw(ax, panels["mfu"], logs[:1], colors, run_legend=False)
    mfu = [r["mfu"] for r in logs[0].records if "mfu" in r and "loss" in r]
    assert max(ax.get_lines()[0].get_ydata()) == pytest.approx(100 * max(mfu))  # in percent


def test_missing_matplotlib_is_a_clear_error_after_the_text(runs: tuple[Path, Path], tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # any `import matplotlib` now fails
        "from ember.cli import main\n"
        f"sys.exit(main(['report', {str(runs[1])!r}, '--out', {str(tmp_path / 'r')!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install matplotlib" in done.stderr and "ember[report]" in done.stderr
    assert "train loss first / last" in done.stdout
    assert not (tmp_path / "r").exists()


def test_a_folder_of_search_runs_is_read_in_trial_order(runs: tuple[Path, Path], tmp_path: Path) -> None:
    for n in (10, 2, 0):
        shutil.copytree(runs[n % 2], tmp_path / "search" / f"run-{n}")
    logs = find_runs([str(tmp_path / "search")])
    assert [p.parent.name for p in logs] == ["run-0", "run-2", "run-10"]
    # Same folder names in two places get their parent folder in the name.
    shutil.copytree(tmp_path / "search", tmp_path / "other")
    both = find_runs([str(tmp_path / "search" / "run-0"), str(tmp_path / "other" / "run-0")])
    assert run_names(both) == ["search/run-0", "other/run-0"]


def test_smoothing_keeps_level_and_short_curves() -> None:
    assert smooth([3.0] * 50) == pytest.approx([3.0] * 50)
    assert smooth([1.0, 5.0, 2.0]) == [1.0, 5.0, 2.0]
    noisy = [1.0 + (-1) ** i for i in range(100)]
    assert np.std(smooth(noisy)[20:]) < 0.2 * np.std(noisy)


def test_logs_without_numbers_give_no_panels(tmp_path: Path) -> None:
    (tmp_path / "logs.jsonl").write_text(json.dumps({"step": 1, "loss": None}) + "\n")
    assert panels_for([RunLog("x", [{"step": 1, "loss": None}])]) == []
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "report.html").is_file()


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path: Path) -> None:
    # The object API with the Agg canvas: a notebook's or GUI's backend stays as it was.
    code = (
        "import sys, matplotlib; matplotlib.use('svg'); from pathlib import Path\n"
        "from ember.report.plots import RunLog, draw_plots\n"
        "records = [{'step': s, 'loss': 1.0 / s} for s in range(1, 20)]\n"
        f"assert draw_plots([RunLog('a', records)], Path({str(tmp_path)!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules and matplotlib.get_backend() == 'svg'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0
    assert png_size(tmp_path / "loss.png")[0] > 0


def test_a_transformers_run_is_read_from_its_trainer_state(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run of transformers' Trainer has no logs.jsonl; its trainer_state.json's log_history is drawn
    beside an ember run, so the two Trainers' curves can be compared in one picture."""
    import transformers

    folder = tmp_path / "hf"
    args = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=6, logging_steps=1, per_device_train_batch_size=4,
        learning_rate=3e-3, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        tiny_gpt2(), args, train_dataset=lm_examples(32), data_collator=pad_lm_batch
    )
    trainer.train()
    trainer.save_state()
    assert find_runs([str(folder)]) == [folder / "trainer_state.json"]
    out = tmp_path / "both"
    assert main(["report", str(runs[0]), str(folder), "--out", str(out)]) == 0
    assert has_colour(out / "loss.png", BLUE) and has_colour(out / "loss.png", ORANGE)
    page = (out / "report.html").read_text()
    assert "train loss first / last" in page and page.count("<pre>") == 2

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trainer_state.json").write_text('{"global_step": 3}')
    assert main(["report", str(tmp_path / "bad"), "--no-plots"]) != 0
    assert "has no log_history list" in capsys.readouterr().err


def test_timing_figures_of_an_evaluation_are_not_drawn_as_metrics() -> None:
    # transformers logs eval_model_preparation_time with every evaluation: a time, not a metric
    records = [
        {"step": s, "eval_loss": 1.0 / s, "eval_accuracy": 0.5 + s / 10, "eval_runtime": 2.0,
         "eval_samples_per_second": 9.0, "eval_model_preparation_time": 0.01}
        for s in (1, 2, 3)
    ]  # fmt: skip
    names = {panel.name for panel in panels_for([RunLog("hf", records)])}
    assert names == {"loss", "eval_accuracy"}
