"""Training on 2 CPU ranks over gloo, launched for real (`gptlab train --nproc 2`, torchrun's launcher).

20 steps, dropout 0, fp32: 2-rank DDP against 1 rank with the same global batch, FSDP2 against DDP, stop and
resume (on 2 ranks, and on 1), a stop by signal, a rank that dies, and the user errors around them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_text
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.config import load_config
from gptlab.data.batches import Batches, ExampleBatches, load_prepared
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.train import checkpoint as ckpt
from gptlab.train.trainer import Trainer

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")

SETTINGS = {
    "model": {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0},
    "train": {
        "batch_size": 8, "micro_batch_size": 2, "max_iters": 20, "eval_interval": 10, "eval_iters": 2,
        "warmup_iters": 3, "keep_last": 5, "device": "cpu", "dtype": "float32", "compile": False,
        "dist_timeout": 60,
    },
}  # fmt: skip


def gptlab(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`gptlab ARGS` in a new process, as a user runs it (one thread per rank: the machine has two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gptlab", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def step_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    return {h["step"]: h["val_loss"] for h in json.loads((run / "history.json").read_text())}


def weights(run: Path, step: str = "step_20") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / step / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(abs(torch.as_tensor(a[k]) - torch.as_tensor(b[k])).max()) for k in a)


def write_config(folder: Path, source: Path, **sections: dict) -> Path:
    merged = {"data": {"source": str(source), "dir": str(folder / "data"), "tokenizer": "char"}}
    for name, values in {**SETTINGS, **sections}.items():
        merged[name] = {**merged.get(name, {}), **SETTINGS.get(name, {}), **values}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(merged))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One text corpus trained for 20 steps on 1 rank (in this process), 2 DDP ranks and 2 FSDP2 ranks."""
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text(make_text(400))
    config = write_config(root, root / "corpus.txt")
    assert main(["prepare", str(config), "--quiet"]) == 0
    out = {"config": config}
    assert main(["train", str(config), "--quiet", f"train.out_dir={root / 'one'}"]) == 0
    out["one"] = root / "one"
    for name, extra in (("ddp", []), ("fsdp", ["train.parallel=fsdp", "train.activation_checkpointing=true"])):
        r = gptlab("train", str(config), "--nproc", "2", "--quiet", f"train.out_dir={root / name}", *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("trained 20 steps") == 1  # rank 0 alone reports
        out[name] = root / name
    return out


def test_two_ddp_ranks_match_one_rank(runs):
    one, ddp = step_losses(runs["one"]), step_losses(runs["ddp"])
    assert sorted(ddp) == list(range(1, 21))
    assert max(abs(one[s] - ddp[s]) for s in one) < 1e-5
    assert max(abs(a - b) for a, b in zip(val_losses(runs["one"]).values(), val_losses(runs["ddp"]).values())) < 1e-5
    assert max_diff(weights(runs["one"]), weights(runs["ddp"])) < 1e-5
    meta = json.loads((runs["ddp"] / "checkpoints" / "step_20" / "meta.json").read_text())
    assert (meta["world_size"], meta["parallel"]) == (2, "ddp")
    assert one[20] < one[1] - 0.3  # it learned


def test_fsdp_matches_ddp_and_writes_sharded_state_beside_whole_weights(runs):
    ddp, fsdp = step_losses(runs["ddp"]), step_losses(runs["fsdp"])
    assert max(abs(ddp[s] - fsdp[s]) for s in ddp) < 1e-4
    assert max_diff(weights(runs["ddp"]), weights(runs["fsdp"])) < 1e-4
    state = runs["fsdp"] / "checkpoints" / "step_20" / "train_state"
    assert sorted(p.name for p in state.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # the whole weights are what sample, serve and export read, as from any run
    _, model, _ = ckpt.load_run(runs["fsdp"], "latest")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in weights(runs["fsdp"]).values())
    assert main(["sample", str(runs["fsdp"]), "--max-new-tokens", "5", "--num-samples", "1"]) == 0


def resume_from_step_10(run: Path, to: Path) -> Path:
    """A copy of `run` as it was when stopped after step 10's checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step_20")
    ckpt.write_pointer(to / "checkpoints" / "latest", "step_10")
    config = yaml.safe_load((to / "config.yaml").read_text())
    config["train"]["out_dir"] = str(to)
    (to / "config.yaml").write_text(yaml.safe_dump(config))
    return to


def test_stop_and_resume_on_two_ranks_is_bit_identical_and_on_one_rank_within_1e_5(runs, tmp_path):
    two = resume_from_step_10(runs["ddp"], tmp_path / "two")
    r = gptlab("train", "--resume", str(two), "--nproc", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert step_losses(two) == step_losses(runs["ddp"])  # bit-identical
    assert all(torch.equal(a, b) for a, b in zip(weights(two).values(), weights(runs["ddp"]).values()))

    one = resume_from_step_10(runs["ddp"], tmp_path / "one")
    assert main(["train", "--resume", str(one), "--quiet"]) == 0  # 2 ranks' checkpoint, 1 rank
    ref, resumed = step_losses(runs["ddp"]), step_losses(one)
    assert sorted(resumed) == list(range(1, 21))
    assert max(abs(ref[s] - resumed[s]) for s in range(11, 21)) < 1e-5
    assert max_diff(weights(one), weights(runs["ddp"])) < 1e-5


def test_an_fsdp_checkpoint_resumes_on_one_rank_and_under_ddp(runs, tmp_path):
    """The sharded state is re-sharded on load: any number of ranks, either strategy."""
    one = resume_from_step_10(runs["fsdp"], tmp_path / "one")
    assert main(["train", "--resume", str(one), "--quiet"]) == 0
    ref = step_losses(runs["fsdp"])
    assert max(abs(ref[s] - step_losses(one)[s]) for s in range(11, 21)) < 1e-4
    ddp = resume_from_step_10(runs["fsdp"], tmp_path / "ddp")
    r = gptlab("train", "--resume", str(ddp), "--nproc", "2", "--quiet", "train.parallel=ddp")
    assert r.returncode == 0, r.stderr
    assert max(abs(ref[s] - step_losses(ddp)[s]) for s in range(11, 21)) < 1e-4


def sft_config(folder: Path, rows: list[dict], tokenizer: Path) -> Path:
    """Prompt/response examples (in the characters of make_text) written and configured in `folder`."""
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"format": "sft", "tokenizer": str(tokenizer)}
    return write_config(folder, folder / "sft.jsonl", data=data, model={"block_size": 32})


def test_masked_examples_are_averaged_over_the_whole_batch_on_every_rank(runs, tmp_path):
    """sft rows hold different numbers of targets: each rank normalises by the whole batch's count."""
    rng = np.random.default_rng(0)
    words = "the king queen lord good night day love".split()
    rows = [{"prompt": f"KING:\n{' '.join(rng.choice(words, 2))}", "response": " ".join(rng.choice(words, n))}
            for n in rng.integers(1, 6, size=80)]  # fmt: skip
    config = sft_config(tmp_path, rows, runs["one"] / "tokenizer.json")
    assert main(["prepare", str(config), "--quiet"]) == 0
    assert main(["train", str(config), "--quiet", f"train.out_dir={tmp_path / 'one'}"]) == 0
    r = gptlab("train", str(config), "--nproc", "2", "--quiet", f"train.out_dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5


@pytest.mark.parametrize("kind", ["text", "examples"])
def test_in_epoch_mode_no_two_ranks_see_the_same_window(runs, tmp_path, kind):
    """Each rank's rows of every step of an epoch: disjoint across ranks, and together the epoch's whole data."""
    if kind == "text":
        tokens = np.arange(4 * 17 * 13, dtype=np.uint32)  # a token's value is its position: a row names its window
        batchers = [Batches([tokens], 16, 4, "epoch", seed=3, rank=r, world=2) for r in range(2)]

        def windows(b, step):
            return [int(row[0]) for row in b.batch(step)[0]]
    else:
        words = "the king queen lord good night day love".split()
        rows = [{"prompt": f"{words[i // 8]} {words[i % 8]}", "response": " good."} for i in range(64)]  # distinct
        cfg = load_config(sft_config(tmp_path, rows, runs["one"] / "tokenizer.json"))
        prepare(cfg.data, quiet=True)
        examples = load_prepared(cfg.data.dir).examples["train"]
        batchers = [ExampleBatches(examples, 16, 4, "epoch", seed=3, rank=r, world=2) for r in range(2)]

        def windows(b, step):  # each example's prompt is its own
            return [tuple(row) for row in b.batch(step)[0]]

    steps = batchers[0].steps_per_epoch
    for epoch in range(2):
        seen = {r: [w for s in range(epoch * steps, (epoch + 1) * steps) for w in windows(b, s)]
                for r, b in enumerate(batchers)}  # fmt: skip
        assert len(seen[0]) == len(seen[1]) == steps * 2
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == steps * 4  # no window twice in an epoch, on any rank


def test_activation_checkpointing_recomputes_the_same_gradients(prepared):
    """With dropout on: the recomputed blocks draw the same masks, so losses and gradients are equal."""
    cfg = replace(prepared.model, dropout=0.2, vocab_size=40).resolved()
    x = torch.randint(0, 40, (4, 16))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.checkpoint_blocks = recompute
        model(x).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def start_long_run(config: Path, run: Path) -> subprocess.Popen:
    """A 2-rank run with a budget it will not reach, once it has logged 3 steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "gptlab", "train", str(config), "--nproc", "2", "--quiet", f"train.out_dir={run}",
            "train.max_iters=100000", "train.eval_interval=100000"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and step_losses(run).get(3)):
        time.sleep(0.05)
    return proc


def test_a_stop_by_sigterm_saves_every_rank_at_the_same_step(runs, tmp_path):
    """torchrun passes SIGTERM (a scheduler's preemption) to each rank; they agree on a step and save it."""
    run = tmp_path / "run"
    proc = start_long_run(runs["config"], run)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    latest = ckpt.find_checkpoint(run, "latest")
    meta = ckpt.read_meta(latest)
    assert meta["world_size"] == 2 and 3 <= meta["step"] < 100000 and latest.name == f"step_{meta['step']}"
    assert sorted(p.name for p in (latest / "train_state").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    flat = err.replace("\n", "")  # rich wraps long lines
    assert f"interrupted: every rank saves a checkpoint at step {meta['step']}" in flat and f"saved {latest}" in flat
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert sessions[-1]["ranks"] == 2 and "--nproc" in sessions[-1]["command"]  # what the user typed


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(runs, tmp_path):
    run = tmp_path / "run"
    proc = start_long_run(runs["config"], run)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [pid for pid in children if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(rank1) == 1
    os.kill(int(rank1[0]), signal.SIGKILL)
    start = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - start < 60  # not a hang: gloo sees the closed connection at once
    assert proc.returncode == 1
    assert "error: lost contact with the other ranks (" in err  # rank 0, exit 3: a consequence
    assert err.splitlines()[-1] == (
        "error: rank 1 was killed by SIGKILL and the run stopped (see its output above; continue with gptlab train "
        "--resume RUN_DIR --nproc N from the last checkpoint)"
    )
    assert "Traceback" not in err


def test_user_errors_of_distributed_runs(runs, tmp_path, capsys):
    config = str(runs["config"])
    assert main(["train", config, "--nproc", "3"]) == 2  # refused before any rank starts
    assert capsys.readouterr().err == "error: batch size 8 is not divisible by 3 ranks (change train.batch_size)\n"
    assert main(["train", config, "--nproc", "2", "train.micro_batch_size=3"]) == 2
    assert capsys.readouterr().err == (
        "error: train.micro_batch_size=3 does not divide the per-rank batch of 4 (pick a divisor of 4)\n"
    )
    assert main(["train", config, "train.dist_timeout=0"]) == 2
    assert "train.dist_timeout must be positive" in capsys.readouterr().err

    # an error every rank meets is printed by each (torchrun may stop rank 1 before it does), exit 2, no traceback
    r = gptlab("train", config, "--nproc", "2", f"train.out_dir={tmp_path / 'muon'}", "train.parallel=fsdp",
               "train.optimizer=muon")  # fmt: skip
    what = ("train.optimizer=muon does not work with train.parallel=fsdp (Muon needs whole matrices) (use "
            "train.optimizer=adamw, or train.parallel=ddp)")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert f"error: {what}" in errors and set(errors) <= {f"error: {what}", f"error: [rank 1] {what}"}


def test_a_rank_that_fails_in_set_up_stops_the_others_with_its_own_error(runs, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    r = gptlab("train", str(runs["config"]), "--nproc", "2", f"train.out_dir={out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: cannot write the run directory '{out}' (Not a directory) (set train.out_dir to a folder you " \
        "can write)" in r.stderr.splitlines()  # fmt: skip


def test_the_launcher_names_the_rank_that_caused_a_failure(capsys):
    from types import SimpleNamespace as Failure

    from gptlab.train.distributed import _report

    # rank 1 was killed; rank 0 then lost contact (3) and was stopped: rank 1 is named
    assert _report({0: Failure(exitcode=3, timestamp=10), 1: Failure(exitcode=-9, timestamp=10)}) == 1
    assert capsys.readouterr().err.startswith("error: rank 1 was killed by SIGKILL and the run stopped (")
    # rank 0 met a user error (printed by it); rank 1, blocked meanwhile, was killed by torchrun: exit 2, no blame
    assert _report({0: Failure(exitcode=2, timestamp=10), 1: Failure(exitcode=-9, timestamp=40)}) == 2
    assert capsys.readouterr().err == ""
    assert _report({1: Failure(exitcode=1, timestamp=12), 0: Failure(exitcode=-15, timestamp=12)}) == 1
    assert capsys.readouterr().err.startswith("error: rank 1 exited with code 1 and the run stopped (")


def test_a_batch_smaller_than_the_ranks_is_refused_under_plain_torchrun(prepared):
    from gptlab.train.trainer import micro_batch_size

    with pytest.raises(GptlabError) as e:
        micro_batch_size(replace(prepared.train, batch_size=1), world=2)
    assert str(e.value) == "batch size 1 is not divisible by 2 ranks (change train.batch_size)"


def test_a_lora_task_run_with_tied_embeddings_on_two_fsdp_ranks(tmp_path):
    """Exact match each epoch and the best checkpoint's test score at the end, from rank 0, with adapters only."""
    configs = Path(__file__).parent.parent / "configs"
    common = [f"data.dir={tmp_path / 'adder'}", "train.device=cpu", "train.max_epochs=1", "task.eval_examples=100",
              "model.tie_embeddings=true", "train.batch_size=256", "train.warmup_iters=5"]  # fmt: skip
    assert main(["prepare", str(configs / "adder.yaml"), *common]) == 0
    assert main(["train", str(configs / "adder.yaml"), "--quiet", *common, f"train.out_dir={tmp_path / 'base'}"]) == 0
    r = gptlab("train", str(configs / "adder.yaml"), "--nproc", "2", "--quiet", *common,
               f"train.out_dir={tmp_path / 'lora'}", f"model.init_from={tmp_path / 'base'}", "train.lora_rank=4",
               "train.parallel=fsdp")  # fmt: skip
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "lora" / "results.json").read_text())
    assert set(results) == {"step", "checkpoint", "val_exact_match", "test_exact_match"}
    assert "val_exact_match" in json.loads((tmp_path / "lora" / "history.json").read_text())[-1]
    stored = weights(tmp_path / "lora", results["checkpoint"])
    assert stored and all("lora_" in name for name in stored)  # the adapters, not the frozen base


def test_other_ranks_mark_their_errors_with_their_rank(runs, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", str(runs["config"]), "train.dist_timeout=-1"]) == 2
    assert capsys.readouterr().err == (
        "error: [rank 1] train.dist_timeout must be positive, got -1.0 (e.g. train.dist_timeout=600)\n"
    )


def test_a_damaged_or_foreign_checkpoint_is_refused_on_resume(runs, tmp_path):
    run = resume_from_step_10(runs["fsdp"], tmp_path / "run")
    (run / "checkpoints" / "step_10" / "train_state" / "__1_0.distcp").unlink()
    with pytest.raises(GptlabError) as e:
        Trainer(load_config(run / "config.yaml"), resume=True, quiet=True)
    step = run / "checkpoints" / "step_10"
    assert str(e.value).startswith(f"checkpoint '{step}' does not match this run or is damaged: train_state unreadable")
    assert str(e.value).endswith("(resume with the config of the run that wrote it, or pick an older checkpoint)")

    # weights alone (an imported model, or a checkpoint of gptlab before format 2) cannot resume
    shutil.rmtree(step / "train_state")
    with pytest.raises(GptlabError) as e:
        Trainer(load_config(run / "config.yaml"), resume=True, quiet=True)
    assert str(e.value) == (
        f"checkpoint '{step}' holds weights only, not the optimizer state a resume needs (it was imported, or written "
        f"by gptlab before format 2) (start a new run from its weights with model.init_from={run})"
    )


@pytest.mark.parametrize("plant", ["metadata", "inside_metadata", "distcp", "state"])
def test_a_resume_on_two_ranks_never_runs_code_planted_in_the_checkpoint(runs, tmp_path, plant):
    """Each rank reads train_state/ itself: every one refuses the payload, and nothing of it runs."""
    import test_security

    run = resume_from_step_10(runs["ddp"], tmp_path / "run")
    marker = tmp_path / "MARKER"
    getattr(test_security, f"plant_{plant}")(run, marker)
    r = gptlab("train", "--resume", str(run), "--nproc", "2", "--quiet")
    assert not marker.exists()
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("holds objects no checkpoint holds, such as code" in e for e in errors), r.stderr
    assert "Traceback" not in r.stderr
