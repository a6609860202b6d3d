"""Sampling from a GPT with a KV cache: greedy, temperature, top-k, top-p, EOS, seeds, batches.

Generation past the context keeps a sliding window: when a row's window is full it is cut to its last
3/4 of the context and prefilled again, so the cache stays preallocated and positions stay inside
what the model was trained on. The uncached path follows the same windows, so both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptlab.model import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row from (B, vocab) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Generates continuations of token-id prompts with one model, batched across prompts."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.block_size = model.cfg.block_size
        self.keep = max(1, self.block_size * 3 // 4)  # window kept when the context is full

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _prefill(self, windows: list[list[int]], use_cache: bool) -> tuple[torch.Tensor, KVCache | None]:
        """Run right-padded windows; return each row's last logits and a cache holding them."""
        lens = torch.tensor([len(w) for w in windows], device=self.device)
        width = int(lens.max())
        ids = torch.zeros(len(windows), width, dtype=torch.long, device=self.device)
        for b, w in enumerate(windows):
            ids[b, : len(w)] = torch.tensor(w, dtype=torch.long)
        cache = self.model.new_cache(len(windows)) if use_cache else None
        logits = self.model(ids, cache=cache)
        if cache is not None:
            cache.lengths.copy_(lens)  # padding slots beyond a row's length get overwritten later
        return logits[torch.arange(len(windows)), lens - 1], cache

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """New tokens for each prompt (stopping after `eos_id`, which is not returned)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        too_long = [len(p) for p in prompts if len(p) > self.block_size]
        if too_long:
            raise ValueError(f"a prompt of {too_long[0]} tokens is longer than the context of {self.block_size}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        windows = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        logits, cache = self._prefill(windows, use_cache)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            tokens = nxt.tolist()
            for b, tok in enumerate(tokens):
                if done[b]:
                    continue
                if eos_id is not None and tok == eos_id:
                    done[b] = True
                else:
                    out[b].append(tok)
                windows[b].append(tok)
            if all(done):
                break
            if any(len(w) > self.block_size for w in windows):  # the window is full: slide and prefill again
                windows = [w[-self.keep :] for w in windows]
                logits, cache = self._prefill(windows, use_cache)
            elif cache is not None:
                logits = self.model(nxt[:, None], cache=cache)[:, -1]
                cache.advance(1)
            else:
                logits, _ = self._prefill(windows, use_cache=False)
        return out
