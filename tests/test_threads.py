"""Torch's CPU threads: `--threads N` applied where the work runs and recorded, the governor's choices on a fake
clock, and the plain progress lines a log file gets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import uvicorn
from conftest import make_text, tiny_config
from fastapi.testclient import TestClient

from gptlab import threads
from gptlab.cli import main
from gptlab.config import Config, to_yaml
from gptlab.data.shards import prepare
from gptlab.generate import Engine
from gptlab.threads import ThreadGovernor, candidates
from gptlab.train.trainer import Trainer, TrainStep


@pytest.fixture(autouse=True)
def restore_threads():
    """The policy is per process and the count per thread: leave both as the test found them."""
    before = torch.get_num_threads()
    yield
    threads.use(None, here=False)
    torch.set_num_threads(before)


class FakeMachine:
    """Units of work whose duration depends on the thread count they run with, on a clock only they advance;
    `busy`: the share of their wall time the threads run on a CPU (1 quiet, ~0.5 when other work takes the cores)."""

    def __init__(self, cost: dict[int, float], threads: int = 2, busy: float = 1.0) -> None:
        self.now, self.cpu, self.cost, self.threads, self.busy = 0.0, 0.0, dict(cost), threads, busy
        self.sets: list[int] = []

    def spend(self, seconds: float) -> None:
        self.now += seconds
        self.cpu += seconds * self.threads * self.busy

    def set(self, n: int) -> None:
        self.threads = n
        self.sets.append(n)

    def governor(self, fixed: int | None = None, **kw: object) -> ThreadGovernor:
        choices = None if fixed is not None else sorted(self.cost, reverse=True)
        return ThreadGovernor(
            fixed, choices=choices, clock=lambda: self.now, cpu_clock=lambda: self.cpu, set_threads=self.set,
            get_threads=lambda: self.threads, **kw,
        )  # fmt: skip

    def run(self, gov: ThreadGovernor, units: int, first: float | None = None) -> list[int]:
        """The thread count of each unit; `first`: the first unit's duration (compilation)."""
        used = []
        for i in range(units):
            with gov.unit() as n:
                assert n == self.threads
                used.append(n)
                self.spend(first if i == 0 and first is not None else self.cost[self.threads])
            assert self.threads == gov.current  # between units (an evaluation, say) the chosen count holds
        return used


def test_candidates_are_all_threads_all_but_one_and_one():
    assert candidates(8) == [8, 7, 1]
    assert candidates(2) == [2, 1]
    assert candidates(1) == [1]


def test_a_quiet_machine_never_probes_so_every_unit_runs_with_every_thread():
    """Some kernels give other bits at another thread count: a quiet run must not depend on timing."""
    machine = FakeMachine({2: 1.0, 1: 0.5})  # even where one thread would be faster: no load, no probe
    gov = machine.governor()
    assert machine.run(gov, 2000, first=500.0) == [2] * 2000 and machine.sets == [] and gov.switches == 0


def test_a_probe_is_compared_only_with_units_of_its_own_kind():
    """Serving mixes big steps and small ones: a one-thread probe on a small step must not beat big steps' median."""
    machine = FakeMachine({2: 1.0, 1: 1.5}, busy=0.5)  # loaded, so it probes, but two threads stay faster
    gov = machine.governor()
    scale = {"big": 10.0, "small": 1.0}
    for i in range(3000):
        kind = "small" if i % 7 == 6 else "big"
        with gov.unit(kind):
            machine.spend(machine.cost[machine.threads] * scale[kind])
    assert gov.current == 2 and gov.switches == 0  # a small probe (1.5) never beat the big steps' median (10)
    with gov.unit(None):  # a unit of no kind is neither timed nor probed
        assert machine.threads == 2
        machine.spend(1000.0)
    assert gov.current == 2 and all(len(d) <= 3 for d in gov.recent.values())


def test_a_unit_that_raises_is_not_taken_as_a_probe_result():
    machine = FakeMachine({2: 1.0, 1: 1.5}, busy=0.5)
    gov = machine.governor()
    machine.run(gov, 4)  # untimed, then three units that find the threads descheduled
    with pytest.raises(RuntimeError), gov.unit() as n:
        assert n == 1  # the probe
        raise RuntimeError("a failed step")
    assert gov.current == 2 and machine.threads == 2 and gov.probing is None


def test_a_loaded_machine_falls_back_to_one_thread_after_a_few_slow_units():
    machine = FakeMachine({2: 100.0, 1: 2.0}, busy=0.5)  # the team waits at every barrier for a descheduled thread
    gov = machine.governor()
    used = machine.run(gov, 5000)
    assert used[:6] == [2, 2, 2, 2, 1, 1] and gov.current == 1 and gov.switches == 1  # 3 timed units saw the load
    reprobes = used[5:].count(2)  # all threads are tried again, no more often than the budget allows
    assert 1 <= reprobes and reprobes * 100.0 <= 0.03 * machine.now + 100.0


def test_the_governor_follows_the_load_as_it_comes_and_goes():
    machine = FakeMachine({2: 1.0, 1: 1.5})
    gov = machine.governor()
    machine.run(gov, 200)
    assert gov.current == 2
    machine.cost, machine.busy = {2: 100.0, 1: 3.0}, 0.5  # other work starts: within a few units one thread takes over
    used = machine.run(gov, 100)
    assert gov.current == 1 and used.index(1) < 10 and used[60:].count(2) == 0
    machine.cost, machine.busy = {2: 1.0, 1: 1.5}, 1.0  # and it ends: all threads come back once they are probed again
    machine.run(gov, int(100.0 / 0.03 / 1.5) + 10)
    assert gov.current == 2 and gov.switches == 2


def test_a_count_only_slightly_faster_is_not_taken():
    machine = FakeMachine({2: 1.0, 1: 0.95}, busy=0.5)  # within the 10% margin: timing noise, not a reason to switch
    gov = machine.governor()
    machine.run(gov, 500)
    assert gov.current == 2 and gov.switches == 0


def test_a_fixed_count_is_set_once_and_never_probed():
    machine = FakeMachine({2: 100.0, 1: 1.0})
    gov = machine.governor(fixed=2)
    assert machine.run(gov, 50) == [2] * 50 and machine.sets == []
    machine.threads = 2
    gov = machine.governor(fixed=1)
    assert machine.run(gov, 50) == [1] * 50 and machine.sets == [1]


def test_a_later_governor_sees_the_threads_an_earlier_one_lowered():
    """Sampling during training, say: a governor that starts while another has this thread on 1 still has 2."""
    torch.set_num_threads(2)
    gov = ThreadGovernor()
    with gov.unit():
        pass
    threads._set(1)  # what a governor does after a probe wins
    assert threads.available() == 2
    gov = ThreadGovernor()
    gov.begin()
    assert gov.choices == [2, 1]  # taken from what the thread had
    seen = []

    def fresh() -> None:  # a thread no governor touched: a user's own setting is respected
        torch.set_num_threads(1)
        seen.append(threads.available())

    worker = threading.Thread(target=fresh)
    worker.start()
    worker.join()
    assert seen == [1]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "configs/tiny.yaml"],
        ["sample", "runs/none"],
        ["serve", "runs/none"],
        ["eval", "runs/none"],
        ["bench", "configs/tiny.yaml"],
    ],
)
def test_a_thread_count_below_one_is_a_one_line_error(args, capsys):
    assert main([*args, "--threads", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --threads must be at least 1, got 0 (e.g. --threads 1, or leave it out to let " \
        "gptlab choose)\n"  # fmt: skip


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[tuple[str, int]]:
    """Record (thread name, torch threads) at each call of cls.name."""
    seen: list[tuple[str, int]] = []
    real = getattr(cls, name)

    def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, call)
    return seen


def _config_file(cfg: Config, path: Path) -> Path:
    path.write_text(to_yaml(cfg))
    return path


def test_train_applies_threads_in_the_training_thread_and_records_them(prepared, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    steps = _spy(monkeypatch, TrainStep, "_step")
    config = _config_file(prepared, tmp_path / "tiny.yaml")
    assert main(["train", str(config), "train.max_iters=5", "--threads", "1", "--quiet"]) == 0
    assert steps == [("MainThread", 1)] * 5
    run_json = Path(prepared.train.out_dir) / "run.json"
    assert json.loads(run_json.read_text())["sessions"][-1]["threads"] == 1
    threads.use(None)  # the default: chosen by timing, recorded as such
    assert main(["train", str(config), "train.max_iters=5", "--overwrite", "--quiet"]) == 0
    assert json.loads(run_json.read_text())["sessions"][-1]["threads"] == "auto"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (5 steps)."""
    tmp = tmp_path_factory.mktemp("threads")
    (tmp / "corpus.txt").write_text(make_text())
    cfg = tiny_config(tmp, tmp / "corpus.txt", "train.max_iters=5")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    return Path(cfg.train.out_dir)


def test_serve_applies_threads_in_the_engine_thread_only(run_dir, monkeypatch):
    torch.set_num_threads(2)
    forwards = _spy(monkeypatch, Engine, "_forward")
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: apps.append(self.config.app))
    assert main(["serve", str(run_dir), "--port", "0", "--threads", "1"]) == 0
    try:
        with TestClient(apps[0]) as client:
            body = {"model": run_dir.name, "prompt": "KING:", "max_tokens": 3, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        apps[0].state.worker.close()
    assert forwards and set(forwards) == {("gptlab-engine", 1)}
    assert torch.get_num_threads() == 2  # the main thread, which serves HTTP, kept its own


def test_sample_eval_and_bench_apply_threads(run_dir, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(2)
    forwards = _spy(monkeypatch, Engine, "_forward")
    assert main(["sample", str(run_dir), "--max-new-tokens", "3", "--num-samples", "1", "--threads", "1"]) == 0
    assert forwards and set(forwards) == {("MainThread", 1)}
    torch.set_num_threads(2)
    assert main(["eval", str(run_dir), "--max-tokens", "50", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    config = _config_file(tiny_config(tmp_path, tmp_path / "unused.txt"), tmp_path / "tiny.yaml")
    capsys.readouterr()
    assert main(["bench", str(config), "--steps", "2", "--warmup", "1", "--vocab-size", "40", "--threads", "1"]) == 0
    assert "(torch.float32, 1 thread)" in capsys.readouterr().out


def test_a_log_file_gets_a_plain_progress_line_every_log_interval(prepared, tmp_path):
    config = _config_file(prepared, tmp_path / "tiny.yaml")
    args = [sys.executable, "-m", "gptlab", "train", str(config), "train.log_interval=5", "train.max_iters=15"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)  # stderr is a pipe, not a terminal
    assert r.returncode == 0, r.stderr
    line = re.compile(
        r"step (\d+)/15 \| loss \d+\.\d{4} \| lr \d\.\de-\d\d \| [\d,]+ tok/s \| [12] threads? \| "
        r"\d+:\d\d:\d\d elapsed, \d+:\d\d:\d\d left"
    )
    steps = [int(m.group(1)) for m in map(line.fullmatch, r.stderr.splitlines()) if m]
    assert steps == [5, 10, 15], r.stderr


def test_training_gives_the_same_bits_at_any_thread_count():
    """The governor may change the count between steps: losses and weights must not depend on it, with tensors
    above ATen's grain size (32,768 elements), where its ops split work across threads."""
    from dataclasses import replace

    import numpy as np

    from gptlab.config import load_config
    from gptlab.model import GPT
    from gptlab.train.trainer import micro_batch_size

    cfg = load_config(None, ["model.n_embd=192", "model.n_layer=2", "model.block_size=64", "train.compile=false"])
    assert 192 * 4 * 192 > 32768

    def train(counts: list[int]) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT(replace(cfg.model, vocab_size=96).resolved())
        step = TrainStep(model, cfg.train, torch.device("cpu"), micro_batch_size(cfg.train, 1), 100)
        rng, losses = np.random.default_rng(0), []
        for n in counts:
            torch.set_num_threads(n)
            x = rng.integers(0, 96, size=(cfg.train.batch_size, 64))
            loss, norm = step._step(x, np.roll(x, -1, axis=1))
            losses += [float(loss), float(norm)]
        return losses, model.state_dict()

    ref_losses, ref = train([2, 2, 2, 2])
    for counts in ([1, 1, 1, 1], [2, 1, 2, 1]):
        losses, weights = train(counts)
        assert losses == ref_losses and all(torch.equal(weights[k], ref[k]) for k in ref)
