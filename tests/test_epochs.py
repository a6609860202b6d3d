"""Epoch mode's evaluations inside long epochs, the budget said at start, set-up errors before the first step,
and the Trainer's callbacks kept when the user adds their own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_config

from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.train import checkpoint as ckpt
from gptlab.train.callbacks import Callback, check_monitor
from gptlab.train.trainer import Trainer

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")

EPOCHS = ["train.data_mode=epoch", "train.max_iters=null", "model.dropout=0.1"]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one number that depends on the clock (tokens/s)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


def small_text(tmp_path: Path) -> Path:
    text = tmp_path / "small.txt"
    text.write_text(make_text(30))  # a few hundred blocks: epochs of some twenty steps
    return text


class CrashAt(Callback):
    """Fails after `step`, as a killed process would (no checkpoint of its own)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, metrics):
        if metrics["step"] == self.step:
            raise RuntimeError("simulated crash")


def test_epoch_mode_evaluates_and_checkpoints_inside_epochs_and_resumes_bit_identically(tmp_path):
    text = small_text(tmp_path)
    over = [*EPOCHS, "train.max_epochs=2", "train.eval_interval=4", "train.keep_last=100"]
    full_cfg = tiny_config(tmp_path / "a", text, *over)
    prepare(full_cfg.data, quiet=True)
    full = Trainer(full_cfg, quiet=True).fit()
    spe = full.steps_per_epoch
    assert 12 < spe < 40 and spe % 4  # several mid-epoch evaluations, and an epoch end between two of them
    mids = [e * spe + k for e in range(2) for k in range(4, spe, 4)]
    assert [h["step"] for h in full.history] == sorted([*mids, spe, 2 * spe])
    # epoch rows as before (the whole epoch's train loss); mid-epoch rows marked, with the loss since the last one
    assert [h["step"] for h in full.history if not h.get("mid_epoch")] == [spe, 2 * spe]
    assert all(set(h) == {"epoch", "step", "lr", "train_loss", "train_ppl", "val_loss", "val_ppl"}
               for h in full.history if not h.get("mid_epoch"))  # fmt: skip
    steps = {r["step"]: r["loss"] for r in records(full.run_dir) if "loss" in r}
    first = full.history[0]
    assert first["mid_epoch"] is True and first["epoch"] == 0
    assert first["train_loss"] == pytest.approx(sum(steps[s] for s in range(1, 5)) / 4)
    epoch0 = next(h for h in full.history if h["step"] == spe)
    assert epoch0["train_loss"] == pytest.approx(sum(steps[s] for s in range(1, spe + 1)) / spe)
    evals = [r["step"] for r in records(full.run_dir) if "val_loss" in r]
    assert evals == [h["step"] for h in full.history]  # metrics.jsonl has every evaluation, mid-epoch ones too
    saved = {p.name for p in (full.run_dir / "checkpoints").glob("step_*")}
    assert saved == {f"step_{s}" for s in evals}  # a checkpoint after each evaluation
    best_val = min(h["val_loss"] for h in full.history)
    best_step = next(h["step"] for h in full.history if h["val_loss"] == best_val)
    assert ckpt.read_pointer(full.run_dir / "checkpoints" / "best") == f"step_{best_step}"

    # a crash two steps after a mid-epoch checkpoint of the second epoch: the resume starts from that checkpoint
    mid = spe + 8
    cut_cfg = tiny_config(tmp_path / "b", text, *over)
    prepare(cut_cfg.data, quiet=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cut_cfg, callbacks=[CrashAt(mid + 2)], quiet=True).fit()
    latest = ckpt.find_checkpoint(cut_cfg.train.out_dir, "latest")
    assert latest.name == f"step_{mid}" and ckpt.read_meta(latest)["epoch"] == 1
    resumed = Trainer(cut_cfg, resume=True, quiet=True)
    assert resumed.step == mid
    resumed.fit()
    assert resumed.step == 2 * spe
    assert records(resumed.run_dir) == records(full.run_dir)  # every loss, lr and evaluation, exact floats
    assert resumed.history == full.history
    assert resumed.best_metric == full.best_metric
    a = ckpt.load_weights(full.run_dir / "checkpoints" / f"step_{2 * spe}")
    b = ckpt.load_weights(resumed.run_dir / "checkpoints" / f"step_{2 * spe}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed.run_dir / "history.json").read_text()) == full.history


def test_eval_interval_unset_is_250_steps_in_random_mode_and_epoch_ends_only_in_epoch_mode(tmp_path):
    text = small_text(tmp_path)
    cfg = tiny_config(tmp_path, text, *EPOCHS, "train.max_epochs=2", "train.eval_interval=null")
    prepare(cfg.data, quiet=True)
    run = Trainer(cfg, quiet=True).fit()
    assert [h["step"] for h in run.history] == [run.steps_per_epoch, 2 * run.steps_per_epoch]
    assert not any(h.get("mid_epoch") for h in run.history)
    random = tiny_config(tmp_path, text, "train.eval_interval=null", f"train.out_dir={tmp_path / 'random'}")
    assert Trainer(random, quiet=True).steps_per_epoch == 250  # random mode's epoch, and its evaluations


def started(capsys) -> str:
    """What the trainer's set-up printed (rich's console writes to stderr)."""
    return capsys.readouterr().err


def test_an_unreachable_max_epochs_is_said_before_the_first_step(tmp_path, capsys):
    text = small_text(tmp_path)
    cfg = tiny_config(tmp_path, text, "train.data_mode=epoch", "train.max_iters=30", "train.max_epochs=5")
    prepare(cfg.data, quiet=True)
    capsys.readouterr()
    trainer = Trainer(cfg)
    spe = trainer.steps_per_epoch
    line = (f"budget: 30 steps (max_iters) ends before max_epochs=5 ({round(30 / spe, 2):g} epochs of {spe} steps; "
            "train.max_iters=null to train all 5 epochs)")  # fmt: skip
    assert trainer.budget_note == line and trainer.total_steps == 30
    assert line in started(capsys).splitlines()
    run = Path(cfg.train.out_dir)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()  # no step has run
    # the same run with max_iters dropped trains the five epochs
    five = tiny_config(tmp_path, text, "train.data_mode=epoch", "train.max_iters=null", "train.max_epochs=5")
    assert (
        Trainer(five, overwrite=True).budget_note == f"budget: {5 * spe} steps (max_epochs) = 5 epochs of {spe} steps"
    )


def test_a_budget_conflict_is_said_before_the_first_step(tmp_path, capsys):
    text = small_text(tmp_path)
    # 4 x 16 tokens a step: 300 tokens end the run after 5 steps, long before max_iters
    cfg = tiny_config(tmp_path, text, "train.max_iters=1000", "train.max_tokens=300")
    prepare(cfg.data, quiet=True)
    capsys.readouterr()
    trainer = Trainer(cfg)
    assert trainer.budget_note == "budget: 5 steps (max_tokens) ends before max_iters=1000"
    assert trainer.total_steps == 5
    assert "budget: 5 steps (max_tokens) ends before max_iters=1000" in started(capsys).splitlines()
    assert not (Path(cfg.train.out_dir) / "metrics.jsonl").exists()
    alone = tiny_config(tmp_path, text, f"train.out_dir={tmp_path / 'alone'}")
    assert Trainer(alone, quiet=True).budget_note == "budget: 20 steps (max_iters)"


def test_a_wrong_monitor_is_refused_before_the_first_step(prepared):
    from dataclasses import replace

    cfg = replace(prepared, train=replace(prepared.train, monitor="val_acc"))
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value) == (
        "train.monitor 'val_acc' is not an evaluated metric (choose one of val_loss, val_ppl, train_loss, train_ppl)"
    )
    assert not Path(prepared.train.out_dir).exists()  # nothing written, nothing trained
    with pytest.raises(GptlabError) as e:
        check_monitor("val_exact_match", task=False)
    assert str(e.value) == (
        "train.monitor 'val_exact_match' is not an evaluated metric (val_exact_match is measured for a task "
        "(task.name=adder or sort); choose one of val_loss, val_ppl, train_loss, train_ppl)"
    )
    check_monitor("val_exact_match", task=True)
    with pytest.raises(GptlabError) as e:
        check_monitor("exact_match", task=True)
    assert str(e.value).endswith("(choose one of val_loss, val_ppl, train_loss, train_ppl, val_exact_match)")


def test_the_cli_refuses_a_wrong_monitor_in_one_line(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(30))
    tiny = ["data.source=corpus.txt", "data.dir=data", "train.out_dir=run", "--n_layer=2", "--n_head=2",
            "--n_embd=32", "--block_size=16", "--batch_size=4", "--max_iters=4", "train.device=cpu"]  # fmt: skip
    cli = [sys.executable, "-m", "gptlab"]
    assert subprocess.run([*cli, "prepare", *tiny], cwd=tmp_path, capture_output=True).returncode == 0
    r = subprocess.run(
        [*cli, "train", *tiny, "train.monitor=val_accuracy"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr == (
        "error: train.monitor 'val_accuracy' is not an evaluated metric "
        "(choose one of val_loss, val_ppl, train_loss, train_ppl)\n"
    )
    assert not (tmp_path / "run").exists()


class Recorder(Callback):
    """Remembers the events it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_step(self, trainer, metrics):
        self.seen.append(("step", metrics["step"]))

    def on_eval(self, trainer, metrics):
        self.seen.append(("eval", metrics["step"]))

    def on_checkpoint(self, trainer, path):
        self.seen.append(("checkpoint", int(path.name.removeprefix("step_"))))


def test_user_callbacks_are_added_to_the_defaults_or_replace_them_when_asked(prepared, tmp_path):
    from dataclasses import replace

    mine = Recorder()
    run = Trainer(prepared, callbacks=[mine], quiet=True).fit()
    assert [type(cb).__name__ for cb in run.callbacks][-1] == "Recorder"
    assert ("eval", 5) in mine.seen and ("checkpoint", 20) in mine.seen and ("step", 20) in mine.seen
    assert [r["step"] for r in records(run.run_dir) if "val_loss" in r] == [5, 10, 15, 20]
    assert ckpt.read_pointer(run.run_dir / "checkpoints" / "latest") == "step_20"
    assert (run.run_dir / "history.json").is_file()

    alone = replace(prepared, train=replace(prepared.train, out_dir=str(tmp_path / "alone")))
    only = Recorder()
    run = Trainer(alone, callbacks=[only], replace_callbacks=True, quiet=True).fit()
    assert run.callbacks == [only] and run.step == 20
    assert only.seen == [("step", s) for s in range(1, 21)]  # no evaluation without the Evaluator
    assert not (run.run_dir / "metrics.jsonl").exists() and not (run.run_dir / "checkpoints").exists()


def test_a_run_from_before_mid_epoch_evaluations_resumes_evaluating_at_epoch_ends(tmp_path):
    text = small_text(tmp_path)
    cfg = tiny_config(tmp_path, text, *EPOCHS, "train.max_epochs=1", "train.eval_interval=null", "train.compile=false")
    prepare(cfg.data, quiet=True)
    run = Trainer(cfg, quiet=True).fit()
    # as an older gptlab wrote it: eval_interval saved (its default, ignored in epoch mode), no schedule_unit
    config = run.run_dir / "config.yaml"
    config.write_text(config.read_text().replace("  schedule_unit: step\n", "").replace(
        "  eval_interval: null\n", "  eval_interval: 5\n"))  # fmt: skip
    assert "schedule_unit" not in config.read_text() and "eval_interval: 5" in config.read_text()
    cli = [sys.executable, "-m", "gptlab", "train", "--resume", str(run.run_dir)]
    r = subprocess.run([*cli, "train.max_epochs=2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (
        "this run was started before epoch mode evaluated inside epochs: it goes on evaluating at each epoch's end "
        "(train.eval_interval=N evaluates every N steps into each epoch)"
    ) in r.stderr
    steps = [h["step"] for h in json.loads((run.run_dir / "history.json").read_text())]
    assert steps == [run.steps_per_epoch, 2 * run.steps_per_epoch]
    assert "schedule_unit" in config.read_text()  # rewritten by this gptlab: the next resume needs no care
    # an explicit setting wins
    r = subprocess.run([*cli, "train.max_epochs=3", "train.eval_interval=5"], capture_output=True, text=True)
    assert r.returncode == 0 and "started before epoch mode" not in r.stderr
