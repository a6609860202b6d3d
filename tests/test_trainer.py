import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_config

from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.train import checkpoint as ckpt
from gptlab.train.callbacks import Callback
from gptlab.train.trainer import Trainer

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]


class StopAt(Callback):
    """Asks the trainer to stop after `step`, as Ctrl-C does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, metrics):
        if metrics["step"] == self.step:
            trainer._stop_requested = True


@pytest.mark.parametrize(
    "mode,shard_tokens,switches",
    [
        ("random", None, []),
        ("epoch", None, []),
        ("random", 300, []),
        ("epoch", 300, []),
        ("random", None, ["model.x0_lambdas=true", "model.value_embeds=true"]),  # their parameters on AdamW
    ],
    ids=["random", "epoch", "random-shards", "epoch-shards", "random-x0_lambdas+value_embeds"],
)
def test_resume_is_bit_identical(tmp_path, mode, shard_tokens, switches):
    text = tmp_path / "small.txt"
    text.write_text(make_text(30))  # small, so epoch mode crosses epoch boundaries within the run
    over = [f"train.data_mode={mode}", "train.max_iters=30", "model.dropout=0.1", "train.optimizer=muon", *switches]
    if shard_tokens:
        over.append(f"data.shard_tokens={shard_tokens}")
    full_cfg = tiny_config(tmp_path / "a", text, *over)
    prepare(full_cfg.data, quiet=True)
    if shard_tokens:
        assert len(json.loads((tmp_path / "a" / "data" / "meta.json").read_text())["shards"]["train"]) >= 4
    full = Trainer(full_cfg, quiet=True).fit()
    if mode == "epoch":
        assert full.steps_per_epoch < 30  # at least one epoch boundary is crossed

    cut_cfg = tiny_config(tmp_path / "b", text, *over)
    prepare(cut_cfg.data, quiet=True)
    cut = Trainer(cut_cfg, quiet=True)
    cut.callbacks.append(StopAt(13))  # mid-epoch, between checkpoints
    cut.fit()
    assert cut.step == 13 and ckpt.read_pointer(cut.run_dir / "checkpoints" / "latest") == "step_13"
    resumed = Trainer(cut_cfg, resume=True, quiet=True).fit()
    assert resumed.step == 30
    assert step_losses(resumed.run_dir) == step_losses(full.run_dir)  # exact float equality
    assert val_losses(resumed.run_dir) == val_losses(full.run_dir)
    assert resumed.history == full.history


def test_resume_can_extend_max_iters_but_not_change_the_model(prepared, tmp_path):
    Trainer(prepared, quiet=True).fit()
    from dataclasses import replace

    longer = replace(prepared, train=replace(prepared.train, max_iters=25))
    assert Trainer(longer, resume=True, quiet=True).fit().step == 25
    wider = replace(prepared, model=replace(prepared.model, n_embd=64))
    with pytest.raises(GptlabError) as e:
        Trainer(wider, resume=True, quiet=True)
    assert str(e.value) == (
        "cannot resume with changed model.d_ff, model.n_embd "
        "(resume keeps the model, data, task, seed, batch size, data mode, monitored metric, weight-decay groups and "
        "LoRA settings; start a new run to change them)"
    )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resume_runs_at_this_run_s_learning_rates_and_decay(prepared, optimizer):
    from dataclasses import replace

    cfg = replace(prepared, train=replace(prepared.train, optimizer=optimizer))
    Trainer(cfg, quiet=True).fit()
    changed = replace(cfg.train, max_iters=25, lr=5e-4, muon_lr=3e-3, weight_decay=0.05, beta2=0.9)
    resumed = Trainer(replace(cfg, train=changed), resume=True, quiet=True)
    groups = [(type(opt).__name__, g) for opt in resumed.optimizers for g in opt.param_groups]
    assert {g["peak_lr"] for name, g in groups} == ({5e-4, 3e-3} if optimizer == "muon" else {5e-4})
    assert {g["weight_decay"] for name, g in groups} == {0.05, 0.0}
    assert {g["betas"] for name, g in groups if name == "AdamW"} == {(0.9, 0.9)}
    # the state itself came back: AdamW's step counts and moments are the checkpoint's
    adam = next(opt for opt in resumed.optimizers if isinstance(opt, torch.optim.AdamW))
    assert all(int(s["step"]) == 20 for s in adam.state.values())
    resumed.fit()
    last = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["lr"] == pytest.approx(adam.param_groups[0]["lr"])  # what is logged is what it ran at


def test_existing_run_dir_needs_resume_or_overwrite(prepared):
    Trainer(prepared, quiet=True).fit()
    with pytest.raises(GptlabError) as e:
        Trainer(prepared, quiet=True)
    assert str(e.value) == (
        f"run directory '{prepared.train.out_dir}' already exists "
        "(pass --resume to continue it, --overwrite to start over, or set train.out_dir)"
    )
    assert Trainer(prepared, overwrite=True, quiet=True).step == 0


def test_run_directory_layout(prepared):
    t = Trainer(prepared, quiet=True).fit()
    run = Path(prepared.train.out_dir)
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "history.json",
        "checkpoints",
        "run.json",
    }
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    best = ckpt.read_pointer(run / "checkpoints" / "best")
    assert ckpt.read_pointer(run / "checkpoints" / "latest") == "step_20"
    assert set(steps) == {"step_15", "step_20", best}  # keep_last=2 plus the best
    best_val = min(h["val_loss"] for h in t.history)
    assert best == f"step_{next(h['step'] for h in t.history if h['val_loss'] == best_val)}"
    meta = json.loads((run / "checkpoints" / "step_20" / "meta.json").read_text())
    assert meta == {
        "format_version": 2, "step": 20, "world_size": 1, "parallel": "none", "optimizer": "adamw", "backend": "torch", "epoch": 3,
        "tokens": 20 * 4 * 16,
    }  # fmt: skip
    assert {p.name for p in (run / "checkpoints" / "step_20").iterdir()} == {
        "model.safetensors", "meta.json", "state.pt", "train_state",
    }  # fmt: skip
    state = torch.load(run / "checkpoints" / "step_20" / "state.pt", weights_only=True)
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert [h["step"] for h in t.history] == [5, 10, 15, 20] and t.history[-1]["val_loss"] < t.history[0]["val_loss"]


def test_gradient_accumulation_matches_the_full_batch(prepared, tmp_path):
    from dataclasses import replace

    a = Trainer(prepared, quiet=True).fit()
    cfg = replace(prepared, train=replace(prepared.train, micro_batch_size=1, out_dir=str(tmp_path / "acc")))
    b = Trainer(cfg, quiet=True).fit()
    for (_, la), (_, lb) in zip(step_losses(a.run_dir), step_losses(b.run_dir)):
        assert la == pytest.approx(lb, abs=1e-5)


def test_token_and_epoch_budgets_take_the_smallest(prepared):
    from dataclasses import replace

    t = replace(prepared.train, max_iters=1000, max_tokens=64 * 7 + 1, max_epochs=None)
    assert Trainer(replace(prepared, train=t), quiet=True).total_steps == 8
    t = replace(prepared.train, max_iters=1000, max_epochs=2)
    assert Trainer(replace(prepared, train=t), overwrite=True, quiet=True).total_steps == 10


def test_vocabulary_mismatch(prepared):
    from dataclasses import replace

    cfg = replace(prepared, model=replace(prepared.model, vocab_size=5))
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value).startswith(f"vocabulary mismatch: the data in '{prepared.data.dir}' has ")
    assert str(e.value).endswith(
        "model.vocab_size is 5 (set model.vocab_size=0 to take it from the data, "
        "or prepare the data with the model's tokenizer)"
    )


class PoisonAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, metrics):
        if metrics["step"] == self.step:
            with torch.no_grad():
                trainer.model.tok_emb.weight.fill_(math.nan)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared):
    t = Trainer(prepared, quiet=True)
    t.callbacks.append(PoisonAt(7))
    with pytest.raises(GptlabError) as e:
        t.fit()
    root = Path(prepared.train.out_dir) / "checkpoints"
    assert (
        str(e.value)
        == f"loss is nan at step 8 (lower train.lr or use train.dtype=float32; the last good checkpoint is kept in {root})"
    )
    assert ckpt.read_pointer(root / "latest") == "step_5"
    weights = ckpt.load_weights(root / "step_5")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_memory_names_the_knob(prepared, monkeypatch):
    t = Trainer(prepared, quiet=True)

    class OutOfMemory:
        def set_lr(self, factor):
            pass

        def __call__(self, x, y):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(t, "stepper", OutOfMemory())
    with pytest.raises(GptlabError) as e:
        t.fit()
    assert str(e.value) == (
        "out of memory with micro-batches of 4 x 16 tokens (lower train.micro_batch_size "
        "(the batch is kept by accumulation), model.block_size or the model size)"
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_runs_on_cpu(prepared, dtype):
    from dataclasses import replace

    cfg = replace(prepared, train=replace(prepared.train, dtype=dtype, max_iters=6))
    t = Trainer(cfg, quiet=True).fit()
    assert t.dtype == getattr(torch, dtype) and t.scaler.is_enabled() == (dtype == "float16")
    losses = [loss for _, loss in step_losses(t.run_dir)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


def test_resume_refuses_data_prepared_with_another_tokenizer(prepared, tmp_path):
    from dataclasses import replace

    Trainer(prepared, quiet=True).fit()
    other = tmp_path / "other.txt"
    other.write_text("0123456789 abcdefghij\n" * 200)
    prepare(replace(prepared.data, source=str(other)), overwrite=True, quiet=True)
    with pytest.raises(GptlabError) as e:
        Trainer(prepared, resume=True, quiet=True)
    assert str(e.value) == (
        f"vocabulary mismatch: the data in '{prepared.data.dir}' was prepared with another tokenizer than this run "
        "(resume with the data the run was trained on, or start a new run)"
    )


def test_monitor_must_be_an_evaluated_metric(prepared):
    from dataclasses import replace

    cfg = replace(prepared, train=replace(prepared.train, monitor="accuracy"))
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)  # at set-up, before the first step (tests/test_epochs.py)
    assert str(e.value) == (
        "train.monitor 'accuracy' is not an evaluated metric (choose one of val_loss, val_ppl, train_loss, train_ppl)"
    )


def test_a_refused_config_leaves_no_run_directory(prepared):
    from dataclasses import replace

    cfg = replace(prepared, model=replace(prepared.model, block_size=100_000))
    with pytest.raises(GptlabError, match="fewer than the context of 100000"):
        Trainer(cfg, quiet=True)
    assert not Path(prepared.train.out_dir).exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_compiled_training_matches_eager(prepared, tmp_path, arch):
    """torch.compile (on by default for long CPU runs) changes speed, not the numbers."""
    from dataclasses import replace

    def run(compile_: bool, name: str) -> list[float]:
        t = replace(prepared.train, compile=compile_, max_iters=6, out_dir=str(tmp_path / name))
        cfg = replace(prepared, model=replace(prepared.model, arch=arch), train=t)
        return [loss for _, loss in step_losses(Trainer(cfg, quiet=True).fit().run_dir)]

    assert run(True, "compiled") == pytest.approx(run(False, "eager"), abs=1e-4)
