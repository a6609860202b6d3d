"""Generation with the JAX GPT: a fixed-size KV cache, so decoding compiles once however long the output grows.

Jitted generation that re-traces for every new token (its context grows by one each time) ends slower than no jit
at all. Here every shape is fixed: the cache always holds the whole context, prompts are right-padded to a
power-of-two bucket, and a mask says which slots each token may read. `prefill` compiles once per (batch size,
bucket) and `decode` once per batch size; sampling happens inside both, with one explicit RNG key per row. Past
the context a row's window slides as in `gptlab.generate` (its last 3/4 is run again from slot 0), so greedy
tokens are the PyTorch engine's.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptlab.config import ModelConfig
from gptlab.generate import (
    SamplingParams,
    TextGeneration,
    TextOutput,
    check_prompt,
    check_stop,
    kept_window,
    seeded,
)
from gptlab.jax.model import Cache, Params, forward_cached, from_torch, jax_device, jax_dtype, new_cache
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer

MIN_BUCKET = 16


class Sampling(NamedTuple):
    """Each row's sampling settings as arrays (B,), traced: other values never recompile."""

    temperature: jax.Array  # 0 = greedy
    top_k: jax.Array  # 0 = off
    top_p: jax.Array  # 1 = off
    min_p: jax.Array  # 0 = off
    repetition_penalty: jax.Array  # 1 = off

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> Sampling:
        return cls(
            np.array([p.temperature for p in params], np.float32),
            np.array([min(p.top_k or 0, 2**31 - 1) for p in params], np.int32),  # any k past the vocabulary: all
            np.array([1.0 if p.top_p is None else p.top_p for p in params], np.float32),
            np.array([p.min_p or 0.0 for p in params], np.float32),
            np.array([p.repetition_penalty for p in params], np.float32),
        )


class State(NamedTuple):
    """Everything a decode step reads and writes, on the device."""

    cache: Cache
    lengths: jax.Array  # (B,) filled slots per row
    token: jax.Array  # (B,) each row's newest token, not yet in the cache
    keys: jax.Array  # (B, 2) each row's RNG key data
    seen: jax.Array  # (B, vocab) tokens of the prompt and output, for the repetition penalty


def pick(logits: jax.Array, keys: jax.Array, seen: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """Each row's next token from (B, vocab) logits, as `gptlab.generate.filter_logits` and `sample_next` pick it:
    repetition penalty, then temperature, top-k, top-p and min-p; returns (tokens, the rows' next key data)."""
    logits = logits.astype(jnp.float32)
    p = s.repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / p, logits * p)
    logits = jnp.where(seen & (p != 1.0), penalised, logits)

    def sample(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        V, rows = logits.shape[-1], jnp.arange(logits.shape[0])[:, None]
        scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
        kth = jnp.take_along_axis(-jnp.sort(-scaled, axis=-1), (k - 1)[:, None], axis=-1)
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        order = jnp.argsort(-scaled, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
        drop = (jnp.cumsum(probs, axis=-1) - probs >= s.top_p[:, None]) & (s.top_p[:, None] < 1.0)
        scaled = jnp.where(jnp.zeros_like(drop).at[rows, order].set(drop), -jnp.inf, scaled)
        probs = jax.nn.softmax(scaled, axis=-1)
        scaled = jnp.where(probs < s.min_p[:, None] * probs.max(axis=-1, keepdims=True), -jnp.inf, scaled)
        pairs = jax.vmap(lambda k: jax.random.split(jax.random.wrap_key_data(k)))(keys)  # (B, 2) keys
        drawn = jax.vmap(jax.random.categorical)(pairs[:, 1], scaled)
        tokens = jnp.where(s.temperature > 0, drawn, jnp.argmax(logits, axis=-1))
        return tokens.astype(jnp.int32), jax.random.key_data(pairs[:, 0])

    def greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), keys

    return jax.lax.cond(jnp.all(s.temperature == 0), greedy, sample, logits)


def bucket(n: int, limit: int) -> int:
    """The padded width of a prompt of n tokens: the next power of two (at least MIN_BUCKET), at most `limit`."""
    return min(limit, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


class JaxGenerator(TextGeneration):
    """Generates continuations with a JAX GPT (token ids, or text as `gptlab.generate.Generator` gives it); `traces`
    counts how often each jitted function was compiled."""

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Tokenizer | None = None, dtype: Any = None):
        self.params, self.cfg, self.tokenizer = params, cfg.resolved(), tokenizer
        self.end_ids: Sequence[int] | None = None  # as `Generator`'s: None is the tokenizer's end of text
        self.block_size = self.cfg.block_size
        if self.block_size < 2:
            raise ValueError("generation needs a context (model.block_size) of at least 2 tokens")
        self.keep = kept_window(self.block_size)  # as the engine's, so greedy tokens are the same past the context
        self.dtype = dtype or jnp.float32
        if self.dtype != jnp.float32:  # kept in the compute dtype: no cast of every weight at every step
            self.params = jax.tree.map(lambda a: a.astype(self.dtype), params)
        self.traces: Counter[str] = Counter()
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn, donate_argnums=1)
        self._refill = jax.jit(self._refill_fn, donate_argnums=1)

    @classmethod
    def from_torch(
        cls, model: GPT, tokenizer: Tokenizer | None = None, device: str = "auto", dtype: str = "auto"
    ) -> JaxGenerator:
        """A generator of a PyTorch model's weights, on a JAX device ("auto", "cpu", "cuda", "cuda:N") in a
        compute dtype ("auto": bf16 on a GPU, else fp32; "float32"; "bfloat16")."""
        where = jax_device(device)
        return cls(jax.device_put(from_torch(model), where), model.cfg, tokenizer, jax_dtype(dtype, where))

    # ----- the jitted parts -------------------------------------------------------------------------------------
    def _prefill_fn(self, params: Params, ids: jax.Array, lens: jax.Array, seeds: jax.Array, s: Sampling) -> State:
        """Run right-padded prompts (B, P) from slot 0 into a fresh cache and pick each row's first new token."""
        self.traces["prefill"] += 1  # runs only while tracing, i.e. once per compilation
        B, P = ids.shape
        cache = new_cache(self.cfg, B, self.block_size, self.dtype)
        slots = jnp.broadcast_to(jnp.arange(P), (B, P))
        logits, cache = forward_cached(params, self.cfg, ids, slots, cache, lens - 1, self.dtype)
        rows = jnp.arange(B)[:, None]
        V = self.cfg.vocab_size  # padding is marked at index V, out of range: dropped
        seen = jnp.zeros((B, V), bool).at[rows, jnp.where(slots < lens[:, None], ids, V)].set(True, mode="drop")
        keys = jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(jax.random.key(s[0]), s[1])))(seeds)
        token, keys = pick(logits[:, 0], keys, seen, s)
        return State(cache, lens, token, keys, seen.at[rows[:, 0], token].set(True))

    def _decode_fn(self, params: Params, state: State, active: jax.Array, s: Sampling) -> State:
        """Feed each active row's newest token and pick its next; other rows are left as they are."""
        self.traces["decode"] += 1
        B = state.token.shape[0]
        slots = jnp.minimum(state.lengths, self.block_size - 1)[:, None]  # an inactive full row writes nowhere used
        logits, cache = forward_cached(params, self.cfg, state.token[:, None], slots, state.cache, None, self.dtype)
        token, keys = pick(logits[:, 0], state.keys, state.seen, s)
        token = jnp.where(active, token, state.token)
        keys = jnp.where(active[:, None], keys, state.keys)
        seen = state.seen.at[jnp.arange(B), jnp.where(active, token, self.cfg.vocab_size)].set(True, mode="drop")
        return State(cache, state.lengths + active, token, keys, seen)

    def _refill_fn(self, params: Params, state: State, row: jax.Array, ids: jax.Array, n: jax.Array, s: Sampling):
        """Run one row's slid window (1, R), n real tokens, from slot 0 into its cache rows and pick its next token."""
        self.traces["refill"] += 1
        R = ids.shape[1]
        fresh = new_cache(self.cfg, 1, self.block_size, self.dtype)
        logits, fresh = forward_cached(params, self.cfg, ids, jnp.arange(R)[None], fresh, n[None] - 1, self.dtype)
        cache = tuple(jax.lax.dynamic_update_slice(c, f, (0, row, 0, 0, 0)) for c, f in zip(state.cache, fresh))
        one = Sampling(*(a[row][None] for a in s))
        token, key = pick(logits[:, 0], state.keys[row][None], state.seen[row][None], one)
        return State(
            cache,
            state.lengths.at[row].set(n),
            state.token.at[row].set(token[0]),
            state.keys.at[row].set(key[0]),
            state.seen.at[row, token[0]].set(True),
        )

    # ----- the host loop ----------------------------------------------------------------------------------------
    def _rows(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: Sequence[SamplingParams],
        eos_id: int | Sequence[int] | None,
        truncate: bool,
    ) -> _Batch:
        if not prompts:
            raise ValueError("give at least one prompt")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        windows = [check_prompt(prompt, self.block_size, truncate) for prompt in prompts]
        for p in params:
            p.check()
        return _Batch(self, windows, max_new_tokens, list(params), eos_id)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        truncate: bool = False,
    ) -> list[list[int]]:
        """New tokens for each prompt, all in one batch (stopping after `eos_id`, which is not returned); as
        `gptlab.generate.Generator.generate`, with seed + i for prompt i."""
        params = seeded(SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed), len(prompts))
        batch = self._rows(prompts, max_new_tokens, params, eos_id, truncate)
        while not batch.done:
            batch.step()
        return [row.out for row in batch.rows]

    def _pieces(
        self,
        prompt: str | Sequence[int],
        params: list[SamplingParams],
        max_new_tokens: int,
        stop: Sequence[str],
        truncate: bool,
    ) -> Iterator[list[str]]:
        tokenizer, stop = self._text_tokenizer(), check_stop(stop)
        ends = self.end_ids if self.end_ids is not None else tokenizer.eos_id
        batch = self._rows([self._ids(prompt)] * len(params), max_new_tokens, params, ends, truncate)
        outputs = [TextOutput(tokenizer, stop) for _ in params]
        while not batch.done:
            texts = []
            for b, (token, finished) in enumerate(batch.step()):
                text = ""
                if token is not None or finished:
                    text, stopped = outputs[b].push(token, final=finished)
                    if stopped:
                        batch.finish(b)
                texts.append(text)
            yield texts


@dataclass
class _Row:
    window: list[int]  # the tokens in context: the cache's, then the newest
    out: list[int] = field(default_factory=list)
    done: bool = False
    slide: bool = False  # the window outgrew the context: run its last 3/4 again before the next token


class _Batch:
    """One batch of prompts being generated: `step()` gives every row's next token until `done`."""

    def __init__(
        self,
        gen: JaxGenerator,
        windows: list[list[int]],
        max_new_tokens: int,
        params: list[SamplingParams],
        eos_id: int | Sequence[int] | None,
    ) -> None:
        self.gen, self.max_new_tokens = gen, max_new_tokens
        self.end_ids = frozenset([eos_id] if isinstance(eos_id, int) else eos_id or ())
        self.rows = [_Row(w) for w in windows]
        self.sampling = Sampling.of(params)
        seeds = [(p.seed if p.seed is not None else secrets.randbits(64)) % 2**64 for p in params]  # negative too
        self.seeds = np.array([[s & 0xFFFFFFFF, s >> 32] for s in seeds], np.uint32)  # 64 bits as two halves
        self.state: State | None = None
        self.done = max_new_tokens == 0

    def finish(self, b: int) -> None:
        """Stop row b (its output hit a stop string)."""
        self.rows[b].done = True
        self.done = all(r.done for r in self.rows)

    def step(self) -> list[tuple[int | None, bool]]:
        """One forward: each row's (new token or None, whether the row is now finished)."""
        g, rows = self.gen, self.rows
        was_done = [r.done for r in rows]
        if self.state is None:
            lens = np.array([len(r.window) for r in rows], np.int32)
            ids = np.zeros((len(rows), bucket(int(lens.max()), g.block_size)), np.int32)
            for b, r in enumerate(rows):
                ids[b, : len(r.window)] = r.window
            self.state = g._prefill(g.params, ids, lens, self.seeds, self.sampling)
        else:
            for b, r in enumerate(rows):
                if r.slide and not r.done:
                    ids = np.zeros((1, bucket(len(r.window), g.block_size)), np.int32)
                    ids[0, : len(r.window)] = r.window
                    self.state = g._refill(
                        g.params, self.state, np.int32(b), ids, np.int32(len(r.window)), self.sampling
                    )
            active = np.array([not r.done and not r.slide for r in rows])
            self.state = g._decode(g.params, self.state, active, self.sampling)
        tokens = np.asarray(self.state.token).tolist()
        updates: list[tuple[int | None, bool]] = []
        for r, token, skip in zip(rows, tokens, was_done):
            if skip:
                updates.append((None, False))
                continue
            r.slide = False
            if token in self.end_ids:
                r.done = True
                updates.append((None, True))
                continue
            r.out.append(token)
            r.window.append(token)
            if len(r.window) > g.block_size:
                r.window, r.slide = r.window[-g.keep :], True
            r.done = len(r.out) >= self.max_new_tokens
            updates.append((token, r.done))
        self.done = all(r.done for r in rows)
        return updates
