"""Synthetic tasks: the adder's format, splits and loss mask, sort, exact match, early stopping and a short run."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.cli import main
from gptlab.config import Config, load_config
from gptlab.data.batches import IGNORE_INDEX, ExampleBatches, load_prepared
from gptlab.data.tasks import exact_match, prepare_task, task_examples
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.train.checkpoint import read_pointer
from gptlab.train.task_metrics import prompts_and_answers, task_exact_match
from gptlab.train.trainer import Trainer

CONFIGS = Path(__file__).parent.parent / "configs"


def adder_config(tmp_path: Path, *overrides: str) -> Config:
    """configs/adder.yaml in tmp_path, shortened."""
    base = [f"data.dir={tmp_path / 'adder'}", f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"]
    return load_config(CONFIGS / "adder.yaml", base + list(overrides))


def decoded(data_dir: Path, split: str) -> list[str]:
    d = load_prepared(data_dir)
    tok, ex = d.tokenizer(), d.examples[split]
    return [tok.decode(ex.tokens[ex.offsets[i] : ex.offsets[i + 1]].tolist()) for i in range(len(ex))]


def test_adder_examples_are_written_bos_sum_eos_with_the_sum_zero_padded(tmp_path):
    cfg = adder_config(tmp_path)
    prepare_task(cfg.task, cfg.data.dir)
    lines = decoded(Path(cfg.data.dir), "train")
    assert len(lines) == 7000
    for line in lines:
        m = re.fullmatch(r"<BOS>(\d\d)\+(\d\d)=(\d\d\d)<EOS>", line)
        assert m, line
        assert int(m[1]) + int(m[2]) == int(m[3])
    assert "<BOS>05+07=012<EOS>" in set(lines) | set(decoded(Path(cfg.data.dir), "val")) | set(
        decoded(Path(cfg.data.dir), "test")
    )


def test_adder_splits_are_7000_2000_1000_of_all_10000_pairs_disjoint_and_seeded(tmp_path):
    cfg = adder_config(tmp_path)
    splits = task_examples(cfg.task)
    assert {k: len(v) for k, v in splits.items()} == {"train": 7000, "val": 2000, "test": 1000}
    sets = {k: {p for p, _ in v} for k, v in splits.items()}
    assert sets["train"].isdisjoint(sets["val"]) and sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == {f"{a:02d}+{b:02d}=" for a in range(100) for b in range(100)}
    assert task_examples(cfg.task) == splits  # the seed decides
    other = adder_config(tmp_path, "task.seed=7").task
    assert task_examples(other)["val"] != splits["val"]


def test_more_digits_sample_distinct_pairs_the_same_way(tmp_path):
    task = adder_config(tmp_path, "task.digits=3", "task.examples=3000").task
    splits = task_examples(task)
    assert [len(v) for v in splits.values()] == [2100, 600, 300]
    prompts = [p for v in splits.values() for p, _ in v]
    assert len(set(prompts)) == 3000
    for prompt, answer in splits["test"]:
        a, b = map(int, re.fullmatch(r"(\d{3})\+(\d{3})=", prompt).groups())
        assert answer == f"{a + b:04d}"


def test_the_loss_is_on_the_answer_and_end_token_only(tmp_path):
    cfg = adder_config(tmp_path)
    prepare_task(cfg.task, cfg.data.dir)
    d = load_prepared(cfg.data.dir)
    tok = d.tokenizer()
    batches = ExampleBatches(d.examples["train"], cfg.model.block_size, 16, "epoch", 0)
    x, y = batches.batch(0)
    assert x.shape == y.shape == (16, 10)
    for row_x, row_y in zip(x, y):
        text = tok.decode(row_x.tolist())  # <BOS>aa+bb=ccc: the last token (<EOS>) is only a target
        assert re.fullmatch(r"<BOS>\d\d\+\d\d=\d\d\d", text)
        assert (row_y[:6] == IGNORE_INDEX).all()  # no target on the prompt: <BOS>aa+bb predicts nothing
        answer = tok.decode(row_y[6:].tolist())
        assert answer == f"{int(text[5:7]) + int(text[8:10]):03d}<EOS>"


def test_sort_lists_sorted_with_the_vocabulary_and_length_asked_for(tmp_path):
    task = adder_config(tmp_path, "task.name=sort", "task.length=12", "task.values=20", "task.examples=500").task
    splits = task_examples(task)
    assert [len(v) for v in splits.values()] == [350, 100, 50]
    symbols = set("0123456789abcdefghij")
    for prompt, answer in (pair for v in splits.values() for pair in v):
        assert len(prompt) == 13 and prompt[-1] == "=" and set(prompt[:-1]) <= symbols
        assert answer == "".join(sorted(prompt[:-1]))
    assert len({p for v in splits.values() for p, _ in v}) == 500


def test_exact_match_counts_whole_answers_only():
    answers = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 1]]
    predicted = [[1, 2, 3], [4, 5, 7], [7, 8, 9, 9], [0, 0]]  # right, a wrong digit, one too many, one too few
    assert exact_match(predicted, answers) == 0.25
    assert exact_match(answers, answers) == 1.0
    with pytest.raises(ValueError):
        exact_match(predicted[:2], answers)


def test_task_exact_match_equals_a_plain_greedy_loop(tmp_path):
    """The batched, cached generator scores what a token-by-token argmax over full forwards would."""
    cfg = adder_config(tmp_path, "task.examples=200")
    prepare_task(cfg.task, cfg.data.dir)
    d = load_prepared(cfg.data.dir)
    torch.manual_seed(0)
    model = GPT(replace(cfg.model, vocab_size=d.meta["vocab_size"]).resolved()).eval()
    with torch.no_grad():  # make a random model answer mostly the same digit: some answers right, most wrong
        model.lm_head.weight.mul_(0.1)
    prompts, answers = prompts_and_answers(d.examples["val"])
    right = 0
    for prompt, answer in zip(prompts, answers):
        ids = list(prompt)
        for _ in range(len(answer) + 1):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == d.meta["eot_id"]:
                break
        out = ids[len(prompt) :]
        right += (out[:-1] if out[-1] == d.meta["eot_id"] else out) == answer
    assert task_exact_match(model, d.examples["val"], d.meta["eot_id"]) == right / len(answers)


@pytest.mark.slow
def test_a_short_adder_run_learns_to_add(tmp_path, capsys):
    """Three epochs of configs/adder.yaml: valid exact match above 0.3 (chance is about 0.001)."""
    cfg = adder_config(tmp_path, "train.max_epochs=3", "task.eval_examples=500")
    assert main(["prepare", str(CONFIGS / "adder.yaml"), f"data.dir={cfg.data.dir}"]) == 0
    assert "7,000 train + 2,000 val + 1,000 test examples" in capsys.readouterr().out
    trainer = Trainer(cfg).fit()
    history = trainer.history
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["val_exact_match"] >= 0.3
    assert all(set(h) >= {"train_loss", "train_ppl", "val_loss", "val_ppl", "val_exact_match"} for h in history)
    best = max(range(len(history)), key=lambda i: history[i]["val_exact_match"])
    assert read_pointer(Path(cfg.train.out_dir) / "checkpoints" / "best") == f"step_{history[best]['step']}"
    results = json.loads((Path(cfg.train.out_dir) / "results.json").read_text())
    assert results["checkpoint"] == f"step_{history[best]['step']}"
    assert results["val_exact_match"] >= 0.3 and results["test_exact_match"] >= 0.3  # all 2,000 and 1,000
    err = capsys.readouterr().err  # progress, the history table and the test line go to stderr
    assert f"{history[-1]['val_exact_match']:.4f} │" in err  # the metric's column in the history table
    assert f"test_exact_match {results['test_exact_match']:.4f}" in " ".join(err.split())
    assert json.loads((Path(cfg.train.out_dir) / "history.json").read_text()) == history
    # gptlab eval on a task run scores the best checkpoint on val and test: what the run reported at its end
    assert main(["eval", cfg.train.out_dir, "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == results["checkpoint"]
    assert report["task"]["examples"] == {"val": 2000, "test": 1000}
    assert report["task"]["exact_match"] == {"val": results["val_exact_match"], "test": results["test_exact_match"]}


def test_early_stopping_stops_after_patience_evaluations_without_improvement(prepared, capsys):
    cfg = prepared
    cfg.train.monitor_mode = "max"  # val_loss falls: as a maximum it never improves after the first evaluation
    cfg.train.early_stop_patience = 2
    trainer = Trainer(cfg).fit()
    assert trainer.step == 15 and len(trainer.history) == 3  # evaluations at 5, 10, 15 of 20 steps
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "stopped at step 15: val_loss has not improved for 2 evaluations (early stopping)" in err
    assert read_pointer(Path(cfg.train.out_dir) / "checkpoints" / "best") == "step_5"


def test_early_stopping_counts_on_across_a_resume(prepared):
    cfg = prepared
    cfg.train.monitor_mode, cfg.train.early_stop_patience, cfg.train.max_iters = "max", 2, 10
    Trainer(cfg, quiet=True).fit()  # two evaluations, one without improvement
    cfg.train.max_iters = 20
    resumed = Trainer(cfg, resume=True, quiet=True).fit()
    assert resumed.step == 15  # the third evaluation is the second without improvement


def test_a_config_naming_a_task_needs_the_task_data(prepared, tmp_path):
    cfg = prepared
    cfg.task.name = "adder"
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value) == (
        f"task.name is adder but '{cfg.data.dir}' holds no task examples "
        "(run `gptlab prepare` with this config first, or set data.dir to the task's folder)"
    )


def test_task_settings_must_match_the_prepared_examples(tmp_path):
    cfg = adder_config(tmp_path, "task.examples=100")
    prepare_task(cfg.task, cfg.data.dir)
    other = adder_config(tmp_path, "task.examples=200", "task.seed=3")
    with pytest.raises(GptlabError) as e:
        Trainer(other, quiet=True)
    assert str(e.value) == (
        f"the examples in '{cfg.data.dir}' were prepared with other task settings (task.examples, task.seed) "
        "(run `gptlab prepare` with this config (--overwrite), or set data.dir to a new folder)"
    )
    with pytest.raises(GptlabError, match="already holds data prepared from another source or setting"):
        prepare_task(other.task, cfg.data.dir)
    assert not prepare_task(other.task, cfg.data.dir, overwrite=True).skipped
    assert prepare_task(other.task, cfg.data.dir).skipped
    # a task's folder with no task in the config: the task comes from the folder
    plain = load_config(
        None, [f"data.dir={cfg.data.dir}", f"train.out_dir={tmp_path / 'plain'}", "model.block_size=10"]
    )
    assert Trainer(plain, quiet=True).cfg.task.examples == 200


def test_task_sizes_are_checked():
    with pytest.raises(GptlabError, match=r"task.values=253 is out of range \(use a value in \[2, 252\]\)"):
        load_config(None, ["task.name=sort", "task.values=253"])
    with pytest.raises(GptlabError, match="task.name has no option 'add'"):
        load_config(None, ["task.name=add"])


def test_prepare_writes_three_splits_and_reports_them(tmp_path, capsys):
    out = tmp_path / "sorted"
    assert main(["prepare", "task.name=sort", f"data.dir={out}", "task.examples=1000"]) == 0
    assert capsys.readouterr().out == (
        f"prepared: {out} (10,500 train + 3,000 val tokens 700 train + 200 val + 100 test examples, vocab 13)\n"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "tokenizer.json"]
        + [f"{s}_{a}.bin" for s in ("train", "val", "test") for a in ("tokens", "mask", "offsets")]
    )
    ex = load_prepared(out).examples["test"]
    assert np.diff(ex.offsets).tolist() == [15] * 100  # <BOS> + 6 symbols + = + 6 sorted + <EOS>


def test_a_context_too_short_for_the_examples_is_refused_before_training(tmp_path):
    cfg = adder_config(tmp_path, "task.examples=100", "model.block_size=8")
    prepare_task(cfg.task, cfg.data.dir)
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value) == "model.block_size=8 is too short for task examples of 11 tokens (set model.block_size=10)"
    assert not Path(cfg.train.out_dir).exists()


def test_a_task_with_too_few_distinct_examples_names_what_to_grow(tmp_path):
    task = load_config(None, ["task.name=sort", "task.length=1", "task.values=5"]).task
    with pytest.raises(GptlabError) as e:
        prepare_task(task, tmp_path / "d")
    assert str(e.value) == (
        "task sort has only 5 distinct examples, too few for three splits (train 4, val 1, test 0) "
        "(make the task bigger (task.length or task.values))"
    )


def test_settings_another_task_uses_do_not_bind_the_prepared_examples(tmp_path):
    cfg = adder_config(tmp_path, "task.examples=100")
    prepare_task(cfg.task, cfg.data.dir)
    assert json.loads((Path(cfg.data.dir) / "meta.json").read_text())["settings"] == {
        "name": "adder", "digits": 2, "examples": 100, "seed": 1337,
    }  # fmt: skip
    assert prepare_task(adder_config(tmp_path, "task.examples=100", "task.values=20").task, cfg.data.dir).skipped
    Trainer(adder_config(tmp_path, "task.examples=100", "task.length=3"), quiet=True)  # not refused


def test_an_early_stopped_run_stays_stopped_on_resume_and_the_monitor_is_kept(prepared):
    cfg = prepared
    cfg.train.monitor_mode, cfg.train.early_stop_patience = "max", 2
    Trainer(cfg, quiet=True).fit()  # stops at step 15
    resumed = Trainer(cfg, resume=True, quiet=True).fit()
    assert resumed.step == 15 and len(resumed.history) == 3
    cfg.train.early_stop_patience = 3  # more patience: it trains on
    assert Trainer(cfg, resume=True, quiet=True).fit().step == 20
    cfg.train.monitor = "val_ppl"
    with pytest.raises(GptlabError, match=r"cannot resume with changed train.monitor \(resume keeps"):
        Trainer(cfg, resume=True, quiet=True)


def test_eval_refuses_task_examples_prepared_otherwise_and_a_damaged_folder(tmp_path, capsys):
    cfg = adder_config(tmp_path, "task.examples=100", "train.max_iters=2", "train.max_epochs=null")
    prepare_task(cfg.task, cfg.data.dir)
    Trainer(cfg, quiet=True).fit()
    other = adder_config(tmp_path, "task.examples=100", "task.seed=7", f"data.dir={tmp_path / 'seed7'}")
    prepare_task(other.task, other.data.dir)
    assert main(["eval", cfg.train.out_dir, "--data", other.data.dir, "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"error: the task examples in '{other.data.dir}' were prepared with other task settings than the run "
        f"'{cfg.train.out_dir}' (task.seed) (prepare the task again with the run's config.yaml, or give --data the "
        "folder the run was trained on)\n"
    )
    (Path(other.data.dir) / "meta.json").write_text("{broken")
    assert main(["eval", cfg.train.out_dir, "--data", other.data.dir, "--device", "cpu"]) == 2
    assert "meta.json' is corrupted" in capsys.readouterr().err
