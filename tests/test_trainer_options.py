"""Story 1's trainer options: schedules stepped per epoch, save best only, resuming from a chosen checkpoint,
weight-decay groups, exact match printed with each epoch; story 3's sort task with 64 values."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_config
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.config import ModelConfig, TrainConfig, load_config
from gptlab.data.batches import load_prepared
from gptlab.data.shards import prepare
from gptlab.data.tasks import SYMBOLS, prepare_task
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.train import checkpoint as ckpt
from gptlab.train.callbacks import Callback
from gptlab.train.optim import build_optimizers, param_kind
from gptlab.train.schedules import SCHEDULES, lr_factor
from gptlab.train.trainer import Trainer

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")

CONFIGS = Path(__file__).parent.parent / "configs"


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one number that depends on the clock (tokens/s)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


# ----- train.schedule_unit -------------------------------------------------------------------------------------------
def step_factor_before(step: int, total: int, cfg: TrainConfig) -> float:
    """lr_factor as it was before train.schedule_unit: step mode must give exactly these numbers."""
    warmup, floor = cfg.warmup_iters, cfg.min_lr_ratio
    if step < warmup:
        if cfg.schedule == "onecycle":
            start = 1 / 25
            return start + (1 - start) * (1 - math.cos(math.pi * step / warmup)) / 2
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule in ("cosine", "onecycle"):
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1 - (1 - floor) * progress
    if cfg.schedule == "wsd":
        decay_start = total - int(total * cfg.decay_fraction)
        if step < decay_start:
            return 1.0
        return 1 - (1 - floor) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0


def test_step_schedules_are_unchanged():
    for schedule in SCHEDULES:
        for warmup, total in ((0, 1), (7, 50), (3, 200)):
            cfg = TrainConfig(schedule=schedule, warmup_iters=warmup)
            for step in range(total):
                assert lr_factor(step, total, cfg, 10) == step_factor_before(step, total, cfg), (schedule, step)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_epoch_unit_holds_the_rate_within_each_epoch(schedule):
    cfg = TrainConfig(schedule=schedule, schedule_unit="epoch", warmup_iters=0)
    f = [lr_factor(s, 40, cfg, 10) for s in range(40)]  # 4 epochs of 10 steps
    assert all(f[s] == f[s // 10 * 10] for s in range(40))  # constant within an epoch
    # each epoch's rate is the step schedule's at that epoch of 4, as a per-epoch scheduler sets it
    per_epoch = replace(cfg, schedule_unit="step")
    assert [f[10 * e] for e in range(4)] == [lr_factor(e, 4, per_epoch) for e in range(4)]
    if schedule in ("cosine", "linear", "onecycle"):
        assert f[0] == 1.0 and f[0] > f[10] > f[20] > f[30] > cfg.min_lr_ratio
    # the warmup ramps per step (train.warmup_iters steps), multiplying the epoch's rate
    warm = replace(cfg, warmup_iters=5)
    ramp = [lr_factor(s, 40, warm, 10) for s in range(40)]
    assert ramp[5:] == f[5:] and ramp[:5] == [lr_factor(s, 5, replace(warm, schedule_unit="step")) for s in range(5)]
    assert lr_factor(34, 35, cfg, 10) == f[30]  # a last partial epoch is an epoch of the schedule


def test_epoch_unit_needs_epochs():
    with pytest.raises(GptlabError) as e:
        load_config(None, ["train.schedule_unit=epoch"])  # random windows and max_iters: no epochs
    assert str(e.value) == (
        "train.schedule_unit=epoch needs epochs, but random mode without train.max_epochs has none (set "
        "train.data_mode=epoch (passes over the data), or train.max_epochs (epochs of eval_interval steps))"
    )
    assert load_config(None, ["train.schedule_unit=epoch", "train.data_mode=epoch"]).train.schedule_unit == "epoch"
    assert load_config(None, ["train.schedule_unit=epoch", "train.max_epochs=3"]).train.max_epochs == 3
    with pytest.raises(GptlabError, match=r"train.schedule_unit has no option 'epochs' \(did you mean 'epoch'\?\)"):
        load_config(None, ["train.schedule_unit=epochs", "train.data_mode=epoch"])


# ----- --resume RUN --checkpoint step_N ------------------------------------------------------------------------------
EPOCH_UNIT = ["train.data_mode=epoch", "train.schedule_unit=epoch", "train.batch_size=8", "train.warmup_iters=0"]


@pytest.mark.parametrize("over", [[], EPOCH_UNIT], ids=["random-step", "epoch-epoch"])
def test_resume_from_a_chosen_checkpoint_continues_bit_identically(tmp_path, capsys, over):
    """20 steps with a checkpoint every 5 (all kept), then `--resume --checkpoint step_10` up to 20 again: the same
    losses, evaluations, history and final weights, and the first run's later checkpoints set aside, not lost."""
    text = tmp_path / "small.txt"
    text.write_text(make_text(30))  # epoch mode: epochs of about ten steps at batch 8
    cfg = tiny_config(tmp_path, text, "train.keep_last=100", "model.dropout=0.1", *over)
    prepare(cfg.data, quiet=True)
    full = Trainer(cfg, quiet=True).fit()
    run, root = full.run_dir, full.run_dir / "checkpoints"
    before = {"records": records(run), "history": full.history, "best": ckpt.read_pointer(root / "best")}
    final = load_file(root / "step_20" / "model.safetensors")
    if over:  # the rate moves at epoch boundaries only
        lrs = {}
        for r in before["records"]:
            if "loss" in r:
                lrs.setdefault(r["epoch"], set()).add(r["lr"])
        assert len(lrs) >= 2 and all(len(v) == 1 for v in lrs.values())
        rates = [lrs[e].pop() for e in sorted(lrs)]
        assert rates == sorted(rates, reverse=True) and rates[0] > rates[1]
    steps = [int(p.name[5:]) for p in ckpt.step_folders(root)]
    n = 10 if 10 in steps else steps[len(steps) // 2]
    later = [f"step_{s}" for s in steps if s > n]
    assert later and n < 20
    capsys.readouterr()

    assert main(["train", "--resume", str(run), "--checkpoint", f"step_{n}"]) == 0
    out, err = capsys.readouterr()
    aside = run / "set_aside" / f"after_step_{n}"
    line = f"resuming from step_{n} (latest was step_20): {', '.join(later)} and later metrics moved to {aside}"
    assert line in err and out.startswith("trained 20 steps into")
    assert records(run) == before["records"]  # every step's loss and lr, every evaluation: exact floats
    assert json.loads((run / "history.json").read_text()) == before["history"]
    resumed = load_file(root / "step_20" / "model.safetensors")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    assert ckpt.read_pointer(root / "best") == before["best"]
    # what the first run wrote after step n is kept as it was
    assert sorted(p.name for p in ckpt.step_folders(aside / "checkpoints")) == later
    assert records(aside) == before["records"] and ckpt.read_pointer(aside / "checkpoints" / "latest") == "step_20"
    kept = load_file(aside / "checkpoints" / "step_20" / "model.safetensors")
    assert all(torch.equal(kept[k], final[k]) for k in final)


def test_a_chosen_checkpoint_is_checked(prepared, capsys):
    Trainer(prepared, quiet=True).fit()  # 20 steps, keep_last=2: step_15, step_20 and the best
    run = prepared.train.out_dir
    root = Path(run) / "checkpoints"
    best = ckpt.read_pointer(root / "best")
    folders = ", ".join(p.name for p in ckpt.step_folders(root))
    capsys.readouterr()
    assert main(["train", "--resume", run, "--checkpoint", "step_7"]) == 2
    assert capsys.readouterr().err == (
        f"error: run '{run}' has no checkpoint step_7 (use one of latest (step_20), best ({best}), {folders})\n"
    )
    assert main(["train", "--resume", run, "--checkpoint", "../other"]) == 2
    assert "error: --checkpoint '../other' names no checkpoint (latest, best or step_N) (use one of" in (
        capsys.readouterr().err
    )
    assert main(["train", str(CONFIGS / "adder.yaml"), "--checkpoint", "best"]) == 2
    assert capsys.readouterr().err == "error: --checkpoint best is given without --resume (add --resume RUN_DIR)\n"
    # the latest, named or by default, resumes as before: nothing is set aside
    longer = replace(prepared, train=replace(prepared.train, max_iters=25))
    assert Trainer(longer, resume=True, checkpoint="latest", quiet=True).fit().step == 25
    assert not (Path(run) / "set_aside").exists()


# ----- train.save ----------------------------------------------------------------------------------------------------
class Folders(Callback):
    """The step folders after each checkpoint (the pruning done)."""

    def __init__(self) -> None:
        self.seen: list[set[str]] = []

    def on_checkpoint(self, trainer, path):
        self.seen.append({p.name for p in ckpt.step_folders(path.parent)})


def test_save_best_keeps_the_best_and_the_latest_only(prepared):
    cfg = replace(prepared, train=replace(prepared.train, save="best"))
    folders = Folders()
    t = Trainer(cfg, callbacks=[folders], quiet=True).fit()
    root = t.run_dir / "checkpoints"
    assert len(folders.seen) == 4 and all(len(s) <= 2 for s in folders.seen)
    assert folders.seen[-1] == {"step_20", ckpt.read_pointer(root / "best")}
    # the latest is there to resume from
    longer = replace(cfg, train=replace(cfg.train, max_iters=30))
    t = Trainer(longer, resume=True, quiet=True).fit()
    assert t.step == 30
    assert {p.name for p in ckpt.step_folders(root)} == {"step_30", ckpt.read_pointer(root / "best")}
    with pytest.raises(GptlabError, match=r"train.save has no option 'best_only' \(did you mean 'best'\?\)"):
        load_config(None, ["train.save=best_only"])


# ----- train.decay_groups --------------------------------------------------------------------------------------------
def tiny_model(**switches: object) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, **switches).resolved())


def decayed_names(model: GPT, t: TrainConfig) -> list[str]:
    """The parameters one step on zero gradients moves: AdamW's update is zero, so only weight decay acts."""
    with torch.no_grad():
        for p in model.parameters():  # none zero (biases start so), so decay moves every one it applies to
            p.uniform_(0.5, 1.0)
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for opt in build_optimizers(model, t, torch.device("cpu")):
        opt.step()
    return [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]


MODELS = {"gpt2-untied": {"arch": "gpt2", "tie_embeddings": False}, "modern-qk": {"arch": "modern", "qk_norm": True}}


@pytest.mark.parametrize("switches", MODELS.values(), ids=MODELS.keys())
def test_default_decay_groups_are_every_matrix_as_before(switches):
    model = tiny_model(**switches)
    params = list(model.named_parameters())
    opt = build_optimizers(model, TrainConfig(), torch.device("cpu"))[0]
    # the groups of before: [matrices and embeddings (every 2-D weight)], [the rest], in the model's order
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for _, p in params if p.dim() >= 2], [id(p) for _, p in params if p.dim() < 2],
    ]  # fmt: skip
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_parameter_kinds():
    kinds = {n: param_kind(n, p.dim()) for n, p in tiny_model(**MODELS["gpt2-untied"]).named_parameters()}
    assert {k: kinds[k] for k in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight", "norm_f.weight")} == {
        "tok_emb.weight": "embeddings", "pos_emb.weight": "embeddings", "lm_head.weight": "head",
        "norm_f.weight": "norms",
    }  # fmt: skip
    assert kinds["blocks.0.attn.q.weight"] == kinds["blocks.1.mlp.down.weight"] == "matrices"
    assert kinds["blocks.0.attn.q.bias"] == "biases" and kinds["blocks.0.norm1.bias"] == "norms"
    assert param_kind("blocks.0.attn.q.lora_a", 2) is None  # adapters are never decayed


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_decay_groups_choose_what_weight_decay_moves(optimizer):
    model = tiny_model(**MODELS["gpt2-untied"])
    kinds = {n: param_kind(n, p.dim()) for n, p in model.named_parameters()}
    for groups in ("matrices,embeddings,head", "norms,biases", "embeddings", "head, matrices", "none"):
        t = TrainConfig(optimizer=optimizer, decay_groups=groups, lr=0.1, weight_decay=0.5)
        chosen = {g.strip() for g in groups.split(",")}
        assert decayed_names(tiny_model(**MODELS["gpt2-untied"]), t) == [n for n, k in kinds.items() if k in chosen]
    t = TrainConfig(optimizer=optimizer, decay_groups="embeddings")
    optimizers = build_optimizers(model, t, torch.device("cpu"))
    ids = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    with pytest.raises(GptlabError) as e:
        load_config(None, ["train.decay_groups=matrices,layernorm"])
    assert str(e.value) == (
        "train.decay_groups has no kind 'layernorm' (list some of matrices, embeddings, head, norms, biases separated "
        "by commas, or none)"
    )


def test_decay_groups_stay_as_the_run_began_on_resume(prepared):
    Trainer(replace(prepared, train=replace(prepared.train, max_iters=5)), quiet=True).fit()
    other = replace(prepared, train=replace(prepared.train, decay_groups="matrices,norms"))
    with pytest.raises(GptlabError, match=r"^cannot resume with changed train.decay_groups \(resume keeps"):
        Trainer(other, resume=True, quiet=True)


# ----- exact match with each epoch -----------------------------------------------------------------------------------
def test_exact_match_is_printed_with_each_epoch_as_it_ends(tmp_path, capsys):
    over = [f"data.dir={tmp_path / 'adder'}", f"train.out_dir={tmp_path / 'run'}", "task.digits=1", "task.examples=100",
            "model.block_size=7", "model.n_layer=1", "model.n_embd=32", "train.batch_size=16", "train.max_epochs=2",
            "train.device=cpu", "train.early_stop_patience=0"]  # fmt: skip
    cfg = load_config(CONFIGS / "adder.yaml", over)
    prepare_task(cfg.task, cfg.data.dir)
    printed: list[str] = []

    class AsItEnds(Callback):  # after the defaults: the evaluation's line is already out when it hears of it
        def on_eval(self, trainer, metrics):
            printed.append(capsys.readouterr().err)

    t = Trainer(cfg, callbacks=[AsItEnds()]).fit()
    assert [h["epoch"] for h in t.history] == [0, 1] and len(printed) == 2
    for h, err in zip(t.history, printed):
        line = (f"epoch {h['epoch']}, step {h['step']}/{t.total_steps}: train loss {h['train_loss']:.4f}, val loss "
                f"{h['val_loss']:.4f}, val exact match {h['val_exact_match']:.4f}")  # fmt: skip
        assert line in err


# ----- the sort task up to 252 values --------------------------------------------------------------------------------
def test_a_sort_task_of_64_values_prepares_and_trains(tmp_path):
    over = [f"data.dir={tmp_path / 'sort'}", f"train.out_dir={tmp_path / 'run'}", "task.values=64", "task.length=4",
            "task.examples=300", "task.eval_examples=10", "model.block_size=10", "model.n_layer=1", "model.n_embd=32",
            "train.batch_size=8", "train.max_epochs=null", "train.max_iters=1", "train.device=cpu"]  # fmt: skip
    cfg = load_config(CONFIGS / "sort.yaml", over)
    prepare_task(cfg.task, cfg.data.dir)
    data = load_prepared(cfg.data.dir)
    tok = data.tokenizer()
    assert data.meta["vocab_size"] == 64 + 3  # the symbols, `=`, <EOS> and <BOS>
    ex = data.examples["train"]
    texts = [tok.decode(ex.tokens[ex.offsets[i] : ex.offsets[i + 1]].tolist()) for i in range(len(ex))]
    assert any(SYMBOLS[63] in text for text in texts)
    for text in texts:  # the answer is the list in the symbols' order, which goes on past Z
        prompt, answer = text.removeprefix("<BOS>").removesuffix("<EOS>").split("=")
        assert answer == "".join(sorted(prompt, key=SYMBOLS.index))
    t = Trainer(cfg, quiet=True).fit()
    assert t.step == 1 and math.isfinite(t.history[-1]["val_loss"]) and "val_exact_match" in t.history[-1]
    assert load_config(None, ["task.name=sort", "task.values=252"]).task.values == 252
