"""nanoGPT checkpoints and data folders into gptlab, so nanoGPT users migrate without retraining.

`ckpt.pt` is read with `torch.load(weights_only=True)`, which admits tensors and plain containers only, and
`meta.pkl` with an unpickler that admits no global at all: whatever else they hold is refused, never built. A
checkpoint becomes a run directory (the GPT-2 block with nanoGPT's exact GELU), a data folder (`train.bin`,
`val.bin`, `meta.pkl`) a prepared data folder that `gptlab train` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop.hf import load_all
from gptlab.interop.runs import building, write_run
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer

NAMES = {  # gptlab module -> nanoGPT module, inside blocks.i / transformer.h.i (c_attn is split into q, k, v)
    "norm1": "ln_1", "attn.out": "attn.c_proj", "norm2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.down": "mlp.c_proj",
}  # fmt: skip
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
MASK = re.compile(r"transformer\.h\.\d+\.attn\.bias")  # the causal mask of nanoGPT's non-flash attention
GPT2_VOCAB = 50257
COPY_BYTES = 1 << 24  # even, so a block never splits a uint16 id
CKPT_FIX = "give the ckpt.pt that nanoGPT's train.py wrote"
DATA_FIX = "give a nanoGPT data folder as its prepare.py writes it (train.bin, val.bin, meta.pkl for char data)"


# ----- checkpoints ------------------------------------------------------------------------------------------------
def load_nanogpt_checkpoint(path: str | Path) -> dict[str, Any]:
    """nanoGPT's checkpoint dict, unpickled admitting only tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"no checkpoint '{path}'", CKPT_FIX)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # torch's restricted unpickler
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:
            raise GptlabError(f"'{path}' is not a readable torch checkpoint", CKPT_FIX) from e
        raise GptlabError(
            f"'{path}' holds {refused[1]}, which is neither a tensor nor a plain container (refused, not loaded)",
            "save checkpoints holding only tensors and plain values, as nanoGPT's train.py does",
        ) from e
    except Exception as e:  # torch raises KeyError, EOFError, RuntimeError... on files that are not checkpoints
        raise GptlabError(f"'{path}' is not a readable torch checkpoint", CKPT_FIX) from e
    if not (
        isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("model_args"), dict)
    ):
        raise GptlabError(f"'{path}' is not a nanoGPT checkpoint (no 'model' and 'model_args')", CKPT_FIX)
    return ckpt


def model_config_of(model_args: dict[str, Any]) -> ModelConfig:
    """The gptlab config of nanoGPT's GPT: the GPT-2 block with exact GELU, LayerNorm eps 1e-5, a tied head."""
    missing = [k for k in MODEL_ARGS if k not in model_args]
    if missing:
        raise GptlabError(f"the checkpoint's model_args lack {', '.join(missing)}", CKPT_FIX)
    bad = [k for k in MODEL_ARGS if type(model_args[k]) is not (bool if k == "bias" else int)]
    if bad:
        shown = ", ".join(f"{k}={model_args[k]!r}" for k in bad)
        raise GptlabError(f"the checkpoint's model_args have values of the wrong type: {shown}", CKPT_FIX)
    return ModelConfig(
        arch="gpt2", mlp="gelu_exact", bias=model_args["bias"], tie_embeddings=True, norm_eps=1e-5, dropout=0.0,
        **{k: model_args[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")},
    ).resolved()  # fmt: skip


def from_nanogpt(state_dict: dict[str, torch.Tensor], model_args: dict[str, Any]) -> GPT:
    """A gptlab model holding nanoGPT's weights (fp32, eval mode); names and shapes are checked."""
    cfg = model_config_of(model_args)
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # torch.compile's wrapper prefix
    sd = {k: v for k, v in sd.items() if not MASK.fullmatch(k)}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GptlabError("the checkpoint's model holds values that are not tensors", CKPT_FIX)
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, sd.get("transformer.wte.weight", head)):
        raise GptlabError("the checkpoint's lm_head.weight differs from transformer.wte.weight", "nanoGPT ties them")
    try:
        tensors = _from_nanogpt(sd, cfg)  # pops what it maps, so what is left is unexpected
    except KeyError as e:
        raise GptlabError(f"the checkpoint has no tensor {e} that model_args {_args(cfg)} imply", CKPT_FIX) from e
    if sd:
        raise GptlabError(
            f"the checkpoint has tensors model_args {_args(cfg)} do not imply: {sorted(sd)[:3]}", CKPT_FIX
        )
    model = GPT(cfg)
    want = model.state_dict()
    for name, t in tensors.items():
        if t.shape != want[name].shape:
            shapes = f"shape {tuple(t.shape)}, not {tuple(want[name].shape)}"
            raise GptlabError(f"the tensor for gptlab's {name} has {shapes} as model_args {_args(cfg)} imply", CKPT_FIX)
    load_all(model, tensors, cfg.tie_embeddings)
    return model.eval()


def _args(cfg: ModelConfig) -> str:
    return f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, bias={cfg.bias}, vocab_size={cfg.vocab_size})"


def _from_nanogpt(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gptlab's names for nanoGPT's tensors; both use nn.Linear's (out, in) layout, so nothing is transposed."""
    params = ("weight", "bias") if cfg.bias else ("weight",)
    out = {"tok_emb.weight": sd.pop("transformer.wte.weight"), "pos_emb.weight": sd.pop("transformer.wpe.weight")}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for p in params:
            for ours, theirs in NAMES.items():
                out[f"{b}{ours}.{p}"] = sd.pop(f"{h}{theirs}.{p}")
            for x, part in zip("qkv", sd.pop(f"{h}attn.c_attn.{p}").chunk(3)):  # q, k, v stacked along dim 0
                out[f"{b}attn.{x}.{p}"] = part
    for p in params:
        out[f"norm_f.{p}"] = sd.pop(f"transformer.ln_f.{p}")
    return {k: v.float().contiguous() for k, v in out.items()}


# ----- tokenizers -------------------------------------------------------------------------------------------------
class _Refused(pickle.UnpicklingError):
    """A global `_NoGlobals` refused; the message names it."""


class _NoGlobals(pickle.Unpickler):
    """Builds dicts, lists, strings and numbers only: any class or function is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")


def read_meta_pkl(path: str | Path) -> dict[str, int]:
    """The character -> id map of a nanoGPT char dataset's meta.pkl, checked against its itos and vocab_size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = _NoGlobals(f).load()
    except _Refused as e:
        raise GptlabError(
            f"'{path}' holds {e}, which is not a plain value (refused, not loaded)",
            "meta.pkl may hold only vocab_size, itos and stoi as plain dicts, strings and numbers",
        ) from e
    except Exception as e:  # a damaged pickle raises UnpicklingError, EOFError, ValueError...
        raise GptlabError(f"'{path}' is not a readable pickle ({type(e).__name__})", DATA_FIX) from e
    stoi = meta.get("stoi") if isinstance(meta, dict) else None
    ok = (
        isinstance(stoi, dict)
        and all(isinstance(c, str) and len(c) == 1 and type(i) is int for c, i in stoi.items())
        and sorted(stoi.values()) == list(range(len(stoi)))
        and meta.get("vocab_size") == len(stoi) > 0
        and meta.get("itos") == {i: c for c, i in stoi.items()}  # what nanoGPT decodes with
    )
    if not ok:
        raise GptlabError(
            f"'{path}' is not a nanoGPT char meta.pkl",
            "it needs vocab_size, stoi mapping single characters to ids 0..vocab_size-1, and itos its inverse",
        )
    return stoi


def char_tokenizer(stoi: dict[str, int]) -> Tokenizer:
    """A char tokenizer with exactly these ids (gptlab's char kind: a BPE with no merges, nothing else)."""
    hf = HFTokenizer(models.BPE(vocab=stoi, merges=[]))
    hf.decoder = decoders.Fuse()
    return Tokenizer(hf)


def nanogpt_tokenizer(data_dir: Path | None) -> Tokenizer:
    """meta.pkl's characters when the data folder has one, else GPT-2's BPE, as nanoGPT assumes."""
    if data_dir is not None and (data_dir / "meta.pkl").is_file():
        return char_tokenizer(read_meta_pkl(data_dir / "meta.pkl"))
    return Tokenizer.gpt2()


# ----- run directories and data folders -------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool, marker: str, kind: str, *sources: Path) -> None:
    """Refuse a file, or a folder with files unless --overwrite replaces an earlier `kind` (one holding `marker`)."""
    if out.exists() and not out.is_dir():
        raise GptlabError(f"'{out}' is a file", f"give a folder for the {kind}")
    for source in sources:  # replacing `out` would delete them
        if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
            raise GptlabError(f"'{out}' holds the nanoGPT files to import", f"give another folder for the {kind}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GptlabError(f"'{out}' is not empty", "give a new folder, or pass --overwrite")
        if not (out / marker).is_file():  # --overwrite replaces what gptlab wrote, not any folder
            raise GptlabError(f"'{out}' holds files but is not a {kind}", "give a new or empty folder")


def _number(x: Any) -> int | float | None:
    """A plain number of a checkpoint field (nanoGPT keeps best_val_loss as a 0-d tensor), else None."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def import_nanogpt(
    ckpt: str | Path, out_dir: str | Path, data_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """A run directory (config, tokenizer, one checkpoint) from nanoGPT's ckpt.pt and, for char data, its meta.pkl."""
    ckpt, out = Path(ckpt), Path(out_dir)
    data = Path(data_dir) if data_dir is not None else None
    _check_out(out, overwrite, "config.yaml", "run directory", ckpt, *([data] if data is not None else []))
    if data is not None and not data.is_dir():
        raise GptlabError(f"no data folder '{data}'", "give --data the nanoGPT data folder the model was trained on")
    checkpoint = load_nanogpt_checkpoint(ckpt)
    model = from_nanogpt(checkpoint["model"], checkpoint["model_args"])
    vocab = model.cfg.vocab_size
    char = data is not None and (data / "meta.pkl").is_file()
    if not char and vocab < GPT2_VOCAB:  # told before GPT-2's BPE is fetched: it may need the network
        raise GptlabError(
            f"the checkpoint's model has {vocab} token ids, fewer than GPT-2's {GPT2_VOCAB}, and no meta.pkl was given",
            "pass --data the nanoGPT data folder (with meta.pkl) the model was trained on",
        )
    tokenizer = nanogpt_tokenizer(data)
    if (tokenizer.vocab_size != vocab) if char else (tokenizer.vocab_size > vocab):  # GPT-2's may be padded
        raise GptlabError(
            f"the checkpoint's model has {vocab} token ids, the tokenizer of '{data}' {tokenizer.vocab_size}",
            "pass --data the nanoGPT data folder the model was trained on",
        )
    meta = {
        "imported_from": str(ckpt),
        "iter_num": _number(checkpoint.get("iter_num")),  # nanoGPT's step count; gptlab's own starts at 0
        "best_val_loss": _number(checkpoint.get("best_val_loss")),
    }
    with building(out) as tmp:  # an old run (--overwrite) goes only once the new one is whole
        write_run(tmp, model, tokenizer, out, meta=meta)
    return out


def _copy_ids(src: Path, dst: Path, vocab: int, eot: int | None, digest: Any) -> dict[str, Any]:
    """Copy a uint16 id file block by block, checking every id; its shard entry in meta.json."""
    size = src.stat().st_size
    if size % 2:
        raise GptlabError(f"'{src}' has {size:,} bytes, not a whole number of uint16 token ids", DATA_FIX)
    tokens = documents = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(COPY_BYTES):
            ids = np.frombuffer(block, dtype=np.uint16)
            top = int(ids.max())
            if top >= vocab:
                raise GptlabError(
                    f"'{src}' holds token id {top}, outside the tokenizer's {vocab} ids",
                    "convert char data with the meta.pkl it was prepared with; without one it must be GPT-2 BPE ids",
                )
            documents += int(np.count_nonzero(ids == eot)) if eot is not None else 0
            digest.update(block)
            fout.write(block)
            tokens += len(ids)
        fout.flush()
        os.fsync(fout.fileno())
    if tokens < 2:
        raise GptlabError(f"'{src}' holds {tokens} token(s)", "give data with at least 2 tokens in each split")
    # the folder is written whole, never resumed: no chunk stream to point into
    return {"file": dst.name, "tokens": tokens, "documents": documents, "next_chunk": 0, "skip": 0}


def import_nanogpt_data(data_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """A prepared data folder (tokenizer.json, one shard per split, meta.json) from nanoGPT's train.bin and val.bin."""
    from gptlab.data.batches import file_sha256
    from gptlab.data.shards import FORMAT_VERSION, SPLITS, shard_name, write_atomic

    src, out = Path(data_dir), Path(out_dir)
    if not src.is_dir():
        raise GptlabError(f"no data folder '{src}'", DATA_FIX)
    for split in SPLITS:
        if not (src / f"{split}.bin").is_file():
            raise GptlabError(f"'{src}' has no {split}.bin", DATA_FIX)
    _check_out(out, overwrite, "meta.json", "prepared data folder", src)
    tokenizer = nanogpt_tokenizer(src)
    # GPT-2 data (nanoGPT's openwebtext) ends each document with <|endoftext|>; char data marks none, so
    # documents is 0 there, as gptlab's own prepare counts it without an end-of-text token
    eot = tokenizer.eos_id
    digest = hashlib.sha256()
    with building(out) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
        shards = {
            s: [_copy_ids(src / f"{s}.bin", tmp / shard_name(s, 0), tokenizer.vocab_size, eot, digest)] for s in SPLITS
        }
        counts = {s: shards[s][0]["tokens"] for s in SPLITS}
        specials = sorted(tokenizer.special_ids, key=tokenizer.special_ids.get)
        meta = {
            "format_version": FORMAT_VERSION,
            "complete": True,
            # what decided the bytes: nanoGPT's prepare.py, with its own split of the text
            "settings": {
                "source": f"nanogpt:{src}",
                "tokenizer": tokenizer.kind,
                "special_tokens": specials,
                "split": "nanogpt",
                "val_fraction": round(counts["val"] / sum(counts.values()), 6),
                "dtype": "uint16",
            },  # fmt: skip
            "source": str(src),
            "source_description": "nanoGPT data folder: train.bin, val.bin"
            + (", meta.pkl" if tokenizer.kind == "char" else ", GPT-2 BPE (no meta.pkl)"),
            "source_fingerprint": "sha256:" + digest.hexdigest(),
            "tokenizer": tokenizer.kind,
            "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"),
            "vocab_size": tokenizer.vocab_size,
            "eot_id": eot,
            "dtype": "uint16",
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "documents": sum(shards[s][0]["documents"] for s in SPLITS),
            "shards": shards,
        }
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=2).encode())
    return out
