"""The GPT: a decoder-only transformer in one file.

Two blocks share this code, chosen by `ModelConfig.arch`:
- "modern" (the default, measured best at a fixed budget): rotary positions in the rotate-half
  layout of Hugging Face Llama, RMSNorm, SwiGLU, no biases, an untied output head.
- "gpt2": learned positions, LayerNorm, GELU, biases, tied embeddings, as GPT-2 and nanoGPT.
Every switch can also be set on its own, and either block can run attention and MLP side by side (GPT-J).
The model returns logits; the loss and the optimizer live in the trainer, so the same module serves training,
generation and export unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptlab.config import ModelConfig


class KVCache:
    """Preallocated keys and values for every layer, with a length per row.

    Row b holds its tokens in slots 0..lengths[b]-1. New tokens are written from slot lengths[b] on,
    and a token's position id is its slot, so rows of different lengths decode in one batch. A caller
    that pads rows to one width writes the padding into a slot past every real one (the generation
    engine gives its caches one spare slot at the end for it), where no real token attends.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)  # attention's layout: no transposes
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    def positions(self, t: int) -> torch.Tensor:
        """Position ids (B, t) for t new tokens per row."""
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kv_heads, t, head_dim) keys/values into the step's slots; return (B, kv_heads, end, head_dim)."""
        if step.slot is not None:  # a plain copy into views made once for all layers: ~7 us less a layer
            if step.views is None:  # (autograd forbids writing into unbind's views while it records)
                layers = (
                    (lambda t: t.unbind(0))
                    if not torch.is_grad_enabled()
                    else (lambda t: [t[i] for i in range(len(t))])
                )
                step.views = tuple(
                    layers(t.narrow(3, *span)) for span in ((step.slot, 1), (0, step.end)) for t in (self.k, self.v)
                )
            k_at, v_at, k_all, v_all = step.views
            k_at[layer].copy_(k)
            v_at[layer].copy_(v)
            return k_all[layer], v_all[layer]
        flat = self._flat(step)
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):  # one index_copy_ each; it does not cast
            cache.view(-1, cache.shape[-1]).index_copy_(0, flat, new.reshape(-1, new.shape[-1]).to(cache.dtype))
        return self.k[layer].narrow(2, 0, step.end), self.v[layer].narrow(2, 0, step.end)

    def store_layers(self, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> None:
        """Write every layer's keys/values (layers, B, kv_heads, t, head_dim) into the step's slots at once."""
        if step.slot is not None:
            self.k.narrow(3, step.slot, 1).copy_(k)
            self.v.narrow(3, step.slot, 1).copy_(v)
            return
        flat = self._flat(step)
        for cache, new in ((self.k, k), (self.v, v)):  # each layer seen as (B * heads * slots, head_dim)
            L, D = cache.shape[0], cache.shape[-1]
            cache.view(L, -1, D).index_copy_(1, flat, new.reshape(L, -1, D).to(cache.dtype))

    def _flat(self, step: CacheStep) -> torch.Tensor:
        """(row, head, token) -> the row of a layer seen as (B * heads * slots, head_dim); made once a step."""
        if step.flat is None:
            if not (self.k.is_contiguous() and self.v.is_contiguous()):  # e.g. a cache a caller built itself
                self.k, self.v = self.k.contiguous(), self.v.contiguous()
            _, B, H, S, _ = self.k.shape
            rows_heads = torch.arange(B * H, device=step.slots.device).view(B, H, 1)
            step.flat = (rows_heads * S + step.slots[:, None]).view(-1)
        return step.flat

    def advance(self, counts: torch.Tensor | int) -> None:
        """Mark `counts` more tokens per row as filled."""
        self.lengths += counts

    def select(self, rows: list[int]) -> None:
        """Keep only these rows (e.g. when others have finished), in this order."""
        idx = torch.tensor(rows, device=self.lengths.device)
        self.k, self.v, self.lengths = self.k[:, idx], self.v[:, idx], self.lengths[idx]

    def extend(self, other: KVCache) -> KVCache:
        """This cache with the rows of `other` (new requests joining a batch) after its own."""
        if other.max_len != self.max_len:
            raise ValueError(f"cannot join caches of {self.max_len} and {other.max_len} slots")
        self.k, self.v = torch.cat([self.k, other.k], dim=1), torch.cat([self.v, other.v], dim=1)
        self.lengths = torch.cat([self.lengths, other.lengths])
        return self


@dataclass
class CacheStep:
    """Where one forward's new tokens go in a KV cache, and which slots each may attend to."""

    slots: torch.Tensor  # (B, T) the slot of each new token
    end: int  # one past the highest slot written: attention reads slots [0, end)
    mask: torch.Tensor | None  # (B, 1, T, end): slot j is visible to a token in slot p when j <= p; None = all
    slot: int | None = None  # the one slot of every new token (one per row, all rows alike): a plain copy
    # made by the first `KVCache.store` of the forward, for all layers: with `slot`, each layer's keys and values at
    # the slot and up to end; without, where each new key and value goes in a layer seen as rows of head_dim
    views: tuple | None = None
    flat: torch.Tensor | None = None

    @classmethod
    def of(cls, slots: torch.Tensor, cache: KVCache) -> CacheStep:
        """The step for tokens in `slots`; the one host sync of a cached forward happens here."""
        T = slots.shape[1]
        low, high = (int(v) for v in torch.aminmax(slots))
        end = high + 1
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: position {end - 1} >= {cache.max_len}")
        if T == 1 and low == high:  # one token per row, all in the same slot: every filled slot is visible
            return cls(slots, end, None, high)
        visible = torch.arange(end, device=slots.device) <= slots[:, :, None]
        return cls(slots, end, visible[:, None])


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_dim) of the rotary positions in the rotate-half layout of HF Llama, fp32."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap * tanh(logits / cap)`: logits squashed smoothly into (-cap, cap); `cap` 0 leaves them as they are."""
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.compiler.disable
def _lookup(embedding: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """`embedding(idx)` run eagerly under torch.compile, as `GPT.embed` and for its reason: a backward that repeats."""
    return embedding(idx)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with optional grouped-query heads, QK-norm and rotary positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # separate q, k, v matrices rather than one fused matmul: Muon orthogonalises each matrix on its own,
        # and orthogonalising a fused qkv was measured worse (val 1.60 vs 1.57, benchmarks/RESULTS.md)
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.value_embeds = cfg.value_embeds
        if cfg.value_embeds:  # this layer's own token embedding, added to the values; made as zeros (its init) so
            # that it draws nothing from the RNG: the other weights are those of the same seed without the switch
            table = torch.zeros(cfg.vocab_size, cfg.n_kv_head * cfg.head_dim)
            self.value_embed = nn.Embedding.from_pretrained(table, freeze=False)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        step: CacheStep | None,
        cache: KVCache | None,
        layer: int,
        idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention branch for x (B, T, C); `idx` (B, T): the tokens' ids, which value embeddings look up."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.value_embeds:
            v = v + _lookup(self.value_embed, idx).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        gqa = self.n_kv_head != self.n_head
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                dropout_p=dropout,
                enable_gqa=gqa,
            )
        else:
            assert step is not None
            k_all, v_all = cache.store(layer, k.transpose(1, 2), v.transpose(1, 2), step)
            if k_all.dtype != q.dtype:  # a cache kept in another precision than this forward's
                k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, attn_mask=step.mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)
        y = self.out(y)
        return F.dropout(y, dropout, True) if dropout else y


class MLP(nn.Module):
    """SwiGLU (silu(gate) * up, separate matrices for Muon as in Attention), the GPT-2 GELU MLP, or relu(x)^2."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        self.approximate = "none" if cfg.mlp == "gelu_exact" else "tanh"
        if self.swiglu:
            self.gate = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
            self.up = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self._drop(self.down(F.silu(self.gate(x)) * self.up(x)))
        h = self.fc(x)
        if self.relu2:
            h = F.relu(h).square()
        elif self.approximate == "none":  # nanoGPT's nn.GELU()
            h = F.gelu(h)
        elif torch.compiler.is_compiling() and h.device.type == "cpu":
            # the same tanh GELU, since (1 + tanh(z)) / 2 = sigmoid(2z): inductor's CPU tanh is slow,
            # its sigmoid is not (fwd+bwd 0.8 vs 1.7 ms on a 768x512 tensor, one thread)
            h = h * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h))
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self._drop(self.down(h))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, True) if self.training and self.dropout else x  # no call when off


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); pre-norm is what trains.

    With `parallel_block` (GPT-J, PaLM) both branches read one norm of the same input: x + attn(h) + mlp(h),
    h = norm1(x); there is no norm2.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        if not self.parallel:
            self.norm2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, step, cache, layer, idx=None):  # noqa: ANN001, ANN201 - internal
        if self.parallel:
            h = self.norm1(x)
            return x + self.attn(h, rope, step, cache, layer, idx) + self.mlp(h)
        x = x + self.attn(self.norm1(x), rope, step, cache, layer, idx)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab)."""

    mode_switches = 0  # calls of train() and eval() that changed a mode (see `train`)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (it comes from the prepared data)")
        self.cfg = cfg
        # train.activation_checkpointing: keep only each block's input in training, recompute the rest in backward
        self.checkpoint_blocks = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.n_embd)
        if cfg.x0_lambdas:  # block i reads resid_lambdas[i] * x + x0_lambdas[i] * x0 (set in reset_parameters)
            self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer) (zero with
        `zero_init_out`); value embeddings and x0_lambdas zero, resid_lambdas one: at init both switches change nothing.

        Each block adds two projections to the residual stream; scaling them keeps its variance
        from growing with depth.
        """
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                if self.cfg.zero_init_out:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            elif name.endswith("value_embed.weight") or name == "x0_lambdas":
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for each position (only the last with `last_only`; only position logits_at[b] of row b).

        Without a cache, positions default to 0..T-1 and attention is causal. With a cache, the
        new tokens' keys and values are stored in the slots `positions` (default: each row's length onward);
        the caller advances `cache.lengths` afterwards. A slot past the context (padding a row of fewer new
        tokens than the batch's widest) takes the last position's embedding and is never attended to by a
        real token, whose slot is lower.
        """
        B, T = idx.shape
        if positions is None and cache is not None:
            positions = cache.positions(T)
        if positions is None:  # the training path: no data-dependent checks, so compile sees one graph
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context of {self.cfg.block_size}")
            positions = torch.arange(T, device=idx.device)[None]
        step = None
        if cache is not None:
            step = CacheStep.of(positions.expand(B, T), cache)
            positions = positions.clamp(max=self.cfg.block_size - 1)
        x = self.embed(idx, positions)
        rope = None
        if self.pos_emb is None:
            dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else x.dtype
            rope = (self.rope_cos[positions][:, :, None].to(dtype), self.rope_sin[positions][:, :, None].to(dtype))
        if self.training and self.cfg.dropout:
            x = F.dropout(x, self.cfg.dropout, True)
        x0 = x
        recompute = self.checkpoint_blocks and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if self.cfg.x0_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if recompute:  # dropout's RNG state is kept, so the recomputed block is the same one
                x = checkpoint(block, x, rope, None, None, i, idx, use_reentrant=False)
            else:
                x = block(x, rope, step, cache, i, idx)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        return softcap(self.lm_head(self.norm_f(x)), self.cfg.logit_softcap)

    @torch.compiler.disable
    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embeddings, run eagerly even under torch.compile: inductor's CPU
        backward adds gradient rows with atomics, so compiled runs on several threads would not repeat exactly."""
        x = self.tok_emb(idx)
        return x + self.pos_emb(positions) if self.pos_emb is not None else x

    def train(self, mode: bool = True) -> GPT:
        """Switch training mode, counting each change in `mode_switches`: how a `Decoder` learns that the weights
        it copied may have changed (not every optimizer bumps tensor versions: fused AdamW does not). A call that
        leaves the mode as it was is not counted: `eval()` on a model in eval mode does not make decoders gather
        (and compiled ones compile) again."""
        if mode != self.training or any(m.training != mode for m in self.modules()):
            self.mode_switches += 1
        super().train(mode)
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without the position embedding, value embeddings (and untied token embedding) by
        default: lookups, no FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
            if self.cfg.value_embeds:
                n -= sum(block.attn.value_embed.weight.numel() for block in self.blocks)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention, as in the PaLM appendix."""
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache sized for this model (up to its context)."""
        p = self.tok_emb.weight  # (the output head's may be int8: quantize.py)
        return KVCache(self.cfg, batch_size, max_len or self.cfg.block_size, p.device, dtype or p.dtype)
