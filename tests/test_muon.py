"""gptlab's Muon (train/muon.py): torch.optim.Muon's updates, in the precision the device runs fastest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from gptlab.config import TrainConfig, load_config
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.train.muon import Muon, muon_dtype, native_bf16
from gptlab.train.optim import build_optimizers
from gptlab.train.trainer import Trainer

# tall, wide and square matrices, two of one shape (orthogonalised as one batch)
SHAPES = [(96, 32), (32, 96), (48, 48), (48, 48)]


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in SHAPES]


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int = 3) -> list[torch.Tensor]:
    """The parameters' changes over n steps of fixed gradients."""
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.01
        opt.step()
    return [p.detach() - b for p, b in zip(params, before)]


def _changes(make) -> list[torch.Tensor]:
    """The changes `make(params)`'s optimizer makes to fresh parameters."""
    params = _params()
    return _steps(make(params), params)


def _torch_s() -> list[torch.Tensor]:
    return _changes(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1))


def test_in_bf16_the_updates_are_torch_s():
    ours = _changes(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16))
    for a, b in zip(ours, _torch_s()):
        # an update is lr * scale * O with |O| < 1.5, computed in bf16 (8 bits): batching changes the rounding only
        assert (a - b).abs().max() < 0.02 * 1.8 * 1.5 * 2**-7
        assert (a - b).norm() / b.norm() < 0.01


def test_in_fp32_the_updates_agree_within_the_iteration_s_tolerance():
    ours = _changes(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32))
    for a, b in zip(ours, _torch_s()):
        # Newton-Schulz stops short of orthogonal (singular values ~0.7-1.2): bf16 moves them by about 1%
        assert (a - b).norm() / b.norm() < 0.03
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_the_state_moves_between_torch_s_muon_and_gptlab_s():
    params = _params()
    ours = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    _steps(ours, params, n=2)
    theirs = torch.optim.Muon(params, lr=0.02, weight_decay=0.1)
    theirs.load_state_dict(ours.state_dict())
    back = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    back.load_state_dict(theirs.state_dict())
    for p in params:
        assert torch.equal(back.state[p]["momentum_buffer"], ours.state[p]["momentum_buffer"])
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86 flags name native bf16")
def test_auto_takes_bf16_only_where_the_cpu_has_native_bf16_matmuls():
    flags = _cpu_flags()
    native = bool({"avx512_bf16", "amx_bf16"} & flags) and "avx512bw" in flags
    assert native_bf16(torch.device("cpu")) is native
    assert muon_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    # a CPU limited to AVX2, as most laptops and AMD before Zen 4 are (oneDNN told so by its own setting)
    code = "import torch; from gptlab.train.muon import muon_dtype; print(muon_dtype('auto', torch.device('cpu')))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch.float32"


def test_the_setting_picks_the_precision():
    model = GPT(
        load_config(None, ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.vocab_size=11"]).model
    )
    for precision, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        cfg = TrainConfig(optimizer="muon", muon_precision=precision)
        muon = build_optimizers(model, cfg, torch.device("cpu"))[0]
        assert isinstance(muon, Muon) and muon.ns_dtype == dtype
    with pytest.raises(GptlabError) as e:
        load_config(None, ["train.muon_precision=fp32"])
    assert str(e.value) == "train.muon_precision has no option 'fp32' (valid: auto, float32, bfloat16)"


def test_a_run_records_the_precision_its_muon_took(tmp_path, text_file):
    cfg = tiny_config(tmp_path, text_file, "train.optimizer=muon", "train.max_iters=2", "train.muon_precision=float32")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    session = json.loads((Path(cfg.train.out_dir) / "run.json").read_text())["sessions"][0]
    assert session["muon_precision"] == "float32"
