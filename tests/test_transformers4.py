"""Exports load the same under transformers 4.x (the versions vLLM and TGI releases pin) as under 5.x.

`make test` makes a second environment, .venv-tf4, with transformers 4.57; each export is loaded there in a
subprocess with `AutoModelForCausalLM` and `AutoTokenizer`, and its logits and token ids come back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_config

from gptlab.cli import main
from gptlab.data.shards import prepare
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TF4_PYTHON = ROOT / ".venv-tf4" / "bin" / "python"
TEXT = "ROMEO:\nthe king, é"

# run under transformers 4.x: load the folder, score the ids, round-trip the text, generate; warnings are caught
LOAD = r"""
import io, json, logging, sys, warnings
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], sys.argv[2]
log = io.StringIO()
handler = logging.StreamHandler(log)
transformers.logging.get_logger().addHandler(handler)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(**tok(text, return_tensors="pt"), max_new_tokens=5, do_sample=False)
print(json.dumps({
    "version": transformers.__version__, "tokenizer": type(tok).__name__, "ids": ids, "decoded": tok.decode(ids),
    "logits": logits.tolist(), "rope_theta": getattr(model.config, "rope_theta", None),
    "generated": out[0, len(ids):].tolist(), "eos": tok.eos_token, "class": type(model).__name__,
    "warnings": [str(w.message) for w in caught] + [line for line in log.getvalue().splitlines() if line],
}))
"""


def load_in(python: Path | str, folder: Path, text: str) -> dict:
    """What the transformers of an environment makes of an exported folder (see LOAD)."""
    done = subprocess.run([str(python), "-c", LOAD, str(folder), text], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def trained_run(tmp_path: Path, *switches: str) -> Path:
    """A run of gptlab's, trained a few steps on text with a non-ASCII character."""
    (tmp_path / "corpus.txt").write_text(make_text() + "\nJULIET:\nthe king, é.\n")
    cfg = tiny_config(tmp_path, tmp_path / "corpus.txt", *switches, "model.block_size=64")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    return Path(cfg.train.out_dir)


def imported_llama_run(tmp_path: Path) -> Path:
    """A run imported from a Llama with rope_theta 500000 (as Llama 3's) and weights large enough that the
    rotary base changes its logits a lot."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptlab.interop.hf import hf_tokenizer
    from gptlab.tokenizers import Tokenizer

    tokenizer = Tokenizer.train("bpe", [make_text(100) + "é"], 300)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=500000.0))  # fmt: skip
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4 if p.dim() == 2 else 1)
    hf.save_pretrained(tmp_path / "llama")
    hf_tokenizer(tokenizer).save_pretrained(tmp_path / "llama")
    assert main(["import", "hf", str(tmp_path / "llama"), str(tmp_path / "run")]) == 0
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("block", ["modern-theta500k-bpe", "gpt2-char", "modern-relu2-char"])
def test_exports_load_in_transformers_4_with_equal_logits_and_tokens(block, tmp_path):
    if block == "modern-theta500k-bpe":
        run = imported_llama_run(tmp_path)
    else:  # relu2: exported as ArceeForCausalLM
        run = trained_run(tmp_path, "model.arch=gpt2" if block == "gpt2-char" else "model.mlp=relu2")
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    _, model, tokenizer = load_run(run)
    if not TF4_PYTHON.is_file():  # `make test` makes it; only an explicit opt-out skips the check
        if os.environ.get("GPTLAB_SKIP_TF4") == "1":
            pytest.skip("GPTLAB_SKIP_TF4=1")
        pytest.fail(
            "no .venv-tf4: run `make test` (it makes transformers 4.57 beside torch 2.13), or GPTLAB_SKIP_TF4=1"
        )
    theirs = load_in(TF4_PYTHON, tmp_path / "hf", TEXT)
    assert theirs["version"].startswith("4.57.")
    assert theirs["class"] == {"gpt2-char": "GPT2LMHeadModel", "modern-relu2-char": "ArceeForCausalLM"}.get(
        block, "LlamaForCausalLM"
    )
    assert theirs["ids"] == tokenizer.encode(TEXT) and theirs["decoded"] == TEXT
    assert theirs["tokenizer"] == "PreTrainedTokenizerFast" and theirs["eos"] == "<|endoftext|>"
    ids = torch.tensor([theirs["ids"]])
    with torch.no_grad():
        ours = model(ids)[0]
    assert torch.allclose(torch.tensor(theirs["logits"]), ours, atol=1e-4, rtol=0)
    assert theirs["warnings"] == []  # loading and generate(**tokenizer(text)) warn about nothing
    if block == "modern-theta500k-bpe":  # the flat rope_theta is what 4.x reads: 10000 would give other logits
        assert theirs["rope_theta"] == 500000.0
        wrong = type(model)(replace(model.cfg, rope_theta=10000.0)).eval()
        wrong.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (wrong(ids)[0] - ours).abs().max() > 1e-2  # 100x the tolerance above
    # and transformers 5 (this environment) reads the same folder alike, without a warning either
    again = load_in(sys.executable, tmp_path / "hf", TEXT)
    assert again["version"].startswith("5.") and again["ids"] == theirs["ids"] and again["decoded"] == TEXT
    assert torch.allclose(torch.tensor(again["logits"]), ours, atol=1e-5, rtol=0)
    assert again["warnings"] == [] and again["generated"] == theirs["generated"]
