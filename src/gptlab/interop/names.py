"""One table of tensor names per block: gptlab's name -> (Hugging Face name, GGUF name), shared by the
`transformers` export and import (`interop/hf.py`) and the GGUF export (`interop/gguf.py`).

Block tables name what lies inside block i: `blocks.{i}.` in gptlab, `transformer.h.{i}.` (GPT-2) or
`model.layers.{i}.` (Llama, Phi) in `transformers`, `blk.{i}.` in GGUF (llama.cpp's `gpt2`, `llama` and `phi2`
architectures). The GGUF names are llama.cpp's own (gguf-py's `TENSOR_NAMES`).
"""

from __future__ import annotations

from typing import NamedTuple

# the switches of the Llama-shaped block, which both exports write as Llama (`LlamaForCausalLM`, GGUF's `llama`); with
# model.mlp=relu2 (no gate) as Arcee (`ArceeForCausalLM`, GGUF's `arcee`): Llama's block with relu(x)^2 on up_proj
LLAMA_SWITCHES = {"position": "rope", "norm": "rmsnorm", "mlp": ("swiglu", "relu2")}


class Name(NamedTuple):
    """Where one gptlab tensor (or module) goes in `transformers` and in GGUF."""

    hf: str
    gguf: str
    transposed: bool = False  # GPT-2's Conv1D keeps (in, out) matrices, the transpose of nn.Linear's (HF only)


# GPT-2 block, by parameter; q, k and v are stacked into one matrix: HF's attn.c_attn, GGUF's attn_qkv (GPT2_QKV)
GPT2_BLOCK = {
    "norm1.weight": Name("ln_1.weight", "attn_norm.weight"), "norm1.bias": Name("ln_1.bias", "attn_norm.bias"),
    "attn.out.weight": Name("attn.c_proj.weight", "attn_output.weight", True),
    "attn.out.bias": Name("attn.c_proj.bias", "attn_output.bias"),
    "norm2.weight": Name("ln_2.weight", "ffn_norm.weight"), "norm2.bias": Name("ln_2.bias", "ffn_norm.bias"),
    "mlp.fc.weight": Name("mlp.c_fc.weight", "ffn_up.weight", True),
    "mlp.fc.bias": Name("mlp.c_fc.bias", "ffn_up.bias"),
    "mlp.down.weight": Name("mlp.c_proj.weight", "ffn_down.weight", True),
    "mlp.down.bias": Name("mlp.c_proj.bias", "ffn_down.bias"),
}  # fmt: skip
GPT2_QKV = Name("attn.c_attn", "attn_qkv", True)  # module: .weight and .bias follow
GPT2_OUTSIDE = {  # outside the blocks
    "tok_emb.weight": Name("transformer.wte.weight", "token_embd.weight"),
    "pos_emb.weight": Name("transformer.wpe.weight", "position_embd.weight"),
    "norm_f.weight": Name("transformer.ln_f.weight", "output_norm.weight"),
    "norm_f.bias": Name("transformer.ln_f.bias", "output_norm.bias"),
    "lm_head.weight": Name("lm_head.weight", "output.weight"),
}
# Llama block, by module (.weight, and .bias where the layer has one, follow)
LLAMA_BLOCK = {
    "norm1": Name("input_layernorm", "attn_norm"), "norm2": Name("post_attention_layernorm", "ffn_norm"),
    "attn.q": Name("self_attn.q_proj", "attn_q"), "attn.k": Name("self_attn.k_proj", "attn_k"),
    "attn.v": Name("self_attn.v_proj", "attn_v"), "attn.out": Name("self_attn.o_proj", "attn_output"),
    "mlp.gate": Name("mlp.gate_proj", "ffn_gate"), "mlp.up": Name("mlp.up_proj", "ffn_up"),
    "mlp.fc": Name("mlp.up_proj", "ffn_up"), "mlp.down": Name("mlp.down_proj", "ffn_down"),
}  # fmt: skip
LLAMA_OUTSIDE = {
    "tok_emb": Name("model.embed_tokens", "token_embd"),
    "norm_f": Name("model.norm", "output_norm"),
    "lm_head": Name("lm_head", "output"),
}
# Phi block (model.parallel_block), by module; one LayerNorm feeds attention and MLP
PHI_BLOCK = {
    "norm1": Name("input_layernorm", "attn_norm"), "attn.q": Name("self_attn.q_proj", "attn_q"),
    "attn.k": Name("self_attn.k_proj", "attn_k"), "attn.v": Name("self_attn.v_proj", "attn_v"),
    "attn.out": Name("self_attn.dense", "attn_output"), "mlp.fc": Name("mlp.fc1", "ffn_up"),
    "mlp.down": Name("mlp.fc2", "ffn_down"),
}  # fmt: skip
PHI_OUTSIDE = {
    "tok_emb": Name("model.embed_tokens", "token_embd"),
    "norm_f": Name("model.final_layernorm", "output_norm"),
    "lm_head": Name("lm_head", "output"),
}


def allowed(want: object) -> tuple:
    """The values a switch table's entry allows: its tuple, or its one value."""
    return want if isinstance(want, tuple) else (want,)


def llama_block(mlp: str) -> dict[str, Name]:
    """LLAMA_BLOCK for a model's MLP: SwiGLU's gate and up, or relu2's one fc (Arcee's up_proj)."""
    drop = ("mlp.fc",) if mlp == "swiglu" else ("mlp.gate", "mlp.up")
    return {ours: n for ours, n in LLAMA_BLOCK.items() if ours not in drop}
