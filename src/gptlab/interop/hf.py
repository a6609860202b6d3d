"""gptlab models to and from Hugging Face `transformers` models: `GPT2LMHeadModel` is the GPT-2 block,
`LlamaForCausalLM` the default block, `ArceeForCausalLM` the default block with `model.mlp=relu2`, `PhiForCausalLM`
(out only) a parallel block with RoPE, LayerNorm and GELU.
Conversions only; `interop/runs.py` writes them as folders and run directories.
"""

from __future__ import annotations

import contextlib
import pickle
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gptlab.chat import ChatTemplate, end_of_turn
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop.names import (
    GPT2_BLOCK,
    GPT2_OUTSIDE,
    GPT2_QKV,
    LLAMA_OUTSIDE,
    LLAMA_SWITCHES,
    PHI_BLOCK,
    PHI_OUTSIDE,
    allowed,
    llama_block,
)
from gptlab.model import GPT
from gptlab.safe_pickle import weights_only_refusal
from gptlab.tokenizers import Tokenizer

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")  # the special-token names templates use
GPT2_SWITCHES = {"position": "learned", "norm": "layernorm", "mlp": ("gelu", "gelu_exact", "relu2"), "bias": True}
# gptlab's mlp -> GPT2Config.activation_function (and Phi's, Arcee's hidden_act): transformers' ACT2FN names
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu2": "relu2"}
# model.parallel_block: Phi's block is x + attn(ln(x)) + mlp(ln(x)) with one shared LayerNorm, rotate-half rotary
# (over the whole head with partial_rotary_factor=1) and biases everywhere (gptlab's missing ones export as zeros)
PHI_SWITCHES = {"position": "rope", "norm": "layernorm", "mlp": ("gelu", "gelu_exact", "relu2")}


def require_transformers() -> Any:
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
    if cfg.parallel_block:
        family, name, given = PHI_SWITCHES, "PhiForCausalLM", "model.parallel_block=true"
        instead = "export parallel blocks with RoPE, LayerNorm and GELU, or train with model.parallel_block=false"
    else:
        family = GPT2_SWITCHES if cfg.position == "learned" else LLAMA_SWITCHES
        name = "GPT2LMHeadModel" if family is GPT2_SWITCHES else "LlamaForCausalLM"
        if family is LLAMA_SWITCHES and cfg.mlp == "relu2":
            name = "ArceeForCausalLM"
        given, instead = f"model.position={cfg.position}", "export models whose switches match GPT-2 or Llama"
    for key, want in family.items():
        if getattr(cfg, key) not in allowed(want):
            raise GptlabError(
                f"model.{key}={getattr(cfg, key)} has no Hugging Face architecture with {given}",
                f"{name} needs model.{key}={' or '.join(map(str, allowed(want)))}; {instead}",
            )
    if cfg.qk_norm:
        raise GptlabError("model.qk_norm=true has no Hugging Face architecture here", "train with model.qk_norm=false")
    if cfg.logit_softcap:  # Gemma 2 caps its logits, but its block differs from these in other ways
        raise GptlabError(
            f"model.logit_softcap={cfg.logit_softcap} has no Hugging Face architecture here",
            "train with model.logit_softcap=0",
        )
    for switch in ("x0_lambdas", "value_embeds"):  # the speedrun's extra parameters: no transformers block has them
        if getattr(cfg, switch):
            raise GptlabError(
                f"model.{switch}=true has no Hugging Face architecture here", f"train with model.{switch}=false"
            )
    if name == "GPT2LMHeadModel" and cfg.n_kv_head != cfg.n_head:
        raise GptlabError(
            f"model.n_kv_head={cfg.n_kv_head} (grouped-query attention) has no GPT-2 form", "use model.n_kv_head=null"
        )
    return name


def to_hf(model: GPT) -> Any:
    """A `transformers` causal LM holding a copy of `model`'s weights (fp32, eval mode)."""
    transformers = require_transformers()
    cfg = model.cfg
    name = hf_architecture(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if name == "GPT2LMHeadModel":
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=GPT2_ACTIVATIONS[cfg.mlp],
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        tensors = _gpt2_tensors(sd, cfg)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    elif name == "PhiForCausalLM":
        hf_cfg = transformers.PhiConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            hidden_act=GPT2_ACTIVATIONS[cfg.mlp], max_position_embeddings=cfg.block_size,
            layer_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, partial_rotary_factor=1.0,
            tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )  # fmt: skip
        tensors = _phi_tensors(sd, cfg)
        hf = transformers.PhiForCausalLM(hf_cfg)
    else:
        family = "Llama" if name == "LlamaForCausalLM" else "Arcee"
        if not hasattr(transformers, f"{family}ForCausalLM"):  # Arcee came in transformers 4.53
            raise GptlabError(
                f"exporting model.mlp={cfg.mlp} needs {name}, which transformers {transformers.__version__} lacks",
                'pip install -U "transformers>=4.53"',
            )
        act = {} if family == "Llama" else {"hidden_act": GPT2_ACTIVATIONS[cfg.mlp]}
        hf_cfg = getattr(transformers, f"{family}Config")(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, attention_bias=cfg.bias, mlp_bias=cfg.bias,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
            bos_token_id=None, eos_token_id=None, pad_token_id=None, **act,
        )  # fmt: skip
        tensors = _llama_tensors(sd, cfg)
        hf = getattr(transformers, f"{family}ForCausalLM")(hf_cfg)
    load_all(hf, tensors, cfg.tie_embeddings)
    hf.tie_weights()
    return hf.eval()


def load_all(target: torch.nn.Module, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    """Load mapped tensors, every one of them (a tied head excepted): a miss is a mapping bug, not a user error."""
    missing, unexpected = target.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"weights did not map onto {type(target).__name__}: missing {missing}, unexpected {unexpected}"
        )


def _gpt2_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's names; its Conv1D layers keep (in, out) matrices, the transpose of nn.Linear's."""
    tied = cfg.tie_embeddings
    out = {n.hf: sd[ours] for ours, n in GPT2_OUTSIDE.items() if not (tied and ours == "lm_head.weight")}
    qkv = GPT2_QKV.hf
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, n in GPT2_BLOCK.items():
            out[h + n.hf] = sd[b + ours].T if n.transposed else sd[b + ours]
        out[f"{h}{qkv}.weight"] = torch.cat([sd[b + f"attn.{x}.weight"] for x in "qkv"]).T
        out[f"{h}{qkv}.bias"] = torch.cat([sd[b + f"attn.{x}.bias"] for x in "qkv"])
    return {k: v.contiguous() for k, v in out.items()}


def _llama_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama's (and Arcee's) names; gptlab's rotary layout is already Llama's rotate-half one, so nothing is
    permuted."""
    out, block = {}, llama_block(cfg.mlp)
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if key.startswith("blocks."):
            _, i, module = module.split(".", 2)
            out[f"model.layers.{i}.{block[module].hf}.{param}"] = value
        elif module != "lm_head" or not cfg.tie_embeddings:
            out[f"{LLAMA_OUTSIDE[module].hf}.{param}"] = value
    return out


def _phi_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi's names; every linear and norm of Phi has a bias (and its head too): those gptlab lacks are zeros."""
    outside = {k: n.hf for k, n in PHI_OUTSIDE.items()}
    out = {f"{outside['tok_emb']}.weight": sd["tok_emb.weight"], f"{outside['norm_f']}.weight": sd["norm_f.weight"]}
    out[f"{outside['norm_f']}.bias"] = sd.get("norm_f.bias", torch.zeros(cfg.n_embd))
    for i in range(cfg.n_layer):
        for ours, n in PHI_BLOCK.items():
            weight = sd[f"blocks.{i}.{ours}.weight"]
            out[f"model.layers.{i}.{n.hf}.weight"] = weight
            out[f"model.layers.{i}.{n.hf}.bias"] = sd.get(f"blocks.{i}.{ours}.bias", torch.zeros(len(weight)))
    if not cfg.tie_embeddings:
        out[f"{outside['lm_head']}.weight"] = sd["lm_head.weight"]
    out[f"{outside['lm_head']}.bias"] = torch.zeros(cfg.vocab_size)
    return out


def hf_tokenizer(tokenizer: Tokenizer, chat_template: ChatTemplate | None = None, eos_id: int | None = None) -> Any:
    """The tokenizer as `transformers.PreTrainedTokenizerFast`, text kept exactly as gptlab decodes it; its eos_token
    is `eos_id`'s (default: the tokenizer's end of text)."""
    transformers = require_transformers()
    eos = tokenizer.eos_token if eos_id is None else tokenizer.hf.id_to_token(eos_id)
    names = {"eos_token": eos, "pad_token": eos}
    if chat_template is not None:  # the names its template uses (bos_token, ...), so transformers renders the same
        names |= {k: v for k, v in chat_template.special_tokens.items() if k in SPECIAL_NAMES}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.hf, clean_up_tokenization_spaces=False,
        chat_template=chat_template.source if chat_template else None, **names,
    )  # fmt: skip


# ----- in ----------------------------------------------------------------------------------------------------------
def model_config_of(hf_config: Any) -> ModelConfig:
    """The gptlab `ModelConfig` of a `transformers` GPT-2, Llama or Arcee config, or a user error saying what
    differs."""
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        activations = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu2": "relu2"}
        mlp = activations.get(hf_config.activation_function)
        if mlp is None:
            raise GptlabError(
                f"GPT-2 activation '{hf_config.activation_function}' is none gptlab's MLPs have",
                "import GPT-2 checkpoints with activation_function gelu_new, gelu or relu2",
            )
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(
            hf_config, "scale_attn_weights", True
        ):
            raise GptlabError(
                "this GPT-2 checkpoint scales attention differently (scale_attn_by_inverse_layer_idx or "
                "scale_attn_weights=false), which gptlab's block does not do",
                "import a checkpoint with GPT-2's own attention scaling",
            )
        return ModelConfig(
            arch="gpt2", vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions, n_layer=hf_config.n_layer,
            n_head=hf_config.n_head, n_embd=hf_config.n_embd, d_ff=hf_config.n_inner or 4 * hf_config.n_embd, mlp=mlp,
            norm_eps=hf_config.layer_norm_epsilon, tie_embeddings=hf_config.tie_word_embeddings,
        ).resolved()  # fmt: skip
    if kind in ("llama", "arcee"):  # Arcee: Llama's block, its MLP relu(up(x))^2 without a gate
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rope = getattr(hf_config, "rope_scaling", None) or {}
        scaled = rope.get("rope_type", rope.get("type", "default")) not in ("default", None)
        if head_dim * hf_config.num_attention_heads != hf_config.hidden_size or scaled:
            what = "a head size other than hidden_size / heads" if not scaled else f"rope scaling {rope}"
            raise GptlabError(f"this Llama checkpoint uses {what}, which gptlab's block does not have", "pick another")
        mlp, name, ours, acts = ("swiglu", "Llama", "SwiGLU uses silu", ("silu", "swish"))
        if kind == "arcee":
            mlp, name, ours, acts = ("relu2", "Arcee", "relu2 MLP uses relu2", ("relu2",))
        if hf_config.hidden_act not in acts:
            raise GptlabError(
                f"this {name} checkpoint's MLP uses {hf_config.hidden_act}, gptlab's {ours}", "pick another"
            )
        if getattr(hf_config, "mlp_bias", False) != getattr(hf_config, "attention_bias", False):
            raise GptlabError("this Llama checkpoint has biases in attention or MLP only", "pick another")
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None)) or 10000.0
        return ModelConfig(
            arch="modern", vocab_size=hf_config.vocab_size, block_size=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads, n_embd=hf_config.hidden_size, d_ff=hf_config.intermediate_size,
            norm_eps=hf_config.rms_norm_eps, rope_theta=float(theta), bias=bool(hf_config.attention_bias),
            tie_embeddings=hf_config.tie_word_embeddings, mlp=mlp,
        ).resolved()  # fmt: skip
    raise GptlabError(
        f"model type '{kind}' cannot be imported", "import a GPT-2, Llama or Arcee-architecture checkpoint"
    )


def from_hf(hf: Any) -> GPT:
    """A gptlab model holding a copy of a `transformers` GPT-2 or Llama model's weights (fp32, eval mode)."""
    cfg = model_config_of(hf.config)
    theirs = {k: v.detach().float().cpu() for k, v in hf.state_dict().items()}
    try:
        tensors = _from_gpt2(theirs, cfg) if cfg.arch == "gpt2" else _from_llama(theirs, cfg)
    except KeyError as e:
        raise GptlabError(f"the checkpoint has no tensor {e}", "check that it is a whole GPT-2 or Llama model") from e
    model = GPT(cfg)
    load_all(model, tensors, cfg.tie_embeddings)
    return model.eval()


def _from_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gptlab's names for GPT-2's tensors (the inverse of `_gpt2_tensors`)."""
    tied = cfg.tie_embeddings
    out = {ours: sd[n.hf] for ours, n in GPT2_OUTSIDE.items() if not (tied and ours == "lm_head.weight")}
    qkv = GPT2_QKV.hf
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, n in GPT2_BLOCK.items():
            out[b + ours] = sd[h + n.hf].T if n.transposed else sd[h + n.hf]
        for x, w, bias in zip("qkv", sd[f"{h}{qkv}.weight"].T.chunk(3), sd[f"{h}{qkv}.bias"].chunk(3)):
            out[b + f"attn.{x}.weight"], out[b + f"attn.{x}.bias"] = w, bias
    return {k: v.contiguous() for k, v in out.items()}


def _from_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gptlab's names for Llama's tensors (RMSNorm has no bias, whatever the linear layers have)."""
    outside = {k: n.hf for k, n in LLAMA_OUTSIDE.items()}
    out = {"tok_emb.weight": sd[f"{outside['tok_emb']}.weight"], "norm_f.weight": sd[f"{outside['norm_f']}.weight"]}
    for i in range(cfg.n_layer):
        for ours, n in llama_block(cfg.mlp).items():
            for param in ("weight", "bias") if cfg.bias and not ours.startswith("norm") else ("weight",):
                out[f"blocks.{i}.{ours}.{param}"] = sd[f"model.layers.{i}.{n.hf}.{param}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd[f"{outside['lm_head']}.weight"]
    return out


@contextlib.contextmanager
def _loading(source: str, use_folder: str) -> Iterator[Any]:
    """`transformers` with its weight-loading bars off, its errors on a missing file, download or type made user errors.

    `use_folder` says how to use a local copy instead of a hub name, with `{folder}` where its path goes.
    """
    transformers = require_transformers()
    path = Path(source).expanduser()
    # a path, not a hub name: it says so, or its first folder is here (runs/typo is no hub model)
    local = source.startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    if local and not path.is_dir():
        raise GptlabError(f"no folder '{source}'", "check the path, or give a hub name such as gpt2")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars (downloads keep the hub's own)
    try:
        yield transformers
    except pickle.UnpicklingError as e:  # pickled weights (pytorch_model.bin): torch.load(weights_only=True) refused
        raise GptlabError(
            f"could not load '{source}': its pickled weights hold objects that are not tensors, such as code "
            f"({weights_only_refusal(e) or str(e).splitlines()[0]}); nothing of them was run",
            "load only models from a source you trust, or ask for a safetensors copy",
        ) from e
    except (OSError, ValueError) as e:  # transformers' own words on a missing file, a download, a model type
        if Path(source).is_dir():
            fix = "the folder needs config.json of a GPT-2 or Llama model, its weights and tokenizer.json"
        else:
            folder = shlex.quote("./" + Path(source.rstrip("/")).name)
            fix = (
                "check the name, or download the model where there is a network and pass its folder: "
                + use_folder.format(folder=folder)
            )
        raise GptlabError(f"could not load '{source}' ({str(e).splitlines()[0]})", fix) from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_pretrained(source: str, use_folder: str = "{folder}") -> tuple[GPT, Tokenizer, ChatTemplate | None, list[str]]:
    """(model, tokenizer, chat template or None, end tokens) of a Hugging Face GPT-2 or Llama model: hub name or
    folder. The end tokens are the model's own: generation_config.json's and config.json's eos_token_id (an id or a
    list), the tokenizer's eos_token and the template's end of turn, in that order."""
    with _loading(source, use_folder) as transformers:
        hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        hf_tok = transformers.AutoTokenizer.from_pretrained(source)
    if not getattr(hf_tok, "is_fast", False):
        raise GptlabError(f"'{source}' has no tokenizer.json (a fast tokenizer)", "import a model with tokenizer.json")
    template = None
    if isinstance(hf_tok.chat_template, str):
        names = {k: getattr(hf_tok, k, None) for k in SPECIAL_NAMES}
        template = ChatTemplate(hf_tok.chat_template, {k: v for k, v in names.items() if isinstance(v, str)})
    tokenizer = Tokenizer(hf_tok.backend_tokenizer)

    def tokens_of(given: int | list[int] | None) -> list[str]:
        ids = [given] if isinstance(given, int) else list(given or ())
        return [hf_tok.convert_ids_to_tokens(i) for i in ids if 0 <= i < tokenizer.vocab_size]

    generation = hf.generation_config
    # generation_config.json's ids are the model's word (a plain token too); config.json's count only when they
    # are added tokens: a config class's default (Llama's 2) may name a plain token of another vocabulary
    ends = (
        []
        if generation is None or getattr(generation, "_from_model_config", False)
        else tokens_of(generation.eos_token_id)
    )
    ends += [t for t in tokens_of(hf.config.eos_token_id) if t in tokenizer.added_tokens]
    ends += [hf_tok.eos_token] if isinstance(hf_tok.eos_token, str) else []
    ends += [end_of_turn(template, tokenizer) or ""] if template is not None else []
    return from_hf(hf), tokenizer, template, [t for t in dict.fromkeys(ends) if t]


def pretrained_config(source: str, use_folder: str = "{folder}") -> ModelConfig:
    """The gptlab config of a Hugging Face model without loading its weights (config.json only)."""
    with _loading(source, use_folder) as transformers:
        return model_config_of(transformers.AutoConfig.from_pretrained(source))
