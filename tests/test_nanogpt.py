"""nanoGPT in: checkpoints written as nanoGPT writes them compute what nanoGPT computes, data folders train, and
pickles holding anything but tensors and plain values are refused without being run."""

import argparse
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_text, tiny_config

from gptlab.cli import main
from gptlab.data.batches import load_prepared
from gptlab.data.inspect import inspect_data
from gptlab.generate import Generator
from gptlab.interop.nanogpt import from_nanogpt
from gptlab.tokenizers import Tokenizer
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

TEXT = make_text(150)
CHARS = sorted(set(TEXT))
ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=len(CHARS), dropout=0.0)


# ----- nanoGPT's files, as its train.py and prepare.py write them ---------------------------------------------------
def nanogpt_state_dict(args: dict, mask: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under nanoGPT's names: nn.Linear (out, in) matrices, q, k, v stacked along dim 0 in c_attn."""
    g = torch.Generator().manual_seed(seed)
    C, T, V = args["n_embd"], args["block_size"], args["vocab_size"]

    def rand(*shape: int, std: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": rand(V, C, std=0.5), "transformer.wpe.weight": rand(T, C, std=0.5)}
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            sd[f"{h}{name}.weight"] = 1 + rand(C)
        for name, shape in {"attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "mlp.c_fc": (4 * C, C),
                            "mlp.c_proj": (C, 4 * C)}.items():  # fmt: skip
            sd[f"{h}{name}.weight"] = rand(*shape)
        if args["bias"]:
            for name, n in {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C,
                            "mlp.c_proj": C}.items():  # fmt: skip
                sd[f"{h}{name}.bias"] = rand(n)
        if mask:  # nanoGPT's attention without flash keeps its causal mask as a buffer named attn.bias
            sd[f"{h}attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    sd["transformer.ln_f.weight"] = 1 + rand(C)
    if args["bias"]:
        sd["transformer.ln_f.bias"] = rand(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: the state dict lists the one tensor twice
    return sd


def nanogpt_logits(sd: dict[str, torch.Tensor], args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's forward written out from its state dict: pre-norm blocks, causal attention, exact GELU, tied head."""
    C, H = args["n_embd"], args["n_head"]
    B, T = idx.shape

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (C,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        qkv = linear(ln(x, h + "ln_1"), h + "attn.c_attn")
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + linear(y, h + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["transformer.wte.weight"])


def nanogpt_greedy(sd: dict[str, torch.Tensor], args: dict, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(nanogpt_logits(sd, args, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def write_ckpt(path: Path, sd: dict[str, torch.Tensor], args: dict, compiled: bool = False, **extra: object) -> Path:
    """torch.save of the dict nanoGPT's train.py saves: model, optimizer, model_args, iter_num, best_val_loss, config."""
    params = [torch.nn.Parameter(v.clone()) for k, v in sd.items() if not k.endswith((".attn.bias", "lm_head.weight"))]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))  # fmt: skip
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    config = {"out_dir": "out-shakespeare-char", "eval_interval": 250, "dataset": "shakespeare_char",
              "batch_size": 64, "learning_rate": 1e-3, "decay_lr": True, "device": "cuda", "dtype": "bfloat16",
              "compile": compiled, "wandb_log": False, **{k: v for k, v in args.items() if k != "vocab_size"}}  # fmt: skip
    ckpt = {
        "model": {("_orig_mod." if compiled else "") + k: v for k, v in sd.items()},
        "optimizer": optimizer.state_dict(),
        "model_args": dict(args),
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
        "config": config,
        **extra,
    }
    torch.save(ckpt, path)
    return path


def write_data(folder: Path, text: str = TEXT) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """nanoGPT's shakespeare_char prepare.py: sorted characters, the first 90% to train.bin, uint16, meta.pkl."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return stoi, ids[:n], ids[n:]


def os_system_pickle(command: str) -> bytes:
    """A pickle that runs `command` through os.system when loaded by a plain unpickler (written by hand, protocol 0)."""
    return b"cos\nsystem\n(V" + command.encode() + b"\ntR."


# ----- (1) the same logits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias, mask, compiled", [(True, True, False), (False, False, True)])
def test_nanogpt_checkpoint_gives_nanogpts_logits(tmp_path, capsys, bias, mask, compiled):
    args = {**ARGS, "bias": bias}
    sd = nanogpt_state_dict(args, mask=mask)
    x = torch.randint(0, args["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(1))
    want = nanogpt_logits(sd, args, x)
    with torch.no_grad():
        assert torch.allclose(from_nanogpt(sd, args)(x), want, atol=1e-5, rtol=0)

    stoi, _, _ = write_data(tmp_path / "shakespeare_char")
    ckpt = write_ckpt(tmp_path / "ckpt.pt", sd, args, compiled=compiled)
    run = tmp_path / "run"
    assert main(["import", "nanogpt", str(ckpt), str(run), "--data", str(tmp_path / "shakespeare_char")]) == 0
    assert capsys.readouterr().out == f"imported {ckpt} into {run} (gptlab sample {run})\n"
    cfg, model, tokenizer = load_run(run)
    m = cfg.model
    assert (m.arch, m.mlp, m.bias, m.tie_embeddings, m.dropout) == ("gpt2", "gelu_exact", bias, True, 0.0)
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (2, 2, 32, 32, len(CHARS))
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5, rtol=0)
    prompt = tokenizer.encode("KING:\n")
    assert prompt == [stoi[c] for c in "KING:\n"]
    assert Generator(model).generate([prompt], 8, temperature=0)[0] == nanogpt_greedy(sd, args, prompt, 8)
    meta = json.loads((run / "checkpoints" / "step_0" / "meta.json").read_text())
    assert meta["iter_num"] == 250 and meta["best_val_loss"] == pytest.approx(1.4697)
    assert meta["imported_from"] == str(ckpt)


def test_gpt2_tokenizer_when_there_is_no_meta_pkl(tmp_path, monkeypatch):
    """Without meta.pkl nanoGPT means GPT-2's BPE (a stand-in here: GPT-2's files may need the network)."""
    stand_in = Tokenizer.train("bpe", [TEXT], 300)  # byte-level BPE with <|endoftext|>, as GPT-2's
    monkeypatch.setattr(Tokenizer, "gpt2", classmethod(lambda cls, *a, **k: stand_in))
    args = {**ARGS, "vocab_size": 50304}  # nanoGPT pads GPT-2's 50257 ids to a multiple of 64
    sd = nanogpt_state_dict(args, mask=False)
    assert main(["import", "nanogpt", str(write_ckpt(tmp_path / "ckpt.pt", sd, args)), str(tmp_path / "run")]) == 0
    cfg, model, tokenizer = load_run(tmp_path / "run")
    assert cfg.model.vocab_size == 50304 and tokenizer.fingerprint() == stand_in.fingerprint()
    assert cfg.data.special_tokens == ["<|endoftext|>"]
    x = torch.tensor([tokenizer.encode("the king")])
    with torch.no_grad():
        assert torch.allclose(model(x), nanogpt_logits(sd, args, x), atol=1e-5, rtol=0)

    data = tmp_path / "owt"  # GPT-2 data: each document ends with <|endoftext|>
    data.mkdir()
    eot = stand_in.eos_id
    docs = [stand_in.encode(t) + [eot] for t in ("the king.", "good night, sweet queen.", "love")]
    np.array(docs[0] + docs[1], dtype=np.uint16).tofile(data / "train.bin")
    np.array(docs[2], dtype=np.uint16).tofile(data / "val.bin")
    assert main(["import", "nanogpt-data", str(data), str(tmp_path / "data")]) == 0
    prepared = load_prepared(tmp_path / "data")
    assert prepared.meta["eot_id"] == eot and prepared.meta["documents"] == 3
    assert prepared.meta["tokenizer"] == "bpe" and prepared.meta["vocab_size"] == stand_in.vocab_size
    assert prepared.train[0].tolist() == docs[0] + docs[1]


# ----- (2) refused pickles ----------------------------------------------------------------------------------------
class RunsACommand:
    """An object whose unpickling runs a shell command, as a malicious checkpoint would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def test_checkpoints_holding_objects_are_refused(tmp_path, capsys):
    sd = nanogpt_state_dict(ARGS)
    write_data(tmp_path / "data")
    ckpt = write_ckpt(tmp_path / "ckpt.pt", sd, ARGS, config=argparse.Namespace(lr=1e-3))
    run = tmp_path / "run"
    assert main(["import", "nanogpt", str(ckpt), str(run), "--data", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err == (
        f"error: '{ckpt}' holds argparse.Namespace, which is neither a tensor nor a plain container (refused, not "
        "loaded) (save checkpoints holding only tensors and plain values, as nanoGPT's train.py does)\n"
    )
    marker = tmp_path / "ran"
    ckpt = write_ckpt(tmp_path / "evil.pt", sd, ARGS, iter_num=RunsACommand(f"touch {marker}"))
    assert main(["import", "nanogpt", str(ckpt), str(run), "--data", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err == (
        f"error: '{ckpt}' holds {os.system.__module__}.system, which is neither a tensor nor a plain container "
        "(refused, not loaded) (save checkpoints holding only tensors and plain values, as nanoGPT's train.py does)\n"
    )
    assert not marker.exists() and not run.exists()


def test_meta_pkl_holding_objects_is_refused_and_not_run(tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data)
    control = tmp_path / "control"
    pickle.loads(os_system_pickle(f"touch {control}"))  # the payload is live: a plain unpickler runs it
    assert control.exists()
    marker = tmp_path / "ran"
    (data / "meta.pkl").write_bytes(os_system_pickle(f"touch {marker}"))
    assert main(["import", "nanogpt-data", str(data), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: '{data / 'meta.pkl'}' holds os.system, which is not a plain value (refused, not loaded) "
        "(meta.pkl may hold only vocab_size, itos and stoi as plain dicts, strings and numbers)\n"
    )
    ckpt = write_ckpt(tmp_path / "ckpt.pt", nanogpt_state_dict(ARGS), ARGS)
    assert main(["import", "nanogpt", str(ckpt), str(tmp_path / "run"), "--data", str(data)]) == 2
    assert "holds os.system, which is not a plain value" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


# ----- (3) data folders -------------------------------------------------------------------------------------------
def test_char_data_folder_converts_and_trains(tmp_path, capsys):
    src, out = tmp_path / "shakespeare_char", tmp_path / "data"
    stoi, train, val = write_data(src)
    assert main(["import", "nanogpt-data", str(src), str(out)]) == 0
    assert capsys.readouterr().out == f"converted {src} into {out} (train on it with data.dir={out})\n"
    prepared = load_prepared(out)
    assert np.array_equal(prepared.train[0], train) and np.array_equal(prepared.val[0], val)
    meta = prepared.meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("char", len(stoi), None, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"], meta["documents"]) == (len(train), len(val), 0)
    tokenizer = prepared.tokenizer()
    assert tokenizer.kind == "char" and tokenizer.hf.get_vocab() == stoi
    assert tokenizer.encode(TEXT) == [stoi[c] for c in TEXT] and tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert "split: nanogpt (val fraction 0.1" in inspect_data(out, windows=1)

    cfg = tiny_config(tmp_path, src / "train.bin", f"data.dir={out}", "model.arch=gpt2", "model.mlp=gelu_exact",
                      "train.max_iters=3", "train.eval_interval=3")  # fmt: skip
    trainer = Trainer(cfg, quiet=True).fit()
    assert trainer.step == 3 and math.isfinite(trainer.history[-1]["val_loss"])
    # a model imported with the same meta.pkl has the data's very tokenizer, so it can train on it
    ckpt = write_ckpt(tmp_path / "ckpt.pt", nanogpt_state_dict(ARGS), ARGS)
    assert main(["import", "nanogpt", str(ckpt), str(tmp_path / "imported"), "--data", str(src)]) == 0
    assert (tmp_path / "imported" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_overwrite_replaces_earlier_imports(tmp_path):
    src = tmp_path / "src"
    write_data(src)
    assert main(["import", "nanogpt-data", str(src), str(tmp_path / "data")]) == 0
    write_data(src, TEXT[:-100])
    assert main(["import", "nanogpt-data", str(src), str(tmp_path / "data"), "--overwrite"]) == 0
    assert load_prepared(tmp_path / "data").meta["val_tokens"] == len(TEXT[:-100]) - int(len(TEXT[:-100]) * 0.9)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", nanogpt_state_dict(ARGS), ARGS)
    assert main(["import", "nanogpt", str(ckpt), str(tmp_path / "run"), "--data", str(src)]) == 0
    sd = nanogpt_state_dict({**ARGS, "bias": False}, seed=5)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", sd, {**ARGS, "bias": False})
    assert main(["import", "nanogpt", str(ckpt), str(tmp_path / "run"), "--data", str(src), "--overwrite"]) == 0
    cfg, model, _ = load_run(tmp_path / "run")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert not cfg.model.bias and torch.allclose(model(x), nanogpt_logits(sd, ARGS, x), atol=1e-5)


# ----- (4) user errors --------------------------------------------------------------------------------------------
def run_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    return captured.err


def test_checkpoint_errors(tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data)
    run = str(tmp_path / "run")
    fix = "(give the ckpt.pt that nanoGPT's train.py wrote)"
    missing = tmp_path / "nope.pt"
    assert run_error(capsys, "import", "nanogpt", str(missing), run) == f"error: no checkpoint '{missing}' {fix}\n"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert run_error(capsys, "import", "nanogpt", str(garbage), run) == (
        f"error: '{garbage}' is not a readable torch checkpoint {fix}\n"
    )
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    assert run_error(capsys, "import", "nanogpt", str(other), run) == (
        f"error: '{other}' is not a nanoGPT checkpoint (no 'model' and 'model_args') {fix}\n"
    )
    sd = nanogpt_state_dict(ARGS)
    no_args = {k: v for k, v in ARGS.items() if k != "n_head"}
    bad = write_ckpt(tmp_path / "bad.pt", sd, ARGS, model_args=no_args)
    assert run_error(capsys, "import", "nanogpt", str(bad), run) == (
        f"error: the checkpoint's model_args lack n_head {fix}\n"
    )
    V = len(CHARS)
    shape = f"(n_layer=2, n_embd=32, bias=True, vocab_size={V})"
    cut = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    bad = write_ckpt(tmp_path / "bad.pt", cut, ARGS)
    assert run_error(capsys, "import", "nanogpt", str(bad), run) == (
        f"error: the checkpoint has no tensor 'transformer.h.1.mlp.c_fc.bias' that model_args {shape} imply {fix}\n"
    )
    bad = write_ckpt(tmp_path / "bad.pt", sd, {**ARGS, "bias": False})  # biases the args deny
    assert run_error(capsys, "import", "nanogpt", str(bad), run) == (
        f"error: the checkpoint has tensors model_args (n_layer=2, n_embd=32, bias=False, vocab_size={V}) do not "
        f"imply: ['transformer.h.0.attn.c_attn.bias', 'transformer.h.0.attn.c_proj.bias', 'transformer.h.0.ln_1.bias'] {fix}\n"
    )
    bad = write_ckpt(tmp_path / "bad.pt", {**sd, "transformer.wpe.weight": torch.zeros(16, 32)}, ARGS)
    assert run_error(capsys, "import", "nanogpt", str(bad), run) == (
        f"error: the tensor for gptlab's pos_emb.weight has shape (16, 32), not (32, 32) as model_args {shape} "
        f"imply {fix}\n"
    )
    bad = write_ckpt(tmp_path / "bad.pt", {**sd, "lm_head.weight": torch.zeros(V, 32)}, ARGS)
    assert run_error(capsys, "import", "nanogpt", str(bad), run) == (
        "error: the checkpoint's lm_head.weight differs from transformer.wte.weight (nanoGPT ties them)\n"
    )
    good = write_ckpt(tmp_path / "ckpt.pt", sd, ARGS)
    assert run_error(capsys, "import", "nanogpt", str(good), run) == (
        f"error: the checkpoint's model has {V} token ids, fewer than GPT-2's 50257, and no meta.pkl was given "
        "(pass --data the nanoGPT data folder (with meta.pkl) the model was trained on)\n"
    )
    other_data = tmp_path / "other_data"
    write_data(other_data, "abc" * 50)
    assert run_error(capsys, "import", "nanogpt", str(good), run, "--data", str(other_data)) == (
        f"error: the checkpoint's model has {V} token ids, the tokenizer of '{other_data}' 3 "
        "(pass --data the nanoGPT data folder the model was trained on)\n"
    )
    assert run_error(capsys, "import", "nanogpt", str(good), run, "--data", str(tmp_path / "none")) == (
        f"error: no data folder '{tmp_path / 'none'}' (give --data the nanoGPT data folder the model was trained on)\n"
    )
    assert not (tmp_path / "run").exists()


def test_output_folder_errors(tmp_path, capsys):
    src = tmp_path / "src"
    write_data(src)
    ckpt = str(write_ckpt(src / "ckpt.pt", nanogpt_state_dict(ARGS), ARGS))
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    for kind, args, what in (
        ("nanogpt", [ckpt], "run directory"),
        ("nanogpt-data", [str(src)], "prepared data folder"),
    ):
        extra = ["--data", str(src)] if kind == "nanogpt" else []
        assert run_error(capsys, "import", kind, *args, str(full), *extra) == (
            f"error: '{full}' is not empty (give a new folder, or pass --overwrite)\n"
        )
        assert run_error(capsys, "import", kind, *args, str(full), *extra, "--overwrite") == (
            f"error: '{full}' holds files but is not a {what} (give a new or empty folder)\n"
        )
        assert run_error(capsys, "import", kind, *args, str(full / "notes.txt"), *extra) == (
            f"error: '{full / 'notes.txt'}' is a file (give a folder for the {what})\n"
        )
        assert run_error(capsys, "import", kind, *args, str(src), *extra, "--overwrite") == (
            f"error: '{src}' holds the nanoGPT files to import (give another folder for the {what})\n"
        )
    assert (full / "notes.txt").read_text() == "keep me" and sorted(p.name for p in src.iterdir()) == [
        "ckpt.pt", "meta.pkl", "train.bin", "val.bin",
    ]  # fmt: skip


def test_data_folder_errors(tmp_path, capsys):
    src, out = tmp_path / "src", str(tmp_path / "out")
    fix = "(give a nanoGPT data folder as its prepare.py writes it (train.bin, val.bin, meta.pkl for char data))"
    assert run_error(capsys, "import", "nanogpt-data", str(src), out) == f"error: no data folder '{src}' {fix}\n"
    stoi, train, _ = write_data(src)
    (src / "val.bin").unlink()
    assert run_error(capsys, "import", "nanogpt-data", str(src), out) == f"error: '{src}' has no val.bin {fix}\n"
    (src / "val.bin").write_bytes(b"\x01\x00\x02")
    assert run_error(capsys, "import", "nanogpt-data", str(src), out) == (
        f"error: '{src / 'val.bin'}' has 3 bytes, not a whole number of uint16 token ids {fix}\n"
    )
    (src / "val.bin").write_bytes(b"\x01\x00")
    assert run_error(capsys, "import", "nanogpt-data", str(src), out) == (
        f"error: '{src / 'val.bin'}' holds 1 token(s) (give data with at least 2 tokens in each split)\n"
    )
    np.array([1, 2, len(stoi)], dtype=np.uint16).tofile(src / "val.bin")
    assert run_error(capsys, "import", "nanogpt-data", str(src), out) == (
        f"error: '{src / 'val.bin'}' holds token id {len(stoi)}, outside the tokenizer's {len(stoi)} ids "
        "(convert char data with the meta.pkl it was prepared with; without one it must be GPT-2 BPE ids)\n"
    )
    np.array([1, 2], dtype=np.uint16).tofile(src / "val.bin")
    char_fix = "(it needs vocab_size, stoi mapping single characters to ids 0..vocab_size-1, and itos its inverse)"
    itos = {i: c for c, i in stoi.items()}
    for meta in ({"vocab_size": len(stoi), "stoi": stoi},  # no itos
                 {"vocab_size": len(stoi), "stoi": stoi, "itos": {**itos, 0: "x"}},  # itos disagrees
                 {"vocab_size": 2, "stoi": {"ab": 0, "c": 1}, "itos": {0: "ab", 1: "c"}},  # not characters
                 {"vocab_size": len(stoi) + 1, "stoi": stoi, "itos": itos}, [1, 2]):  # fmt: skip
        (src / "meta.pkl").write_bytes(pickle.dumps(meta))
        assert run_error(capsys, "import", "nanogpt-data", str(src), out) == (
            f"error: '{src / 'meta.pkl'}' is not a nanoGPT char meta.pkl {char_fix}\n"
        )
    (src / "meta.pkl").write_bytes(b"\x80\x04garbage")
    assert run_error(capsys, "import", "nanogpt-data", str(src), out).startswith(
        f"error: '{src / 'meta.pkl'}' is not a readable pickle ("
    )
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
