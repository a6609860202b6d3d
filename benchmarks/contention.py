"""Default settings on a busy machine: train steps/s and served tokens/s with one busy process per core, against
the same on a quiet machine, and the old behaviour (all cores, no adaptation: `--threads <cores>`) for contrast.

Train: the default preset (configs/shakespeare-char.yaml: modern block, Muon, context 64, batch 12, compiled as
`gptlab train` compiles it) on random tokens, through `TrainStep`, in one worker process per setting kept for the
whole run. Each window starts a fresh thread governor, as a new `gptlab train` would, runs until its first
decision (reported as the settle time: on a loaded machine it holds the one step that runs with every thread),
then counts steps for `--seconds`. Serve: `gptlab serve` of benchmarks/serve_speed.py's run (6 layers, 384 dims,
context 256), one server process per setting, 4 concurrent streaming clients of 64 tokens each from this process;
tokens/s over `--seconds` after 2 s of traffic that is not counted. The load: one `while True: pass` process per
core, started for the loaded windows and killed after them. Quiet and loaded windows, and the settings within
them, alternate in interleaved rounds, so the ratios share the machine's drift.

    .venv/bin/python benchmarks/contention.py    # ~4 minutes on 2 cores; exits 1 if a target is missed

Target (issue 20): the default's loaded figure at least a third of its quiet one, for training and serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_speed import NEW_TOKENS, make_run  # noqa: E402

TARGET = 1 / 3
CLIENTS = 4


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "n/a"


# ----- the training worker (a child process) ---------------------------------------------------------------------
def train_worker(threads_flag: str, seconds: float) -> None:
    """Answer each line on stdin with `settle_s steps_per_s threads` for one window of training steps."""
    import numpy as np
    import torch

    from gptlab import threads
    from gptlab.config import load_config
    from gptlab.model import GPT
    from gptlab.train.trainer import TrainStep, micro_batch_size

    threads.use(None if threads_flag == "auto" else int(threads_flag))
    cfg = load_config(str(ROOT / "configs" / "shakespeare-char.yaml"), [])
    vocab = 96
    model = GPT(replace(cfg.model, vocab_size=vocab).resolved())
    device = torch.device("cpu")
    step = TrainStep(model, cfg.train, device, micro_batch_size(cfg.train, 1), cfg.train.max_iters)
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.model.block_size)

    def one() -> None:
        x = rng.integers(0, vocab, size=shape)
        step(x, np.roll(x, -1, axis=1))

    for _ in range(3):  # compiles
        one()
    print("ready", flush=True)
    for _ in sys.stdin:
        step.threads = threads.governor(adaptive=True)  # a fresh start, as a new `gptlab train` makes
        t0 = time.perf_counter()
        while step.threads.adaptive and step.threads.units < 3:  # the untimed unit, the reference, the probe
            one()
        settle = time.perf_counter() - t0
        t0, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - t0 < seconds:
            one()
            n += 1
        print(f"{settle:.2f} {n / (time.perf_counter() - t0):.3f} {step.threads.current}", flush=True)


# ----- the parent -----------------------------------------------------------------------------------------------
class Load:
    """One busy process per core while in use."""

    def __init__(self, on: bool) -> None:
        self.on, self.procs = on, []

    def __enter__(self) -> Load:
        if self.on:
            busy = [sys.executable, "-c", "while True: pass"]
            self.procs = [subprocess.Popen(busy) for _ in range(cores())]
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


async def serve_window(url: str, seconds: float, warmup: float = 2.0) -> float:
    """Tokens/s streamed to CLIENTS concurrent clients in `seconds`, after `warmup` seconds not counted.

    Tokens are counted as they arrive (a character-level run: one character per token), so a window that is cut
    off mid-request counts what it received, however slow the server is.
    """
    start = time.perf_counter() + warmup
    stop = start + seconds
    counted = 0

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        nonlocal counted
        body = {"prompt": f"ROMEO {i}:\n", "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
                "ignore_eos": True}  # fmt: skip
        while time.perf_counter() < stop:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    now = time.perf_counter()
                    if now >= stop:
                        return  # leaving the stream cancels the request
                    if line.startswith("data: {") and now >= start:
                        counted += len(json.loads(line[6:])["choices"][0]["text"])

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(CLIENTS)))
    return counted / seconds


def start_server(run: Path, port: int, threads_flag: str) -> subprocess.Popen:
    gptlab = str(Path(sys.executable).with_name("gptlab"))
    args = [gptlab, "serve", str(run), "--port", str(port), "--max-batch", "32"]
    args += ["--threads", threads_flag] if threads_flag != "auto" else []
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on port {port} did not start")


def summary(name: str, quiet: list[float], loaded: list[float]) -> tuple[str, float]:
    q, lo = statistics.median(quiet), statistics.median(loaded)
    ratios = [b / a for a, b in zip(quiet, loaded, strict=True)]
    row = (f"| {name} | {q:,.2f} ({min(quiet):,.2f}-{max(quiet):,.2f}) | {lo:,.2f} ({min(loaded):,.2f}-"
           f"{max(loaded):,.2f}) | **{lo / q:.2f}** (rounds {min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip
    return row, lo / q


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of quiet and loaded windows")
    parser.add_argument("--seconds", type=float, default=8.0, help="the measured part of each window")
    parser.add_argument("--only", choices=["train", "serve"], help="one half only")
    parser.add_argument("--work", default="/tmp/gptlab-serve-bench", help="serve_speed.py's run folder")
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_worker(args.child, args.seconds)
        return 0
    n = cores()
    settings = {"default": "auto", f"old (--threads {n})": str(n)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"{n} cores, commit {commit.strip()}, load average {loadavg()} at the start", flush=True)
    rows, ratios, quiet_of = [], {}, {}

    if args.only != "serve":
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        child = [sys.executable, __file__, "--seconds", str(args.seconds), "--child"]
        workers = {name: subprocess.Popen([*child, flag], **pipes) for name, flag in settings.items()}
        for w in workers.values():
            assert w.stdout.readline().strip() == "ready"
        rates = {(name, load): [] for name in settings for load in ("quiet", "loaded")}
        settles = {key: [] for key in rates}
        for r in range(args.rounds):
            for load in ("quiet", "loaded"):
                with Load(load == "loaded"):
                    for name, w in workers.items():
                        w.stdin.write("go\n")
                        w.stdin.flush()
                        settle, rate, chosen = w.stdout.readline().split()
                        rates[name, load].append(float(rate))
                        settles[name, load].append(float(settle))
                        print(f"train round {r + 1} {load:6} {name:18} {float(rate):7.2f} steps/s "
                              f"({chosen} threads, settled in {float(settle):.1f} s)", flush=True)  # fmt: skip
        for w in workers.values():
            w.stdin.close()
            w.wait()
        for name in settings:
            quiet, loaded = rates[name, "quiet"], rates[name, "loaded"]
            row, ratios[f"train {name}"] = summary(f"train steps/s, {name}", quiet, loaded)
            rows.append(row)
            quiet_of[f"train {name}"] = statistics.median(rates[name, "quiet"])
        default_settle = statistics.median(settles["default", "loaded"])
        print(f"default on the loaded machine: first decision after {default_settle:.1f} s (median)", flush=True)

    if args.only != "train":
        run = make_run(Path(args.work))
        servers = {name: start_server(run, args.port + i, flag) for i, (name, flag) in enumerate(settings.items())}
        ports = {name: args.port + i for i, name in enumerate(settings)}
        try:
            rates = {(name, load): [] for name in settings for load in ("quiet", "loaded")}
            for name in settings:  # warm up
                asyncio.run(serve_window(f"http://127.0.0.1:{ports[name]}", 1.0, warmup=0.5))
            for r in range(args.rounds):
                for load in ("quiet", "loaded"):
                    with Load(load == "loaded"):
                        for name in settings:
                            rate = asyncio.run(serve_window(f"http://127.0.0.1:{ports[name]}", args.seconds))
                            rates[name, load].append(rate)
                            print(f"serve round {r + 1} {load:6} {name:18} {rate:8.1f} tok/s", flush=True)
        finally:
            for s in servers.values():
                s.terminate()
                s.wait(timeout=30)
        for name in settings:
            row, ratios[f"serve {name}"] = summary(
                f"served tok/s, {name}", rates[name, "quiet"], rates[name, "loaded"]
            )  # fmt: skip
            rows.append(row)
            quiet_of[f"serve {name}"] = statistics.median(rates[name, "quiet"])

    print(f"\nload average {loadavg()} at the end\n")
    print("| setting | quiet (range) | loaded: one busy process per core (range) | loaded / quiet |\n|---|---|---|---|")
    print("\n".join(rows))
    for part in ("train", "serve"):
        if f"{part} default" in quiet_of:
            old = next(k for k in quiet_of if k.startswith(f"{part} old"))
            print(f"{part}, quiet machine: default / old = {quiet_of[f'{part} default'] / quiet_of[old]:.2f}")
    missed = [k for k, v in ratios.items() if k.endswith("default") and v < TARGET]
    print(f"\ntarget: default loaded / quiet >= {TARGET:.2f}: {'missed by ' + ', '.join(missed) if missed else 'met'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
