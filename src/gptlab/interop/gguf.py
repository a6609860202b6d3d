"""Runs out to llama.cpp, Ollama and LM Studio: `export_gguf` writes a run as a GGUF file (with the `gguf` package,
llama.cpp's own writer) and an Ollama Modelfile.

The GPT-2 block becomes llama.cpp's `gpt2` architecture and the modern block its `llama` architecture (`arcee` with
`model.mlp=relu2`: Llama's block with a relu(x)^2 MLP without a gate), whose rotary
positions pair neighbouring dimensions (GGML's layout), where gptlab pairs dimension j with j + head_dim/2 (HF
Llama's rotate-half): the rows of q and k are permuted as llama.cpp's own `convert_hf_to_gguf.py` does for Llama.
Tokenizers are written as llama.cpp's byte-level BPE ("gpt2" model, GPT-2's split): gpt2 and bpe as they are, a
char vocabulary as a BPE over the UTF-8 bytes of its characters, with merges that join each character's bytes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.chat import end_of_turn, end_token_ids, load_chat_template
from gptlab.config import ModelConfig, SampleConfig
from gptlab.errors import GptlabError
from gptlab.interop.names import GPT2_BLOCK, GPT2_OUTSIDE, GPT2_QKV, LLAMA_OUTSIDE, LLAMA_SWITCHES, allowed, llama_block
from gptlab.interop.runs import building, check_new_folder
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer, byte_table
from gptlab.train.checkpoint import load_run

DTYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
GPT2_SWITCHES = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}  # llama.cpp's gpt2 graph
# token types (gguf.TokenType): a vocabulary entry, a special token, an added non-special token, an unused id
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def require_gguf() -> Any:
    """The `gguf` package, or a user error saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise GptlabError(
            "writing GGUF files needs the gguf package, which is not installed", "pip install gptlab[gguf]"
        ) from e
    return gguf


def export_gguf(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best", dtype: str = "f32") -> Path:
    """Write a run as `OUT/model.gguf` (llama.cpp, LM Studio) and `OUT/Modelfile` (Ollama); returns OUT."""
    if dtype not in DTYPES:
        raise GptlabError(f"--dtype {dtype} is not a GGUF type gptlab writes", "use f32, f16 or q8_0")
    gguf = require_gguf()
    out = check_new_folder(out_dir)
    cfg, model, tokenizer = load_run(run_dir, checkpoint, "cpu")
    arch = gguf_architecture(model.cfg)
    template = load_chat_template(run_dir, tokenizer)
    ends = end_token_ids(tokenizer, template, cfg.sample.end_tokens)
    if not ends:  # llama.cpp would take its default eos, id 11, and end every generation there
        raise GptlabError(
            "the run's tokenizer has no end-of-text token, which a GGUF file needs "
            "(llama.cpp would end generation at token id 11 instead)",
            "prepare the data with a special token such as <|endoftext|> (data.special_tokens) and train again",
        )
    tokens, types, merges = gguf_vocab(tokenizer, model.cfg.vocab_size)
    eot = end_of_turn(template, tokenizer) if template is not None else None
    eot_id = tokenizer.hf.token_to_id(eot) if eot is not None else None
    tensors = gguf_tensors(model)
    with building(out) as tmp:  # a folder that is whole, or not there
        writer = gguf.GGUFWriter(tmp / GGUF_FILE, arch)
        try:
            _write_metadata(writer, gguf, model.cfg, Path(run_dir).resolve().name, dtype)
            writer.add_tokenizer_model("gpt2")  # llama.cpp's byte-level BPE
            writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, as gptlab's byte-level BPE uses
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            eos = ends[0]
            writer.add_bos_token_id(eos)  # as GPT-2: never added (add_bos_token false), only so none is guessed
            writer.add_eos_token_id(eos)
            writer.add_pad_token_id(eos)
            if eot_id is not None and eot_id != eos:
                writer.add_eot_token_id(eot_id)
            writer.add_add_bos_token(False)
            writer.add_add_eos_token(False)
            if template is not None:
                writer.add_chat_template(template.source)
            for name, array in tensors.items():
                data, qtype = _quantize(gguf, name, array, dtype)
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as e:  # numpy's `tofile` (the writer's) reports a short write without an errno
            if e.errno is None and shutil.disk_usage(tmp).free < sum(a.nbytes for a in tensors.values()):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / GGUF_FILE)) from e
            raise
        finally:
            writer.close()
        (tmp / MODELFILE).write_text(modelfile([tokenizer.decode([i]) for i in ends], model.cfg, cfg.sample), "utf-8")
    return out


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for a model with these switches ("gpt2", "llama" or "arcee"), or a user error naming
    the switch it cannot represent."""
    cfg = cfg.resolved()
    if cfg.parallel_block:
        raise GptlabError(
            "model.parallel_block=true has no llama.cpp architecture gptlab writes",
            "train with model.parallel_block=false, or export it with --format hf",
        )
    if cfg.qk_norm:
        raise GptlabError(
            "model.qk_norm=true has no form in llama.cpp's gpt2 or llama architecture",
            "train with model.qk_norm=false, or export it with --format hf",
        )
    if cfg.logit_softcap:  # llama.cpp caps logits only in its Gemma graphs, whose blocks differ from these
        raise GptlabError(
            f"model.logit_softcap={cfg.logit_softcap} has no form in llama.cpp's gpt2, llama or arcee architecture",
            "train with model.logit_softcap=0",
        )
    for switch in ("x0_lambdas", "value_embeds"):  # the speedrun's extra parameters: no llama.cpp graph reads them
        if getattr(cfg, switch):
            raise GptlabError(
                f"model.{switch}=true has no form in llama.cpp's gpt2, llama or arcee architecture",
                f"train with model.{switch}=false",
            )
    gpt2 = cfg.position == "learned"
    arch, family = ("gpt2", GPT2_SWITCHES) if gpt2 else ("arcee" if cfg.mlp == "relu2" else "llama", LLAMA_SWITCHES)
    for key, want in family.items():
        if getattr(cfg, key) not in allowed(want):
            value = getattr(cfg, key)
            if key == "mlp" and value == "gelu_exact":  # ggml's GELU is the tanh one; llama.cpp has no erf one here
                raise GptlabError(
                    "model.mlp=gelu_exact (erf GELU) has no form in llama.cpp's gpt2 architecture, whose GELU is "
                    "the tanh approximation",
                    "train with model.mlp=gelu (GPT-2's), or export it with --format hf",
                )
            raise GptlabError(
                f"model.{key}={value} has no llama.cpp architecture with model.position={cfg.position}",
                f"llama.cpp's {arch} needs model.{key}={' or '.join(allowed(want))}; export models whose switches "
                "match GPT-2 or Llama",
            )
    return arch


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows (or biases) from the rotate-half layout (dimension j pairs with j + head_dim/2) to GGML's
    (2j pairs with 2j+1): llama.cpp's own permutation for Llama checkpoints."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, fp32, in nn.Linear's (out, in) layout (GGUF's {in, out})."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.position == "learned":
        for ours, n in GPT2_OUTSIDE.items():
            if ours == "lm_head.weight" and cfg.tie_embeddings:
                continue  # llama.cpp uses token_embd when output is missing
            out[n.gguf] = sd.get(ours, torch.zeros(cfg.n_embd))  # a LayerNorm without bias: a zero one
        for i in range(cfg.n_layer):
            b = f"blocks.{i}."
            for ours, n in GPT2_BLOCK.items():  # llama.cpp's gpt2 needs every bias: gptlab's missing ones are zeros
                weight = sd[b + ours.rsplit(".", 1)[0] + ".weight"]
                out[f"blk.{i}.{n.gguf}"] = sd.get(b + ours, torch.zeros(len(weight)))
            out[f"blk.{i}.{GPT2_QKV.gguf}.weight"] = torch.cat([sd[b + f"attn.{x}.weight"] for x in "qkv"])
            biases = [sd.get(b + f"attn.{x}.bias", torch.zeros(len(sd[b + f"attn.{x}.weight"]))) for x in "qkv"]
            out[f"blk.{i}.{GPT2_QKV.gguf}.bias"] = torch.cat(biases)
    else:
        block = llama_block(cfg.mlp)
        for key, value in sd.items():
            module, param = key.rsplit(".", 1)
            if not key.startswith("blocks."):
                if module != "lm_head" or not cfg.tie_embeddings:
                    out[f"{LLAMA_OUTSIDE[module].gguf}.{param}"] = value
                continue
            _, i, module = module.split(".", 2)
            if module in ("attn.q", "attn.k"):
                value = permute_rotary(value, cfg.n_head if module == "attn.q" else cfg.n_kv_head)
            out[f"blk.{i}.{block[module].gguf}.{param}"] = value
    return {k: v.contiguous().numpy() for k, v in out.items()}


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of llama.cpp's byte-level BPE for `vocab_size` ids (unused ids are [PADi])."""
    spec = json.loads(tokenizer.hf.to_str())
    model = spec["model"]
    if tokenizer.kind == "char":
        table = byte_table()
        spell = {i: "".join(table[b] for b in token.encode()) for token, i in model["vocab"].items()}
        pairs: dict[str, None] = {}  # each multi-byte character's bytes, joined left to right: é = Ã + ©
        for token in sorted(model["vocab"], key=lambda t: len(t.encode())):
            raw = token.encode()
            for k in range(1, len(raw)):
                pairs["".join(table[b] for b in raw[:k]) + " " + table[raw[k]]] = None
        merges = list(pairs)
    else:
        _check_byte_level(tokenizer, spec)
        spell = {i: token for token, i in model["vocab"].items()}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:  # llama.cpp refuses a BPE without merges (and gguf drops an empty list): one that never applies,
        merges = [byte_table()[0xC3] + " " + byte_table()[0xC3]]  # two UTF-8 lead bytes, never side by side in text
    if tokenizer.vocab_size > vocab_size:
        raise GptlabError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model only {vocab_size}",
            "export a run whose model was trained with this tokenizer",
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for i, token in spell.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tokenizer.hf.get_added_tokens_decoder().items():
        tokens[i], types[i] = added.content, CONTROL if added.special else USER_DEFINED
    return tokens, types, merges


def _check_byte_level(tokenizer: Tokenizer, spec: dict) -> None:
    """Refuse a tokenizer that llama.cpp's GPT-2 byte-level BPE would not reproduce."""
    if tokenizer.kind == "wordpiece":
        raise GptlabError(
            "a wordpiece tokenizer has no GGUF form: llama.cpp's WordPiece is BERT's (lowercased text, '##' pieces), "
            "not gptlab's byte-level one",
            "train the run with data.tokenizer=bpe (byte-level BPE), or export it with --format hf",
        )
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    same = (
        model["type"] == "BPE"
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
        and (spec.get("decoder") or {}).get("type") == "ByteLevel"
        and not (model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"))
        and not model.get("byte_fallback")
    )
    if not same:
        raise GptlabError(
            f"this {tokenizer.kind} tokenizer is not a GPT-2-style byte-level BPE (GPT-2's split, no normalizer), "
            "the only BPE gptlab writes to GGUF",
            "export it with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py",
        )


def _write_metadata(writer: Any, gguf: Any, cfg: ModelConfig, name: str, dtype: str) -> None:
    """The architecture's hyperparameters, as llama.cpp's loader reads them."""
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    if cfg.position == "learned":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[dtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _quantize(gguf: Any, name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """A tensor in the file's type, following llama.cpp's converter: 1-D tensors, norms, biases and learned positions
    stay f32; a matrix whose rows are not whole Q8_0 blocks falls back to f16."""
    types = gguf.GGMLQuantizationType
    keep = array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
    if keep or name.startswith("position_embd.") or dtype == "f32":
        return array.astype(np.float32), types.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(array, types.Q8_0), types.Q8_0
        except gguf.QuantError:  # rows not a multiple of 32 values
            pass
    return array.astype(np.float16), types.F16


def modelfile(end_tokens: list[str], cfg: ModelConfig, sample: SampleConfig) -> str:
    """An Ollama Modelfile for model.gguf: its context, the run's sampling defaults and the end tokens as stops.

    No TEMPLATE: a Jinja chat template has no faithful Go-template form in general, and Ollama reads the one the GGUF
    carries (tokenizer.chat_template) when it knows it; prompts are otherwise given as they are.
    """
    lines = [
        "# ollama create NAME -f Modelfile (from this folder), then ollama run NAME",
        f"FROM ./{GGUF_FILE}",
        f"PARAMETER num_ctx {cfg.block_size}",  # the trained context: learned positions end there
        # gptlab sample's defaults, spelled out where Ollama's own differ (top_k 40, top_p 0.9, repeat_penalty 1.1)
        f"PARAMETER temperature {sample.temperature}",
        f"PARAMETER top_k {sample.top_k or 0}",  # 0: all tokens
        f"PARAMETER top_p {sample.top_p if sample.top_p is not None else 1.0}",
        f"PARAMETER min_p {sample.min_p or 0.0}",
        f"PARAMETER repeat_penalty {sample.repetition_penalty}",
    ]
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in end_tokens]
    return "\n".join(lines) + "\n"
