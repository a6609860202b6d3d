"""Serving throughput and latency: `gptlab serve` under 1, 8 and 32 concurrent streaming clients.

A run directory with the generation benchmark's shape (6 layers, 6 heads, 384 dims, context 256) on
Shakespeare characters, trained for a few steps (the weights barely matter for speed), is served by
`gptlab serve` in its own process on 127.0.0.1. Clients stream `POST /v1/completions` (64 new tokens,
temperature 0, end-of-text ignored so every request makes all its tokens) with httpx from one asyncio loop.
For each concurrency: aggregate new tokens/s over the wall time, and p50/p99 of time to first token and
of whole-request latency. The baseline is one-at-a-time serving: the same number of requests as the
8-client run, sent one after another.

    python benchmarks/serve_speed.py            # as recorded in RESULTS.md
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
from pathlib import Path

import httpx

NEW_TOKENS = 64
SHAPE = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256"]


def make_run(work: Path) -> Path:
    """Prepare Shakespeare characters and train the benchmark shape for a few steps (once)."""
    run = work / "run"
    if (run / "checkpoints" / "latest").is_file():
        return run
    gptlab = str(Path(sys.executable).with_name("gptlab"))
    data = [f"data.dir={work / 'data'}"]
    subprocess.run([gptlab, "prepare", *data, "--quiet"], check=True)
    train = [*data, *SHAPE, f"train.out_dir={run}", "train.max_iters=5", "train.eval_interval=5",
             "train.eval_iters=1", "train.batch_size=4", "train.compile=false"]  # fmt: skip
    subprocess.run([gptlab, "train", *train, "--quiet", "--overwrite"], check=True)
    return run


async def one_request(client: httpx.AsyncClient, prompt: str) -> tuple[float, float, int]:
    """Stream one completion; return (time to first token, whole latency, tokens)."""
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, tokens


async def load(url: str, clients: int, requests: int) -> dict[str, float]:
    """`requests` requests from `clients` concurrent clients; throughput and latency percentiles."""
    prompts = [f"ROMEO {i}:\n" for i in range(requests)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[tuple[float, float, int]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one_request(client, queue.get_nowait()))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    firsts, lats, toks = zip(*results, strict=True)

    def pct(xs: tuple[float, ...], q: float) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]

    assert all(t == NEW_TOKENS for t in toks), f"some requests made fewer tokens: {set(toks)}"
    return {"tok/s": sum(toks) / wall, "ttft p50": pct(firsts, 50), "ttft p99": pct(firsts, 99),
            "latency p50": pct(lats, 50), "latency p99": pct(lats, 99), "requests": len(results)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gptlab-serve-bench")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = make_run(work)
    gptlab = str(Path(sys.executable).with_name("gptlab"))
    server = subprocess.Popen(
        [gptlab, "serve", str(run), "--port", str(args.port), "--max-batch", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        print(f"machine: {os.cpu_count()} CPUs; server and clients on one machine; {' '.join(SHAPE)}; "
              f"{NEW_TOKENS} new tokens a request, temperature 0", flush=True)  # fmt: skip
        asyncio.run(load(url, 1, 2))  # warm up
        rows = {"one at a time (16 requests)": asyncio.run(load(url, 1, 16))}
        for clients in (1, 8, 32):
            rows[f"{clients} concurrent clients ({max(16, 2 * clients)} requests)"] = asyncio.run(
                load(url, clients, max(16, 2 * clients))
            )
        base = rows["one at a time (16 requests)"]["tok/s"]
        print(
            "\n| load | tok/s | vs one at a time | TTFT p50 / p99 (s) | latency p50 / p99 (s) |\n|---|---|---|---|---|"
        )
        for name, r in rows.items():
            print(
                f"| {name} | {r['tok/s']:,.0f} | {r['tok/s'] / base:.2f}x | {r['ttft p50']:.3f} / {r['ttft p99']:.3f} "
                f"| {r['latency p50']:.2f} / {r['latency p99']:.2f} |"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
