"""Sampling from a GPT with a KV cache: greedy, temperature, top-k, top-p, EOS, seeds, batches.

Generation past the context keeps a sliding window per row: when a row's window is full it is cut to its
last 3/4 of the context and that row's cache is rebuilt, so the cache stays preallocated and positions stay
inside what the model was trained on. The uncached path follows the same windows, so both give the same
tokens, and a row's tokens never depend on the other rows of its batch.
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
        if self.block_size < 2:
            raise ValueError("generation needs a context (model.block_size) of at least 2 tokens")
        self.keep = max(2, self.block_size * 3 // 4)  # window kept when the context is full

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
        active = list(range(len(prompts)))  # rows still generating; the cache holds exactly these
        logits, cache = self._prefill(windows, use_cache)
        for step in range(max_new_tokens):
            tokens = sample_next(logits, temperature, top_k, top_p, generator).tolist()
            keep = [i for i, tok in enumerate(tokens) if eos_id is None or tok != eos_id]
            for i in keep:
                out[active[i]].append(tokens[i])
                windows[active[i]].append(tokens[i])
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):  # finished rows leave the batch
                active, tokens = [active[i] for i in keep], [tokens[i] for i in keep]
                if cache is not None:
                    cache.select(keep)
            full = [i for i, b in enumerate(active) if len(windows[b]) > self.block_size]
            for i in full:  # a full window slides: keep its last 3/4 of the context
                windows[active[i]] = windows[active[i]][-self.keep :]
            if cache is None:
                logits, _ = self._prefill([windows[b] for b in active], use_cache=False)
                continue
            if full:  # rebuild those rows' cache from their window minus the token fed below
                _, rebuilt = self._prefill([windows[active[i]][:-1] for i in full], use_cache=True)
                cache.replace_rows(full, rebuilt)
            ids = torch.tensor(tokens, device=self.device)[:, None]
            logits = self.model(ids, cache=cache)[:, -1]
            cache.advance(1)
        return out
