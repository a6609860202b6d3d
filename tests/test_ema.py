"""train.ema: the weights' moving average against a hand computation, what evaluations measure and checkpoints hold,
and an exact resume with it on (also on 2 DDP/FSDP ranks)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_text
from safetensors.torch import load_file
from test_distributed import gptlab, max_diff, resume_from_step_10, step_losses, val_losses, weights, write_config

from gptlab.cli import main
from gptlab.config import Config, load_config
from gptlab.data.batches import IGNORE_INDEX
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.lora import is_adapter
from gptlab.safe_pickle import read_dcp_metadata
from gptlab.train import checkpoint as ckpt
from gptlab.train.callbacks import Callback
from gptlab.train.trainer import Trainer, lm_loss

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")


def with_train(cfg: Config, **train: object) -> Config:
    return replace(cfg, train=replace(cfg.train, **train))


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the one number that depends on the clock (tokens/s)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


def clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Capture(Callback):
    """The raw weights and the averages at each checkpoint."""

    def __init__(self) -> None:
        self.raw: dict[int, dict[str, torch.Tensor]] = {}
        self.averages: dict[int, dict[str, torch.Tensor]] = {}

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self.raw[trainer.step] = clone(dict(trainer.model.named_parameters()))
        self.averages[trainer.step] = clone(trainer.ema.state_dict())


class StopAt(Callback):
    """Stops the run after the checkpoint of `step` (as a budget spent there would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        if trainer.step == self.step:
            trainer.request_stop("test")


def val_loss_of(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> float:
    """The mean validation loss of a model holding `tensors`, computed here (not by the trainer)."""
    model = ckpt.build_model(trainer.cfg)
    ckpt.load_model_tensors(model, tensors, "test")
    model.eval()
    s, n = 0.0, 0
    with torch.no_grad():
        for k in range(trainer.cfg.train.eval_iters):
            x, y = (torch.from_numpy(a) for a in trainer.val_batches.batch(k))
            s += float(lm_loss(model(x), y))
            n += int((y != IGNORE_INDEX).sum())
    return s / n


def test_the_average_equals_a_hand_computed_one_with_gradient_accumulation(prepared):
    """One update per optimizer step (2 micro-batches each), the decay warmed up: min(0.3, (1 + k) / (10 + k))."""
    cfg = with_train(prepared, ema=0.3, micro_batch_size=2, lr=0.02, warmup_iters=0)  # weights that move
    trainer = Trainer(cfg, quiet=True, ephemeral=True)
    params = dict(trainer.model.named_parameters())
    expected = {n: p.detach().double().clone() for n, p in params.items()}  # the average starts at the init
    decays = []
    for k in range(1, 6):
        trainer.stepper(*trainer.train_batches.batch(k - 1))
        d = min(0.3, (1 + k) / (10 + k))
        decays.append(d)
        expected = {n: d * expected[n] + (1 - d) * p.detach().double() for n, p in params.items()}
    assert decays[:2] == [2 / 11, 3 / 12] and decays[2:] == [0.3] * 3  # warm-up, then the decay asked for
    ema = trainer.ema
    assert ema.updates == 5
    got = ema.state_dict()
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n].double(), expected[n], rtol=0, atol=1e-6)
    assert any((got[n] - params[n]).abs().max() > 1e-3 for n in params)  # not simply the raw weights


def test_evaluations_and_saved_models_are_the_average(prepared):
    """Every val loss is the average's (computed here from the saved weights), the best and the final
    model.safetensors hold the average, and train_state/ holds the raw weights beside it."""
    cfg = with_train(prepared, ema=0.9, keep_last=10)
    capture = Capture()
    trainer = Trainer(cfg, quiet=True, callbacks=[capture]).fit()
    root = trainer.run_dir / "checkpoints"
    assert [r["step"] for r in trainer.history] == [5, 10, 15, 20]
    for record in trainer.history:
        step = record["step"]
        saved = ckpt.load_weights(root / f"step_{step}")
        assert equal(saved, capture.averages[step]) and not equal(saved, capture.raw[step])
        assert record["val_loss"] == pytest.approx(val_loss_of(trainer, saved), rel=1e-6, abs=0)
        assert abs(val_loss_of(trainer, capture.raw[step]) - record["val_loss"]) > 1e-4  # the raw weights' differs
        assert ckpt.read_meta(root / f"step_{step}")["ema"] == {"decay": 0.9, "updates": step}
    # what sample, eval and export load: the average of the best and of the final step
    best = int(ckpt.read_pointer(root / "best")[5:])
    for which, step in (("best", best), ("latest", 20)):
        _, model, _ = ckpt.load_run(trainer.run_dir, which)
        assert equal({n: p for n, p in model.named_parameters()}, capture.averages[step])
    # the resumable state: raw weights and the average, both
    fresh = Trainer(cfg, quiet=True, ephemeral=True)
    averages = fresh.ema.state_dict()
    ckpt.load_training_state(root / "step_20", fresh.model, fresh.optimizers, ema=averages)
    assert equal(dict(fresh.model.named_parameters()), capture.raw[20])
    assert equal(averages, capture.averages[20])


def test_off_adds_nothing_to_checkpoints(prepared):
    """train.ema=0: no average kept, model.safetensors holds the raw weights, no "ema" in meta.json or train_state/."""
    trainer = Trainer(with_train(prepared, max_iters=5), quiet=True).fit()
    assert trainer.ema is None and trainer.stepper.ema is None
    path = trainer.run_dir / "checkpoints" / "step_5"
    assert equal(ckpt.load_weights(path), clone(trainer.model.state_dict()))
    assert "ema" not in ckpt.read_meta(path)
    keys = read_dcp_metadata(path / "train_state").state_dict_metadata
    assert any(k.startswith("model.") for k in keys) and not any(k.startswith("ema") for k in keys)


def test_a_resume_with_ema_continues_bit_identically(prepared):
    """20 steps in one go against 10, a resume, 10 more: the same losses, evaluations, saved averages, raw weights
    and averages, bit for bit (dropout and 2 micro-batches a step on)."""
    cfg = with_train(prepared, ema=0.95, micro_batch_size=2)
    cfg = replace(cfg, model=replace(cfg.model, dropout=0.1))
    runs = Path(prepared.train.out_dir).parent
    whole = Trainer(with_train(cfg, out_dir=str(runs / "whole")), quiet=True).fit()
    halves = with_train(cfg, out_dir=str(runs / "halves"))
    first = Trainer(halves, quiet=True, callbacks=[StopAt(10)]).fit()
    assert first.step == 10
    resumed = Trainer(halves, quiet=True, resume=True)
    assert resumed.ema.updates == 10
    resumed.fit()
    assert records(resumed.run_dir) == records(whole.run_dir)  # every step's loss, every evaluation
    assert resumed.history == whole.history
    final = [load_file(r.run_dir / "checkpoints" / "step_20" / "model.safetensors") for r in (whole, resumed)]
    assert equal(*final)
    assert equal(dict(resumed.model.named_parameters()), dict(whole.model.named_parameters()))
    assert equal(resumed.ema.state_dict(), whole.ema.state_dict()) and resumed.ema.updates == 20


def test_switching_ema_on_at_a_resume_starts_the_average_from_the_resumed_weights(prepared):
    cfg = with_train(prepared, max_iters=10)
    Trainer(cfg, quiet=True, callbacks=[StopAt(5)]).fit()
    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer: Trainer) -> None:
            seen["raw"] = clone(dict(trainer.model.named_parameters()))
            seen["average"] = clone(trainer.ema.state_dict())

    resumed = Trainer(with_train(cfg, ema=0.9), quiet=True, resume=True, callbacks=[AtStart()]).fit()
    assert equal(seen["average"], seen["raw"])  # step 5's weights, not the initial ones
    assert not equal(seen["raw"], clone(dict(Trainer(cfg, quiet=True, ephemeral=True).model.named_parameters())))
    meta = ckpt.read_meta(resumed.run_dir / "checkpoints" / "step_10")
    assert meta["ema"] == {"decay": 0.9, "updates": 5}
    # and off again: the checkpoint's average is left unread, the raw weights go on
    Trainer(with_train(cfg, max_iters=15), quiet=True, resume=True).fit()
    assert "ema" not in ckpt.read_meta(resumed.run_dir / "checkpoints" / "step_15")


def test_a_lora_run_averages_and_saves_its_adapters_only(prepared):
    """The frozen base never moves: the average covers the adapters, which are all a LoRA checkpoint stores."""
    base = Trainer(with_train(prepared, max_iters=5), quiet=True).fit()
    cfg = with_train(prepared, ema=0.9, lora_rank=4, max_iters=10, out_dir=str(base.run_dir.parent / "lora"), lr=0.01)
    cfg = replace(cfg, model=replace(cfg.model, init_from=str(base.run_dir)))
    trainer = Trainer(cfg, quiet=True).fit()
    averages = trainer.ema.state_dict()
    assert averages and all(is_adapter(n) for n in averages)
    saved = ckpt.load_weights(trainer.run_dir / "checkpoints" / "step_10")
    raw = {n: p for n, p in trainer.model.named_parameters() if is_adapter(n)}
    assert equal(saved, averages) and saved.keys() == raw.keys() and not equal(saved, clone(raw))
    _, model, _ = ckpt.load_run(trainer.run_dir, "latest")  # merged into the base, as sample and export load it
    assert model.num_params() == base.model.num_params()


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "nan"])
def test_an_out_of_range_ema_is_refused(value, capsys):
    with pytest.raises(GptlabError) as e:
        load_config(None, [f"train.ema={value}"])
    shown = {"1": "1.0", "nan": "nan"}.get(value, value)
    assert str(e.value) == f"train.ema={shown} is out of range [0, 1) (use 0 (off) or a decay such as train.ema=0.999)"
    assert main(["train", "train.ema=1.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.ema=1.5 is out of range [0, 1) (use 0 (off) or a decay such as train.ema=0.999)"
    )
    assert load_config(None, ["train.ema=0.999"]).train.ema == 0.999


def test_a_backend_without_an_average_refuses_ema(prepared):
    """train.backend=jax keeps no average yet: refused before anything is built (JaxTrainer's class attribute)."""

    class JaxLike(Trainer):
        backend = "jax"

    with pytest.raises(GptlabError) as e:
        JaxLike(with_train(prepared, backend="jax", ema=0.9), quiet=True)
    assert (
        str(e.value)
        == "train.ema is not supported with train.backend=jax yet (set train.ema=0, or train.backend=torch)"
    )
    assert not Path(prepared.train.out_dir).exists()


@pytest.mark.slow
def test_two_ddp_and_fsdp_ranks_keep_the_one_rank_average_and_resume_it_exactly(tmp_path):
    """`gptlab train --nproc 2` with train.ema: the val losses and the saved average match one rank (DDP 1e-5, FSDP2
    1e-4: summation order), and an FSDP2 run stopped at step 10 resumes on 2 ranks bit-identically (sharded
    averages written and read back by torch.distributed.checkpoint)."""
    (tmp_path / "corpus.txt").write_text(make_text(400))
    config = write_config(tmp_path, tmp_path / "corpus.txt", train={"ema": 0.9})
    prepare(load_config(config).data, quiet=True)
    assert main(["train", str(config), "--quiet", f"train.out_dir={tmp_path / 'one'}"]) == 0
    runs = {"one": tmp_path / "one"}
    for name, extra in (("ddp", []), ("fsdp", ["train.parallel=fsdp"])):
        r = gptlab("train", str(config), "--nproc", "2", "--quiet", f"train.out_dir={tmp_path / name}", *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = tmp_path / name
    one = val_losses(runs["one"])
    for name, tol in (("ddp", 1e-5), ("fsdp", 1e-4)):
        assert max(abs(one[s] - v) for s, v in val_losses(runs[name]).items()) < tol
        assert max_diff(weights(runs["one"]), weights(runs[name])) < tol
        meta = json.loads((runs[name] / "checkpoints" / "step_20" / "meta.json").read_text())
        assert meta["ema"] == {"decay": 0.9, "updates": 20} and meta["world_size"] == 2
    keys = read_dcp_metadata(runs["fsdp"] / "checkpoints" / "step_20" / "train_state").state_dict_metadata
    assert any(k.startswith("ema.") for k in keys)
    again = resume_from_step_10(runs["fsdp"], tmp_path / "again")
    r = gptlab("train", "--resume", str(again), "--nproc", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert step_losses(again) == step_losses(runs["fsdp"]) and val_losses(again) == val_losses(runs["fsdp"])
    assert equal(weights(again), weights(runs["fsdp"]))
