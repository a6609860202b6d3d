"""`gptlab plot`: the PNG of two real runs is drawn and not blank; metrics records are read; the errors."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.plot import evaluation_metrics, plot_runs, read_metrics, smooth
from gptlab.train.trainer import Trainer


@pytest.fixture
def two_runs(prepared, tmp_path) -> list[Path]:
    runs = []
    for name, lr in (("small-lr", 1e-3), ("big-lr", 1e-2)):
        t = replace(prepared.train, out_dir=str(tmp_path / name), lr=lr, max_iters=6, eval_interval=3)
        runs.append(Trainer(replace(prepared, train=t), quiet=True).fit().run_dir)
    return runs


def test_plot_of_two_runs_is_drawn(two_runs, tmp_path):
    from matplotlib.image import imread

    png = plot_runs(two_runs, tmp_path / "runs.png")
    assert png == tmp_path / "runs.png" and [p.name for p in tmp_path.glob(".*")] == []  # no temporary file left
    image = imread(png)[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 600
    ink = np.any(image < 0.9, axis=-1)  # anything but the white background
    assert 0.02 < ink.mean() < 0.6
    colors = {tuple(c) for c in (image[ink] * 255).round().astype(int).tolist()}
    assert len(colors) > 20
    # both runs' colours are drawn: matplotlib's first two, C0 (#1f77b4) and C1 (#ff7f0e)
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(image * 255 - rgb) < 3).all(axis=-1).sum() > 50


def test_records_of_a_real_run(two_runs):
    steps, evals = read_metrics(two_runs[0])
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert set(steps[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert [r["step"] for r in evals] == [3, 6] and evaluation_metrics(evals) == ["val_loss", "val_ppl"]


def test_every_numeric_evaluation_metric_is_found_and_samples_are_skipped(tmp_path):
    records = [
        {"step": 1, "epoch": 0, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0},
        {"step": 1, "epoch": 0, "val_loss": 2.9, "val_ppl": 18.2},
        {"step": 1, "sample": "ROMEO: the king"},
        {"step": 2, "epoch": 0, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0},
        {
            "step": 2,
            "epoch": 0,
            "lr": 1e-3,
            "train_loss": 2.7,
            "train_ppl": 14.9,
            "val_loss": 2.4,
            "val_ppl": 11.0,
            "val_exact_match": 0.25,
            "note": "text",
        },
        {"step": 2, "checkpoint": "step_2", "val_exact_match": 0.25, "test_exact_match": 0.2},  # a task's test
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')
    steps, evals = read_metrics(tmp_path)  # the half-written last line of a crash is skipped
    assert steps == [records[0], records[3]] and evals == [records[1], records[4]]
    # the epoch's training numbers are drawn from the step records; the final test record is not a curve
    assert evaluation_metrics(evals) == ["val_loss", "val_ppl", "val_exact_match"]
    assert plot_runs([tmp_path], tmp_path / "one.png").stat().st_size > 1000


def test_smooth_is_a_bias_corrected_moving_average():
    # a = 0.9 a + 0.1 v: 0.3, 0.27 + 0.1 = 0.37; corrected by 1 - 0.9^n: 0.3 / 0.1, 0.37 / 0.19
    assert smooth([3.0, 1.0], 0.9) == pytest.approx([3.0, 0.37 / 0.19])


def test_plot_command(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "small-lr", "big-lr", "--out", "both.png"]) == 0
    assert capsys.readouterr().out == "wrote both.png\n"
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", "small-lr"]) == 0 and (tmp_path / "plot.png").is_file()


def test_plot_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "norun").mkdir()
    cases = {
        ("plot", "norun"): "error: 'norun' has no metrics.jsonl (pass the train.out_dir of a run that has trained)\n",
        (
            "plot",
            "empty",
        ): "error: 'empty/metrics.jsonl' holds no metrics (train the run for at least one step first)\n",
        ("plot", "empty", "--out", "nowhere/p.png"): (
            "error: cannot write 'nowhere/p.png': the folder 'nowhere' does not exist (create it first)\n"
        ),
    }
    for args, message in cases.items():
        assert main(list(args)) == 2
        assert capsys.readouterr().err == message
    with pytest.raises(GptlabError) as e:
        plot_runs([], "p.png")
    assert str(e.value) == "no run directories given (pass one or more train.out_dir folders)"


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.001}\n')
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an import of a missing package does
    with pytest.raises(GptlabError) as e:
        plot_runs([tmp_path], tmp_path / "p.png")
    assert str(e.value) == "plotting needs matplotlib, which is not installed (pip install 'gptlab[plot]')"
    assert not (tmp_path / "p.png").exists()
