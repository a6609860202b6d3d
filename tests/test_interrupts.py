"""Real signals on the real `gptlab` command: Ctrl-C and SIGTERM in train and prepare, kill -9 of prepare."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_text

TINY = [
    "data.source=corpus.txt", "data.dir=data", "train.out_dir=run", "train.device=cpu", "train.compile=false",
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
    "--max_iters=10", "--eval_interval=5", "--eval_iters=2", "train.warmup_iters=2",
]  # fmt: skip


def gptlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *args], cwd=cwd, capture_output=True, text=True)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptlab", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(check, timeout: float = 120) -> bool:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def children(pid: int) -> set[int]:
    """The child processes of `pid` (of any of its threads), from /proc."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:  # the thread ended meanwhile
            pass
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text(make_text())
    return tmp_path


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
def test_kill_9_of_prepare_takes_its_workers_with_it(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(4000) * 100)  # ~19 MB, seconds of work: still busy when killed
    args = ["prepare", *TINY[:2], "--workers=2", "data.chunk_chars=4096"]
    proc = start(*args, cwd=tmp_path)
    try:
        assert wait_for(lambda p=proc: len(children(p.pid)) >= 2), proc.communicate(timeout=60)
        workers = children(proc.pid)
        time.sleep(0.3)  # encoding
        assert proc.poll() is None, "prepare finished before it could be killed: give it more text"
        proc.kill()
        proc.wait(timeout=10)
        assert wait_for(lambda: not any(alive(pid) for pid in workers), timeout=5), [p for p in workers if alive(p)]
    finally:
        for pid in children(proc.pid) if proc.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
        proc.kill()


def train(cwd: Path, *extra: str) -> subprocess.Popen:
    """`gptlab train` on the tiny config with a budget it will not reach, once it has logged a few steps."""
    proc = start("train", *TINY, "--max_iters=100000", "--quiet", *extra, cwd=cwd)
    assert wait_for(lambda: len(metric_steps(cwd / "run")) > 3 or proc.poll() is not None), "no progress"
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_says_interrupted_and_exits_128_plus_it(workdir, sig):
    """So `gptlab train ... && gptlab export ...` does not go on with an unfinished run; --resume continues it."""
    assert gptlab("prepare", *TINY[:2], cwd=workdir).returncode == 0
    proc = train(workdir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and out == ""  # no "trained N steps" line
    step = max(metric_steps(workdir / "run"))
    assert (workdir / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    assert err.splitlines()[-1] == (
        f"interrupted at step {step}: saved checkpoint run/checkpoints/step_{step}; resume with gptlab train --resume run"
    )
    r = gptlab("train", "--resume", "run", f"--max_iters={step + 2}", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"trained {step + 2} steps into run")


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(workdir):
    """Steps long enough that the second Ctrl-C comes within the step the first one let finish."""
    assert gptlab("prepare", *TINY[:2], cwd=workdir).returncode == 0
    big = ["--n_embd=128", "--block_size=64", "--batch_size=16", "--eval_interval=100000"]
    proc = train(workdir, *big)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:
        if line.startswith("interrupted: saving a checkpoint after this step"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert not (workdir / "run" / "checkpoints").exists()  # aborted, not saved


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_prepare_stops_on_a_signal_with_its_workers_and_resumes(tmp_path, sig):
    """Ctrl-C reaches the whole process group (workers too), a scheduler's SIGTERM only the main process."""
    args = [sys.executable, "-m", "gptlab", "prepare", *TINY[:2], "--workers=2", "data.chunk_chars=4096"]
    kw = {"cwd": tmp_path, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    for copies in (300, 900, 2700):  # ~57 MB, then more where a quiet machine finished before the signal landed
        (tmp_path / "corpus.txt").write_text(make_text(4000) * copies)
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        proc = subprocess.Popen(args, start_new_session=True, **kw)  # its own process group, as in a terminal
        try:
            assert wait_for(lambda p=proc: len(children(p.pid)) >= 2), proc.communicate(timeout=60)
            workers = children(proc.pid)
            time.sleep(0.3)
            assert proc.poll() is None, "prepare finished before the signal: give it more text"
            os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        if not (proc.returncode == 0 and out.startswith("prepared: ")):  # done before the signal took effect: again
            break
    assert (proc.returncode, out, err.splitlines()[-1:]) == (128 + sig, "", ["interrupted"]), err
    assert "Traceback" not in err and not any(alive(pid) for pid in workers)
    assert not json.loads((tmp_path / "data" / "meta.json").read_text()).get("complete")
    r = gptlab(*args[3:], cwd=tmp_path)  # the same command
    assert r.returncode == 0 and r.stdout.startswith("prepared: data ("), r.stderr


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_the_trainer_says_which_signal_stopped_it(tmp_path, text_file, backend):
    """The Python API's view: `interrupted` is the signal's number after a stop, None after a finished run."""
    from conftest import tiny_config

    from gptlab.data.shards import prepare
    from gptlab.train.callbacks import Callback
    from gptlab.train.trainer import Trainer

    if backend == "jax":
        pytest.importorskip("jax")
        from gptlab.jax.train import JaxTrainer as Trainer  # noqa: N814

    class Kill(Callback):
        def on_step(self, trainer, metrics):  # noqa: ANN001
            if metrics["step"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the trainer's handler runs before step 4

    cfg = tiny_config(tmp_path, text_file, f"train.backend={backend}", "train.max_iters=8", "train.eval_interval=4")
    prepare(cfg.data, quiet=True)
    trainer = Trainer(cfg, quiet=True)
    trainer.callbacks.append(Kill())
    before = signal.getsignal(signal.SIGTERM)
    trainer.fit()
    assert (trainer.interrupted, trainer.step) == (signal.SIGTERM, 3)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    resumed = Trainer(cfg, resume=True, quiet=True).fit()
    assert (resumed.interrupted, resumed.step) == (None, 8)


def test_the_launcher_exits_with_the_code_of_ranks_a_signal_stopped(capsys):
    """A signal sent to the ranks, not to `gptlab train --nproc`: rank 0 said where it stopped, nothing to add."""
    from types import SimpleNamespace

    from gptlab.train.distributed import _report

    def failure(code: int, t: float) -> SimpleNamespace:
        return SimpleNamespace(exitcode=code, timestamp=t)

    assert _report({0: failure(143, 1.0), 1: failure(-signal.SIGTERM, 2.0)}) == 143  # torchrun ended rank 1
    assert _report({0: failure(130, 1.0)}) == 130
    assert capsys.readouterr().err == ""
    assert _report({0: failure(143, 2.0), 1: failure(-signal.SIGKILL, 1.0)}) == 1  # a crash is still one
    assert capsys.readouterr().err.startswith("error: rank 1 was killed by SIGKILL")


def test_a_run_interrupted_before_its_first_checkpoint_is_told_to_start_again_with_overwrite(prepared, capsys):
    from gptlab.cli import _report_interrupted
    from gptlab.train.trainer import Trainer

    run = Path(prepared.train.out_dir)
    Trainer(prepared, quiet=True)  # the run directory is written before the first step; no checkpoint yet
    assert _report_interrupted(run, 0, 1, signal.SIGTERM) == 143
    assert capsys.readouterr().err == "interrupted at step 0: nothing saved yet (start it again with --overwrite)\n"
    with pytest.raises(Exception, match="already exists"):  # the plain command again is refused, as the line says
        Trainer(prepared, quiet=True)
    assert Trainer(prepared, overwrite=True, quiet=True).fit().step == prepared.train.max_iters
