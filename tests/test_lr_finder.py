"""The LR finder: its suggestion on a problem whose good rate is known, smoothing, stops, errors, and the GPT sweep."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptlab.cli import main
from gptlab.data.batches import load_prepared
from gptlab.errors import GptlabError
from gptlab.plot import smooth
from gptlab.train.lr_finder import find_lr, lr_sweep
from gptlab.train.trainer import TrainStep


def least_squares(curvature: float, seed: int = 0):
    """Full-batch gradient descent on 0.5 * mean((X w - y)^2), X scaled so the Hessian's top eigenvalue is `curvature`.

    A step at rate lr multiplies the error along an eigenvector of curvature c by (1 - lr c): the loss falls for
    every lr < 2/L and blows up beyond it; 1/L is the best constant rate for the top curvature L.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 16)) * np.logspace(0, -1, 16)  # curvatures spread over two decades
    x *= math.sqrt(curvature / np.linalg.eigvalsh(x.T @ x / len(x)).max())
    y = x @ rng.normal(size=16) + 0.01 * rng.normal(size=256)
    w = np.zeros(16)

    def step(lr: float) -> float:
        nonlocal w
        residual = x @ w - y
        w = w - lr * x.T @ residual / len(x)
        return float(0.5 * np.mean(residual**2))

    return step


@pytest.mark.parametrize("curvature", [0.02, 1.0, 300.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_suggestion_lands_near_the_known_good_rate(curvature, seed):
    r = lr_sweep(least_squares(curvature, seed), 1e-6 / curvature, 100 / curvature, 200)
    assert 0.05 / curvature <= r.suggestion <= 2 / curvature, r.suggestion * curvature
    assert r.suggestion < 2 / curvature < r.min_lr  # the minimum of the lagging smoothed loss lies past the edge
    # beyond 2/L the loss blows up, and the sweep stops once the smoothed loss is 4 times its best
    assert r.diverged and len(r.lrs) < 200
    assert r.smoothed[-1] > 4 * min(r.smoothed[20:-1]) and max(r.smoothed[20:-1]) <= 4 * min(r.smoothed[20:-1])
    assert r.lrs[-1] > 2 / curvature


def test_rates_grow_exponentially_and_losses_are_smoothed_with_bias_correction():
    losses = [4.0, 2.0, 3.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45]
    seen = []

    def step(lr: float) -> float:
        seen.append(lr)
        return losses[len(seen) - 1]

    r = lr_sweep(step, 1e-3, 1e-1, 10, smoothing=0.5)
    assert r.lrs == seen and r.losses == losses and not r.diverged
    assert r.lrs[0] == pytest.approx(1e-3) and r.lrs[-1] == pytest.approx(1e-1)
    assert np.allclose(np.diff(np.log(r.lrs)), math.log(100) / 9)
    # a_n = 0.5 a_(n-1) + 0.5 loss_n, smoothed_n = a_n / (1 - 0.5^n), by hand:
    # a = 2, 2, 2.5, 1.75  ->  2 / 0.5, 2 / 0.75, 2.5 / 0.875, 1.75 / 0.9375
    assert r.smoothed[:4] == pytest.approx([4.0, 8 / 3, 20 / 7, 28 / 15])
    assert r.smoothed == pytest.approx(smooth(losses, 0.5))


def test_a_nan_loss_stops_the_sweep():
    calls = []

    def step(lr: float) -> float:
        calls.append(lr)
        return 1 / (1 + 1e4 * lr) if lr < 1e-1 else math.nan

    r = lr_sweep(step, 1e-7, 10, 200)
    assert r.diverged and len(calls) == len(r.lrs) + 1 and all(math.isfinite(v) for v in r.losses)
    assert r.lrs[-1] < 1e-1 <= calls[-1]


def test_a_loss_still_falling_at_the_end_says_so():
    r = lr_sweep(lambda lr: 1 / (1 + 1e4 * lr), 1e-7, 1e-3, 200)
    assert not r.diverged and r.min_lr == r.lrs[-1]
    assert r.why.endswith("it still fell at the end of the sweep, so a higher --end-lr may find a higher rate")


@pytest.mark.parametrize(
    "step, kwargs, message",
    [
        (lambda lr: math.inf, {}, "the loss is inf at the first step (lr 1.0e-07) (lower --start-lr, or check the config (e.g. train.dtype=float32))"),
        (lambda lr: 1.0 if lr < 5e-7 else math.nan, {}, "the loss blew up after 18 of 200 steps (at lr 4.8e-07) (lower --start-lr)"),
        (lambda lr: 2.0, {}, "the smoothed loss fell by less than 1% from lr 1.0e-07 to 1.0e+01 (widen the sweep (--start-lr, --end-lr))"),
        (lambda lr: 2.0 + lr, {}, "the smoothed loss fell by less than 1% from lr 1.0e-07 to 1.0e+01 (widen the sweep (--start-lr, --end-lr))"),
        (lambda lr: 1.0, {"steps": 50}, "a sweep of 50 steps is too short to smooth its loss (smoothing=0.98) (sweep at least 100 steps (--steps))"),
        (lambda lr: 1.0, {"start_lr": 1.0, "end_lr": 0.1}, "the sweep needs 0 < start rate < end rate, got 1 and 0.1 (e.g. --start-lr 1e-7 --end-lr 10)"),
    ],
)  # fmt: skip
def test_sweeps_that_suggest_nothing_are_errors(step, kwargs, message):
    args = {"start_lr": 1e-7, "end_lr": 10.0, "steps": 200, **kwargs}
    with pytest.raises(GptlabError) as e:
        lr_sweep(step, **args)
    assert str(e.value) == message


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_find_lr_on_a_gpt_leaves_nothing_behind(prepared, tmp_path):
    cfg = prepared
    data_before = snapshot(Path(cfg.data.dir))
    files_before = sorted(tmp_path.iterdir())
    r = find_lr(cfg, steps=100)
    assert math.isfinite(r.suggestion) and 1e-7 <= r.suggestion <= r.min_lr <= 10
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) > 10
    vocab = load_prepared(cfg.data.dir).meta["vocab_size"]
    assert r.losses[0] == pytest.approx(math.log(vocab), rel=0.1)  # an untrained model's loss
    assert not Path(cfg.train.out_dir).exists()
    assert sorted(tmp_path.iterdir()) == files_before and snapshot(Path(cfg.data.dir)) == data_before
    png = r.plot(tmp_path / "lr.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_muon_rates_move_with_the_swept_rate(prepared, monkeypatch):
    rates = []
    real = TrainStep.__call__

    def spy(self, x, y):
        rates.append({type(o).__name__: sorted({g["lr"] for g in o.param_groups}) for o in self.optimizers})
        if len(rates) == 5:  # a few steps tell
            raise KeyboardInterrupt
        return real(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    cfg = replace(prepared, train=replace(prepared.train, optimizer="muon", lr=2e-3, muon_lr=0.01))
    with pytest.raises(KeyboardInterrupt):
        find_lr(cfg, start_lr=1e-6, end_lr=1.0, steps=100)
    for lr, step in zip(np.geomspace(1e-6, 1.0, 100), rates):
        assert step["AdamW"] == [pytest.approx(lr)] and step["Muon"] == [pytest.approx(5 * lr)]


def test_find_lr_command(prepared, tmp_path, capsys, monkeypatch):
    cfg = prepared
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(
        "model: {block_size: 16, n_layer: 2, n_head: 2, n_embd: 32}\n"
        f"data: {{dir: {cfg.data.dir}}}\n"
        "train: {out_dir: run, batch_size: 4, device: cpu, compile: false}\n"
    )
    assert main(["find-lr", "config.yaml", "train.seed=3", "--steps", "100", "--out", "sweep.png", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("suggested learning rate: ") and " (the smoothed loss falls fastest there" in out[0]
    rate = out[0].split()[3]
    assert out[1] == f"train with it: train.lr={rate}" and float(rate) > 0
    assert out[2] == "wrote sweep.png" and (tmp_path / "sweep.png").stat().st_size > 1000
    assert not (tmp_path / "run").exists()

    assert main(["find-lr", "config.yaml", "--out", "nowhere/sweep.png"]) == 2
    assert capsys.readouterr().err == (
        "error: cannot write 'nowhere/sweep.png': the folder 'nowhere' does not exist (create it first)\n"
    )
