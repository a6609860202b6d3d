"""Experiment tracking: TensorBoard and W&B offline files, samples during training, git provenance, the profiler."""

import json
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.config import Config, to_yaml
from gptlab.errors import GptlabError
from gptlab.generate import Generator, SamplingParams
from gptlab.train.callbacks import Callback
from gptlab.train.checkpoint import load_run
from gptlab.train.tracking import git_state
from gptlab.train.trainer import Trainer

# two runs' bits are compared: the thread count must not change under load (conftest.py)
pytestmark = pytest.mark.usefixtures("steady_threads")


def with_train(cfg: Config, **changes) -> Config:
    return replace(cfg, train=replace(cfg.train, **changes))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_of(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


class CrashAt(Callback):
    """Raises after `step`, as a crash would, leaving the steps since the last checkpoint logged but lost."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, metrics):
        if metrics["step"] == self.step:
            raise RuntimeError("crash")


# ----- TensorBoard -----------------------------------------------------------------------------
def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_logs_every_step_evaluation_and_sample(prepared):
    cfg = with_train(prepared, tensorboard=True, sample_interval=10)
    cfg = replace(cfg, sample=replace(cfg.sample, max_new_tokens=8))
    Trainer(cfg, quiet=True).fit()
    run = Path(cfg.train.out_dir)
    acc = tensorboard_events(run)
    for key in ("loss", "lr", "grad_norm"):
        logged = {e.step: e.value for e in acc.Scalars(f"train/{key}")}
        assert logged == pytest.approx(steps_of(run, key), rel=1e-6)  # every step, float32 in the event file
        assert sorted(logged) == list(range(1, 21))
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [5, 10, 15, 20]
    assert [e.step for e in acc.Scalars("eval/val_ppl")] == [5, 10, 15, 20]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("sample/text_summary")}
    samples = steps_of(run, "sample")
    assert sorted(texts) == sorted(samples) == [10, 20]
    assert texts[20] == "".join("    " + line for line in samples[20].splitlines(keepends=True))


def test_a_resumed_run_continues_the_tensorboard_log_without_the_lost_steps(prepared):
    cfg = with_train(prepared, tensorboard=True)
    t = Trainer(cfg, quiet=True)
    t.callbacks.append(CrashAt(8))  # the checkpoint is at step 5: steps 6-8 are logged, then lost
    with pytest.raises(RuntimeError, match="crash"):
        t.fit()
    Trainer(cfg, resume=True, quiet=True).fit()
    run = Path(cfg.train.out_dir)
    losses = [(e.step, e.value) for e in tensorboard_events(run).Scalars("train/loss")]
    assert [s for s, _ in losses] == list(range(1, 21))  # once each: the first session's 6-8 purged
    assert dict(losses) == pytest.approx(steps_of(run, "loss"), rel=1e-6)
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 5]


# ----- Weights & Biases ------------------------------------------------------------------------
def wandb_history(path: Path) -> list[dict]:
    """The history rows of a .wandb file: W&B's LevelDB-style log (32 KiB blocks of CRC, length, type, data)
    of protobuf Records after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record.FromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B's own folders inside tmp_path, and an unreachable server: offline must not need one."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)


def test_wandb_offline_writes_the_run_into_the_run_directory(prepared, wandb_env, capfd, monkeypatch):
    import openai  # noqa: F401  (in sys.modules, as in the server's tests: W&B then advertises its LLM tracer)

    monkeypatch.delenv("WANDB_DISABLE_WEAVE", raising=False)
    cfg = with_train(prepared, wandb="offline", sample_interval=10, max_iters=15)
    cfg = replace(cfg, sample=replace(cfg.sample, max_new_tokens=8))
    Trainer(cfg, quiet=True).fit()
    run = Path(cfg.train.out_dir)
    run_id = (run / "wandb" / "run_id.txt").read_text()
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"]
    rows = wandb_history(files[0])
    assert [r["_step"] for r in rows] == list(range(1, 16))
    assert {r["_step"]: r["train/lr"] for r in rows} == steps_of(run, "lr")
    assert {r["_step"]: r["train/loss"] for r in rows} == steps_of(run, "loss")
    assert {r["_step"]: r["eval/val_loss"] for r in rows if "eval/val_loss" in r} == steps_of(run, "val_loss")
    assert [r["_step"] for r in rows if "samples/_type" in r] == [10]
    assert "wandb" not in capfd.readouterr().err.lower()  # no banner, no warning

    Trainer(with_train(cfg, max_iters=20), resume=True, quiet=True).fit()  # the same W&B run goes on
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    assert [r["_step"] for r in wandb_history(files[1])] == list(range(16, 21))


@pytest.mark.parametrize(
    "setting,module,message",
    [
        ("tensorboard", "torch.utils.tensorboard", "train.tensorboard needs the tensorboard package"),
        ("wandb", "wandb", "train.wandb needs the wandb package"),
    ],
)
def test_a_missing_sink_package_is_refused_before_the_run_directory(prepared, monkeypatch, setting, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    cfg = with_train(prepared, **{setting: True if setting == "tensorboard" else "offline"})
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value) == f"{message} (pip install 'gptlab[track]')"
    assert not Path(cfg.train.out_dir).exists()


# ----- samples during training -----------------------------------------------------------------
def test_samples_are_logged_and_do_not_change_training(prepared, tmp_path):
    Trainer(prepared, quiet=True).fit()
    cfg = with_train(prepared, sample_interval=10, out_dir=str(tmp_path / "sampled"))
    cfg = replace(cfg, sample=replace(cfg.sample, start="KING", max_new_tokens=12, temperature=0.8, top_k=5, seed=3))
    Trainer(cfg, quiet=True).fit()
    plain, sampled = records(Path(prepared.train.out_dir)), records(tmp_path / "sampled")

    def without_timing(rs):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs if "sample" not in r]

    assert without_timing(sampled) == without_timing(plain)  # bit-identical losses, norms and val losses
    samples = [r for r in sampled if "sample" in r]
    assert [r["step"] for r in samples] == [10, 20] and all(set(r) == {"step", "sample"} for r in samples)
    # the sample was made with the weights of that step (no stale inference copies): the final checkpoint's
    _, model, tokenizer = load_run(tmp_path / "sampled", "latest")
    again = Generator(model, tokenizer).complete("KING", 12, SamplingParams(0.8, 5, seed=3))
    assert samples[-1]["sample"] == again and len(again) > 0


def test_a_missing_sample_prompt_file_is_refused_at_set_up(prepared):
    cfg = with_train(prepared, sample_interval=5)
    cfg = replace(cfg, sample=replace(cfg.sample, start="FILE:nowhere.txt"))
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value) == "prompt file 'nowhere.txt' not found (check the path after FILE:)"
    assert not Path(cfg.train.out_dir).exists()


# ----- git provenance --------------------------------------------------------------------------
def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A committed repository holding a.py and b.txt, the current directory."""
    path = tmp_path / "repo"
    path.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    git(path, "init", "-q")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.com")
    (path / "a.py").write_text("print(1)\n")
    (path / "b.txt").write_text("notes\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "first")
    monkeypatch.chdir(path)
    return path.resolve()


def test_a_dirty_tree_is_refused_when_a_clean_one_is_required(prepared, repo):
    (repo / "a.py").write_text("print(2)\n")
    cfg = with_train(prepared, require_clean_git=True)
    with pytest.raises(GptlabError) as e:
        Trainer(cfg, quiet=True)
    assert str(e.value) == (
        f"train.require_clean_git: the git repository '{repo}' has uncommitted changes to 1 tracked file: a.py "
        "(commit or stash them, or pass --allow-dirty)"
    )
    assert not Path(cfg.train.out_dir).exists()
    for name in ("c.py", "d.py", "e.py", "f.py"):
        (repo / name).write_text("")
    git(repo, "add", ".")
    with pytest.raises(GptlabError, match="to 5 tracked files: a.py, c.py, d.py and 2 more"):
        Trainer(cfg, quiet=True)


def test_untracked_files_alone_are_not_dirty(prepared, repo):
    (repo / "new.txt").write_text("not tracked\n")
    Trainer(with_train(prepared, require_clean_git=True), quiet=True)
    session = json.loads((Path(prepared.train.out_dir) / "run.json").read_text())["sessions"][0]
    assert session["git"] == {
        "root": str(repo), "commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "dirty_files": [], "dirty_count": 0,
    }  # fmt: skip


def test_allow_dirty_trains_and_records_the_changes(prepared, repo, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(with_train(prepared, require_clean_git=True, max_iters=5)))
    (repo / "b.txt").write_text("changed\n")
    assert main(["train", str(config)]) == 2
    assert "uncommitted changes to 1 tracked file: b.txt" in capsys.readouterr().err
    assert main(["train", str(config), "--allow-dirty"]) == 0
    sha = git(repo, "rev-parse", "HEAD")
    assert f"git: {sha[:7]} (dirty: 1 file)\n" in capsys.readouterr().err
    session = json.loads((Path(prepared.train.out_dir) / "run.json").read_text())["sessions"][0]
    assert session["git"]["commit"] == sha and session["git"]["dirty"] is True
    assert session["git"]["dirty_files"] == ["b.txt"]
    assert session["command"] == sys.argv and session["device"] == "cpu" and session["start_step"] == 0


def test_outside_a_repository_git_is_none(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    Trainer(with_train(prepared, require_clean_git=True))
    assert "git: none\n" in capsys.readouterr().err
    assert json.loads((Path(prepared.train.out_dir) / "run.json").read_text())["sessions"][0]["git"] is None
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # git not installed
    assert git_state() is None


def test_a_renamed_file_counts_once_under_its_new_name(repo):
    git(repo, "mv", "a.py", "c.py")
    state = git_state()
    assert state.dirty_files == ("c.py",) and state.describe().endswith("(dirty: 1 file)")


# ----- profiler --------------------------------------------------------------------------------
def test_the_profiler_writes_a_trace_and_prints_where_time_goes(prepared, capsys):
    Trainer(with_train(prepared, profile=True)).fit()
    run = Path(prepared.train.out_dir)
    trace = json.loads((run / "profile" / "trace_steps_3-5.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # the profiler counts steps from 0: its steps 2-4 are training steps 3-5
    assert {"data", "step", "ProfilerStep#2", "ProfilerStep#4"} <= names and "ProfilerStep#5" not in names
    err = capsys.readouterr().err
    assert f"profile of steps 3-5 (trace: {run / 'profile' / 'trace_steps_3-5.json'})" in err
    assert "Self CPU" in err and "aten::mm" in err and "waiting for data" in err
    assert (run / "profile" / "summary_steps_3-5.txt").read_text().splitlines()[-1] in err
    assert sorted(steps_of(run, "loss")) == list(range(1, 21))  # training went on after the profiled steps
