"""gptlab models out to Hugging Face `transformers`: `GPT2LMHeadModel` for the GPT-2 block, `LlamaForCausalLM`
for the default block, saved with their tokenizer so `from_pretrained` (and vLLM, TGI) load them without code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer

GPT2_SWITCHES = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
LLAMA_SWITCHES = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise GptlabError(
            "moving models to Hugging Face needs transformers, which is not installed", "pip install gptlab[hf]"
        ) from e
    return transformers


def hf_architecture(cfg: ModelConfig) -> str:
    """The `transformers` class a model with these switches becomes, or a user error naming the switch."""
    cfg = cfg.resolved()
    family = GPT2_SWITCHES if cfg.position == "learned" else LLAMA_SWITCHES
    name = "GPT2LMHeadModel" if family is GPT2_SWITCHES else "LlamaForCausalLM"
    for key, want in family.items():
        if getattr(cfg, key) != want:
            raise GptlabError(
                f"model.{key}={getattr(cfg, key)} has no Hugging Face architecture with model.position={cfg.position}",
                f"{name} needs model.{key}={want}; export models whose switches match GPT-2 or Llama",
            )
    if cfg.qk_norm:
        raise GptlabError("model.qk_norm=true has no Hugging Face architecture here", "train with model.qk_norm=false")
    if name == "GPT2LMHeadModel" and cfg.n_kv_head != cfg.n_head:
        raise GptlabError(
            f"model.n_kv_head={cfg.n_kv_head} (grouped-query attention) has no GPT-2 form", "use model.n_kv_head=null"
        )
    return name


def to_hf(model: GPT) -> Any:
    """A `transformers` causal LM holding a copy of `model`'s weights (fp32, eval mode)."""
    transformers = _require_transformers()
    cfg = model.cfg
    name = hf_architecture(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if name == "GPT2LMHeadModel":
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        tensors = _gpt2_tensors(sd, cfg)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, attention_bias=cfg.bias, mlp_bias=cfg.bias,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        )  # fmt: skip
        tensors = _llama_tensors(sd, cfg)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"weights did not map onto {name}: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def _gpt2_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's names; its Conv1D layers keep (in, out) matrices, the transpose of nn.Linear's."""
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [b + f"attn.{x}" for x in "qkv"]
        out |= {
            h + "ln_1.weight": sd[b + "norm1.weight"], h + "ln_1.bias": sd[b + "norm1.bias"],
            h + "attn.c_attn.weight": torch.cat([sd[p + ".weight"] for p in qkv]).T,
            h + "attn.c_attn.bias": torch.cat([sd[p + ".bias"] for p in qkv]),
            h + "attn.c_proj.weight": sd[b + "attn.out.weight"].T, h + "attn.c_proj.bias": sd[b + "attn.out.bias"],
            h + "ln_2.weight": sd[b + "norm2.weight"], h + "ln_2.bias": sd[b + "norm2.bias"],
            h + "mlp.c_fc.weight": sd[b + "mlp.fc.weight"].T, h + "mlp.c_fc.bias": sd[b + "mlp.fc.bias"],
            h + "mlp.c_proj.weight": sd[b + "mlp.down.weight"].T, h + "mlp.c_proj.bias": sd[b + "mlp.down.bias"],
        }  # fmt: skip
    out |= {"transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _llama_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama's names; gptlab's rotary layout is already Llama's rotate-half one, so nothing is permuted."""
    names = {
        "norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.out": "self_attn.o_proj",
        "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj",
    }  # fmt: skip
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            module, param = rest.rsplit(".", 1)
            out[f"model.layers.{i}.{names[module]}.{param}"] = value
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    """Write a run's model, tokenizer and generation settings as a `from_pretrained` folder."""
    transformers = _require_transformers()
    from gptlab.train.checkpoint import load_run

    _, model, tokenizer = load_run(run_dir, checkpoint, "cpu")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"'{out}' is a file", "give a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        raise GptlabError(f"'{out}' is not empty", "give a new or empty folder")
    hf = to_hf(model)
    eos = tokenizer.eos_id
    hf.generation_config = transformers.GenerationConfig(
        eos_token_id=eos, pad_token_id=eos, bos_token_id=None, max_length=model.cfg.block_size
    )
    hf.save_pretrained(out)  # config.json, model.safetensors, generation_config.json
    hf_tokenizer(tokenizer).save_pretrained(out)
    return out


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """The tokenizer as `transformers.PreTrainedTokenizerFast`, text kept exactly as gptlab decodes it."""
    transformers = _require_transformers()
    eos = next((t for t, i in tokenizer.special_ids.items() if i == tokenizer.eos_id), None)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.hf, eos_token=eos, pad_token=eos, clean_up_tokenization_spaces=False
    )
