"""Shared fixtures: small text the tests write themselves, prepared data and a tiny config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gptlab.config import Config, ModelConfig, load_config
from gptlab.data.shards import prepare
from gptlab.model import GPT

torch.set_num_threads(2)


@pytest.fixture
def steady_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every thread governor at its first count even when other work loads the machine (CI's neighbours).

    Some kernels give other bits at another thread count, so a run whose governor lowered its count under load is
    not bit-identical to one that did not: tests that compare two runs' bits use this (module `pytestmark`)."""
    from gptlab import threads

    monkeypatch.setattr(threads, "LOADED", 0.0)


WORDS = "the king queen lord good night day love death sword crown heart blood sweet fair".split()


def make_text(n_lines: int = 400, seed: int = 0) -> str:
    """Deterministic pseudo-Shakespeare: enough structure that a tiny model's loss falls."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["ROMEO", "JULIET", "KING"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + ".\n")
    return "\n".join(lines)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def tiny_config(tmp_path: Path, source: Path, *overrides: str) -> Config:
    """A 2-layer model with a 16-token context, 20 steps, evaluations every 5."""
    base = [
        f"data.source={source}",
        f"data.dir={tmp_path / 'data'}",
        f"train.out_dir={tmp_path / 'run'}",
        "model.block_size=16",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "train.batch_size=4",
        "train.max_iters=20",
        "train.eval_interval=5",
        "train.eval_iters=2",
        "train.warmup_iters=3",
        "train.device=cpu",
        "train.compile=false",
    ]
    return load_config(None, base + list(overrides))


def scaled_model(vocab_size: int = 40, block_size: int = 16, **switches: object) -> GPT:
    """A random 2-layer model in eval mode with its matrices scaled up, so its next token depends on the whole
    context (the seed is fixed)."""
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=block_size, **{**shape, **switches})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


@pytest.fixture
def prepared(tmp_path: Path, text_file: Path) -> Config:
    """A tiny config whose data is already prepared."""
    cfg = tiny_config(tmp_path, text_file)
    prepare(cfg.data, quiet=True)
    return cfg


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the JAX tests last: once JAX's runtime has started its threads, forking (as `prepare`'s workers do)
    may deadlock, and the tests of every other module fork."""
    items.sort(key=lambda item: item.path.name == "test_jax.py")
