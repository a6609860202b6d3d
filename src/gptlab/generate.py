"""Generation with a KV cache: one continuous-batching engine behind `gptlab sample`, the server and Python users.

`Engine` keeps a batch of running requests, each a row of one preallocated KV cache. Every `step()` is one
model forward: new requests' prompts and the running rows' last tokens go in together (rows right-padded
to the widest; padding lands in a spare cache slot no real token attends to), so requests join and leave
between decode steps; a step of one new token per row goes through `decode.Decoder`, the model's math without
module overhead. Generation past the context keeps a sliding window per row: when a row's window is
full it is cut to its last 3/4 of the context and fed again from position 0 in the next step. The
uncached path (`use_cache=False`) runs each row's whole window instead and gives the same tokens; a row's
tokens never depend on the other rows of its batch.

Text comes out incrementally: never half of a multi-byte character, and never text that could still turn
out to begin a stop string, so a streamed result is exactly the non-streamed one.
"""

from __future__ import annotations

import codecs
import itertools
import numbers
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gptlab import threads
from gptlab.config import sampling_problem
from gptlab.decode import Decoder
from gptlab.errors import GptlabError
from gptlab.model import GPT, KVCache
from gptlab.tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # drop tokens below min_p times the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (as HF)
    seed: int | None = None
    # what is reported besides the tokens (as vLLM's SamplingParams): each new token's log-probability and its
    # `logprobs` likeliest alternatives; with `prompt_logprobs`, the same for each prompt token (from one forward)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first value a sampler cannot honour."""
        problem = sampling_problem(
            self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, self.seed
        )
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]}")
        for name in ("logprobs", "prompt_logprobs"):
            if (n := getattr(self, name)) is not None and n < 0:
                raise ValueError(f"{name} must be 0 or more, got {n}")


def filter_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, vocab) logits after repetition penalty, temperature, top-k, top-p and min-p (dropped = -inf)."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        picked = logits.gather(-1, seen)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits = logits.scatter(-1, seen, picked)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] and its `top` likeliest tokens, from (N, vocab) logits.

    The model's own distribution: log_softmax of the raw logits, before temperature, repetition penalty and
    top-k/top-p/min-p (what OpenAI reports, and vLLM by default: logprobs_mode "raw_logprobs"), so a token's
    score is the same however it was sampled, and equals what a forward over the text gives.
    """
    logp = logits.float().log_softmax(dim=-1)
    picked = logp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    k = min(top, logp.shape[-1])
    if k == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, picked, strict=True)]
    values, ids = logp.topk(k, dim=-1)
    return [
        TokenLogprob(t, lp, tuple(zip(i, v, strict=True)))
        for t, lp, i, v in zip(tokens, picked, ids.tolist(), values.tolist(), strict=True)
    ]


SCORE_LOGITS = 2**25  # logits a prompt-scoring forward may hold (128 MiB in fp32): long prompts go a few at a time


def kept_window(block_size: int) -> int:
    """How many tokens of a row's window are kept, and run again from slot 0, when it outgrows the context."""
    return max(2, block_size * 3 // 4)


def check_prompt(prompt: Sequence[int], block_size: int, truncate: bool) -> list[int]:
    """A prompt's token ids, refused when empty, or when longer than the context unless `truncate` keeps its end."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt is empty: it needs at least one token")
    if len(prompt) > block_size:
        if not truncate:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than the context of {block_size}")
        prompt = prompt[-block_size:]
    return prompt


def check_stop(stop: str | Sequence[str]) -> list[str]:
    """Stop strings as a list (one may be given alone); an empty one is refused."""
    stop = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stop):
        raise ValueError("a stop string is empty")
    return stop


def seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The settings of n samples: with a seed, sample i uses seed + i, so equal prompts give different samples."""
    return [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(n)]


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token id per row from (B, vocab) logits (`seen`: ids the repetition penalty applies to)."""
    logits = filter_logits(logits, params, seen)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the likeliest tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, log-probability), likeliest first


@dataclass
class Update:
    """What one step did for one request: its new tokens and text, and whether it is done."""

    id: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string), "length", "cancelled"
    # with params.logprobs: an entry per token picked in this update, the end token that stopped it included
    logprobs: list[TokenLogprob] | None = None
    # with params.prompt_logprobs, in a request's first update: one per prompt token (the first has none: None)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop_at_eos: bool
    generator: torch.Generator | None
    window: list[int] = field(default_factory=list)  # the tokens in context: what the cache holds, and `feed`
    feed: list[int] = field(default_factory=list)  # tokens the next forward must run for this row
    out: list[int] = field(default_factory=list)
    text: TextOutput | None = None  # the output's text, with a tokenizer
    cancelled: bool = False


class TextOutput:
    """The text of one output as its tokens arrive: whole characters only, and nothing that may still turn out
    to begin a stop string; cut at the earliest stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # decoded output so far (complete characters only)
        self.sent = 0  # characters of `text` already handed out
        # the output's bytes so far, for byte-level and character tokenizers: the exact incremental UTF-8 decode
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tokenizer.token_bytes() is not None else None

    def push(self, token: int | None, final: bool) -> tuple[str, bool]:
        """Add a token (None: no more, as at end-of-text); return the text now safe to hand out, and whether a
        stop string ended the output."""
        if token is not None:
            self.tokens.append(token)
        self._decode(token, final)
        cuts = [at for s in self.stop if (at := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if cuts:  # the earliest stop string wins, never cutting a special token in two
            self.text = self.text[: max(self.sent, self._outside_specials(min(cuts)))]
        held = 0 if final or cuts else max((_overlap(self.text, s) for s in self.stop), default=0)  # may begin a stop
        text, self.sent = self.text[self.sent : len(self.text) - held], max(self.sent, len(self.text) - held)
        return text, bool(cuts)

    def _outside_specials(self, cut: int) -> int:
        """`cut`, or the start of the special token whose text it would cut inside."""
        start = 0
        for i, piece in enumerate(self.tokenizer.split_specials(self.text)):
            if i % 2 and start < cut < start + len(piece):  # odd pieces are special tokens
                return start
            start += len(piece)
            if start >= cut:
                break
        return cut

    def _decode(self, token: int | None, final: bool) -> None:
        """Extend `text` with the characters the output now holds whole (all of it when `final`)."""
        if self.utf8 is not None:
            table = self.tokenizer.token_bytes()
            assert table is not None
            data = table[token] if token is not None and token < len(table) else b""
            self.text += self.utf8.decode(data, final=final)
            return
        # any other tokenizer: decode it all again, waiting while the end is an incomplete character
        full = self.tokenizer.decode(self.tokens)
        if final or not full.endswith(REPLACEMENT):
            self.text = full


class Engine:
    """Continuous batching over one model: `submit` requests, call `step` until `has_work()` is False."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 32,
        eos_id: int | Sequence[int] | None = None,
        use_cache: bool = True,
        compile: bool | Decoder = False,
    ) -> None:
        """`compile`: decode steps through torch.compile (`decode.CompiledStep`: seconds to compile, then faster
        steps), or a `Decoder` to reuse, e.g. one already compiled for this model."""
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = model.cfg.block_size
        if self.block_size < 2:
            raise ValueError("generation needs a context (model.block_size) of at least 2 tokens")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.keep = kept_window(self.block_size)
        self.max_batch = max_batch
        # the ids that end a request (a model may have several: end of text, end of turn); never shown as text
        ends = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else None)
        self.end_ids = frozenset(int(i) for i in ([ends] if isinstance(ends, numbers.Integral) else ends or ()))
        self.use_cache = use_cache
        self.running: list[_Request] = []  # row b of the cache is running[b]
        self.waiting: deque[_Request] = deque()
        self.scoring: deque[_Request] = deque()  # requests whose prompt is scored first (params.prompt_logprobs)
        self.cache: KVCache | None = None
        self.forward_calls = 0
        self._ids = itertools.count()
        # decode steps (one new token per row) skip the modules; the decoder follows changes to the weights
        if isinstance(compile, Decoder):
            if compile.model is not model:
                raise ValueError("the Decoder given as `compile` was made for another model")
            self.decoder: Decoder | None = compile if use_cache else None
        else:
            self.decoder = Decoder(model, compile) if use_cache and Decoder.covers(model) else None
        self._finished_early: list[Update] = []
        # torch's CPU threads in the thread that steps (serve's engine thread): --threads N, or timed (threads.py)
        # (not with a compiled step: torch.compile specialises its code to the thread count, and compiles anew for
        # each count it meets, seconds a time)
        compiled = self.decoder is not None and self.decoder.compile
        self.threads = threads.governor(adaptive=self.device.type == "cpu" and not compiled)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.scoring)

    def has_work(self) -> bool:
        """Whether a `step()` would do anything."""
        return bool(self.running or self.waiting or self.scoring or self._finished_early)

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        stop_at_eos: bool = True,
        truncate: bool = False,
    ) -> int:
        """Queue a request; return its id. A prompt longer than the context is refused, or cut on the left."""
        params.check()
        prompt = check_prompt(prompt, self.block_size, truncate)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        stop = check_stop(stop)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        req = _Request(next(self._ids), prompt, max_new_tokens, params, stop_at_eos, generator)
        if self.tokenizer is not None:
            req.text = TextOutput(self.tokenizer, stop)
        if params.prompt_logprobs is not None:  # scored by a forward of its own, which also picks its first token
            self.scoring.append(req)
        elif max_new_tokens == 0:
            self._finished_early.append(Update(req.id, [], "", True, "length"))
        else:
            req.window, req.feed = list(prompt), list(prompt)
            self.waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        """Drop a waiting or running request; its row is freed at the next step."""
        for req in itertools.chain(self.scoring, self.waiting, self.running):
            if req.id == request_id:
                req.cancelled = True

    @torch.inference_mode()  # no autograd bookkeeping at all: measurably less overhead per op than no_grad
    def step(self) -> list[Update]:
        """One model forward: admit waiting requests, run every row, pick each row's next token."""
        updates, self._finished_early = self._finished_early, []
        cancelled = [r for r in itertools.chain(self.scoring, self.waiting, self.running) if r.cancelled]
        self.scoring = deque(r for r in self.scoring if not r.cancelled)
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self._leave([b for b, r in enumerate(self.running) if r.cancelled])
        updates += [Update(r.id, [], "", True, "cancelled") for r in cancelled]
        if self.scoring:
            updates += self._score()
        joined = []
        while self.waiting and len(self.running) + len(joined) < self.max_batch:
            joined.append(self.waiting.popleft())
        if joined and self.use_cache:
            fresh = self.model.new_cache(len(joined), max_len=self.block_size + 1)  # + the padding slot
            self.cache = fresh if self.cache is None else self.cache.extend(fresh)
        self.running += joined
        if not self.running:
            return updates
        # timed by batch size, decode steps only: a probe must be compared with steps doing the same work
        with self.threads.unit(None if joined else len(self.running)):
            logits = self._forward()
        tokens = self._pick(logits)
        scored = self._logprobs(logits, self.running, tokens)
        done: list[int] = []
        for b, (req, token) in enumerate(zip(self.running, tokens, strict=True)):
            update = self._advance(req, token)
            if b in scored:
                update.logprobs = [scored[b]]
            updates.append(update)
            if update.finished:
                done.append(b)
        self._leave(done)
        return updates

    def _logprobs(self, logits: torch.Tensor, rows: list[_Request], tokens: list[int]) -> dict[int, TokenLogprob]:
        """The picked tokens' log-probabilities of the rows that ask for them (none computed for the others)."""
        wanted = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return {}
        top = max(rows[b].params.logprobs or 0 for b in wanted)
        entries = token_logprobs(logits[wanted], [tokens[b] for b in wanted], top)
        return {b: replace(e, top=e.top[: rows[b].params.logprobs]) for b, e in zip(wanted, entries, strict=True)}

    def _score(self) -> list[Update]:
        """Score waiting prompts (params.prompt_logprobs) in one uncached forward, and pick their first token.

        A request done then (max_new_tokens 0 or 1, as lm-eval's scoring requests) never takes a cache row;
        the others join the batch to generate the rest. Rows are right-padded, which causal attention never sees.
        """
        vocab = self.model.cfg.vocab_size
        group: list[_Request] = []
        width = 0
        while self.scoring and len(group) < self.max_batch:
            wider = max(width, len(self.scoring[0].prompt))
            if group and (len(group) + 1) * wider * vocab > SCORE_LOGITS:
                break
            group.append(self.scoring.popleft())
            width = wider
        ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for b, req in enumerate(group):
            ids[b, : len(req.prompt)] = torch.tensor(req.prompt, dtype=torch.long)
        self.forward_calls += 1
        with self.threads.unit(None):
            logits = self.model(ids)
        updates = []
        for b, req in enumerate(group):
            n = len(req.prompt)
            scored = token_logprobs(logits[b, : n - 1], req.prompt[1:], req.params.prompt_logprobs or 0)
            prompt_logprobs: list[TokenLogprob | None] = [None, *scored]
            if req.max_new_tokens == 0:
                updates.append(Update(req.id, [], "", True, "length", prompt_logprobs=prompt_logprobs))
                continue
            last = logits[b, n - 1 : n]
            token = self._pick(last, [req])[0]
            req.window = list(req.prompt)
            update = self._advance(req, token)
            update.prompt_logprobs = prompt_logprobs
            if req.params.logprobs is not None:
                update.logprobs = [self._logprobs(last, [req], [token])[0]]
            updates.append(update)
            if not update.finished:
                req.feed = list(req.window)  # nothing of it is cached yet: the row's first forward runs it all
                self.waiting.append(req)
        return updates

    def _forward(self) -> torch.Tensor:
        """Last-position logits (B, vocab) of every running row, from one model call."""
        rows = self.running
        if self.use_cache and all(len(r.feed) == 1 for r in rows):  # the common step: one new token per row
            assert self.cache is not None
            ids = torch.tensor([r.feed[0] for r in rows], device=self.device)
            self.forward_calls += 1
            if self.decoder is not None and self.decoder.current():
                logits = self.decoder(ids, self.cache)  # each row writes at its length
            else:
                logits = self.model(ids[:, None], cache=self.cache, last_only=True)[:, 0]
            self.cache.advance(1)
            return logits
        feeds = [r.feed if self.use_cache else r.window for r in rows]
        lens = torch.tensor([len(f) for f in feeds], device=self.device)
        width = max(len(f) for f in feeds)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, f in enumerate(feeds):
            ids[b, : len(f)] = torch.tensor(f, dtype=torch.long)
        self.forward_calls += 1
        if not self.use_cache:
            return self.model(ids, logits_at=lens - 1)[:, 0]
        assert self.cache is not None
        starts = torch.tensor([len(r.window) - len(r.feed) for r in rows], device=self.device)
        self.cache.lengths.copy_(starts)  # a row fed its whole window again starts over at slot 0
        offsets = torch.arange(width, device=self.device)
        slots = torch.where(offsets < lens[:, None], starts[:, None] + offsets, self.block_size)  # padding: spare
        logits = self.model(ids, positions=slots, cache=self.cache, logits_at=lens - 1)[:, 0]
        self.cache.advance(lens)
        return logits

    def _pick(self, logits: torch.Tensor, rows: list[_Request] | None = None) -> list[int]:
        """Each row's next token (of `rows`, by default the running ones), with its own sampling settings and
        random generator."""
        rows = self.running if rows is None else rows
        simple = [b for b, r in enumerate(rows) if r.params.temperature == 0 and r.params.repetition_penalty == 1.0]
        if len(simple) == len(rows):  # all greedy
            return logits.argmax(dim=-1).tolist()
        tokens = [0] * len(rows)
        if simple:
            for b, t in zip(simple, logits[simple].argmax(dim=-1).tolist(), strict=True):
                tokens[b] = t
        for b, req in enumerate(rows):
            if b in simple:
                continue
            seen = None
            if req.params.repetition_penalty != 1.0:
                seen = torch.tensor([sorted(set(req.prompt + req.out))], device=logits.device)
            tokens[b] = int(sample_next(logits[b : b + 1], req.params, req.generator, seen))
        return tokens

    def _advance(self, req: _Request, token: int) -> Update:
        """Record a row's new token: its text, stop checks, and the window it feeds next."""
        end = token in self.end_ids
        eos = req.stop_at_eos and end
        if not eos:
            req.out.append(token)
            req.window.append(token)
            req.feed = [token]
            if len(req.window) > self.block_size:  # the window slides: feed its last 3/4 again from slot 0
                req.window = req.window[-self.keep :]
                req.feed = list(req.window)
        tokens = [] if eos else [token]
        reason = "stop" if eos else "length" if len(req.out) >= req.max_new_tokens else None
        if req.text is None:
            return Update(req.id, tokens, "", reason is not None, reason)
        text, stopped = req.text.push(None if end else token, final=reason is not None)
        reason = "stop" if stopped else reason
        return Update(req.id, tokens, text, reason is not None, reason)

    def _leave(self, rows: list[int]) -> None:
        """Remove finished or cancelled rows from the batch and the cache."""
        if not rows:
            return
        gone = set(rows)
        keep = [b for b in range(len(self.running)) if b not in gone]
        self.running = [self.running[b] for b in keep]
        if self.cache is not None:
            if keep:
                self.cache.select(keep)
            else:
                self.cache = None


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _updates(engine: Engine) -> Iterator[Update]:
    """Every update of an engine's requests, stepping it until it is idle."""
    while engine.has_work():
        yield from engine.step()


def prompt_text(start: str) -> str:
    """A prompt as given to `gptlab sample --start` or sample.start: the text itself, or a file's for FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[5:])
    if not path.is_file():
        raise GptlabError(f"prompt file '{path}' not found", "check the path after FILE:")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"prompt file '{path}' is not UTF-8 text (byte {e.start})", "convert it to UTF-8") from e


class TextGeneration:
    """The text side of a generator, shared by `Generator` and the JAX one: a streamed continuation of a prompt, or
    a batch of them, from `_pieces`, which each generator implements. A text prompt is plain text (special tokens'
    text is not matched); a prompt with special tokens comes as ids, `tokenizer.encode(text, allow_special=True)`."""

    tokenizer: Tokenizer | None
    end_ids: Sequence[int] | None  # the ids that end text generation; None: the tokenizer's end of text

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        truncate: bool = False,
    ) -> Iterator[str]:
        """Yield the text of one continuation as it is produced (stopping at end-of-text or a stop string)."""
        yield from (texts[0] for texts in self._pieces(prompt, [params], max_new_tokens, stop, truncate) if texts[0])

    def texts(
        self,
        prompt: str | Sequence[int],
        num_samples: int,
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        truncate: bool = False,
    ) -> list[str]:
        """`num_samples` continuations of one prompt, made in one batch; with a seed, sample i uses seed + i."""
        out = [""] * num_samples
        for texts in self._pieces(prompt, seeded(params, num_samples), max_new_tokens, stop, truncate):
            out = [a + b for a, b in zip(out, texts)]
        return out

    def complete(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        truncate: bool = False,
    ) -> str:
        """The text of one continuation, whole (the streamed pieces joined)."""
        return "".join(self.stream(prompt, max_new_tokens, params, stop, truncate))

    def _pieces(
        self,
        prompt: str | Sequence[int],
        params: list[SamplingParams],
        max_new_tokens: int,
        stop: Sequence[str],
        truncate: bool,
    ) -> Iterator[list[str]]:
        """Each step's new text of every row: continuations of one prompt, row i with `params[i]`."""
        raise NotImplementedError

    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"text generation needs the generator's tokenizer: {type(self).__name__}(..., tokenizer)")
        return self.tokenizer

    def _ids(self, prompt: str | Sequence[int]) -> Sequence[int]:
        if isinstance(prompt, str):  # text a user typed: it cannot smuggle in special tokens (see the class)
            return self._text_tokenizer().encode(prompt, allow_special=False)
        return prompt


class Generator(TextGeneration):
    """Generates continuations of prompts with one model: batches of token ids, or streamed text."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        end_ids: Sequence[int] | None = None,
        compile: bool = False,
    ) -> None:
        """`compile`: decode through torch.compile (see `Engine`), compiled once for all of this generator's calls."""
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self._decoder: Decoder | None = None
        self.end_ids = end_ids  # a run's are `chat.end_token_ids(tokenizer, template, cfg.sample.end_tokens)`
        self.block_size = model.cfg.block_size
        if self.block_size < 2:
            raise ValueError("generation needs a context (model.block_size) of at least 2 tokens")

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _compiled(self) -> bool | Decoder:
        """What the engines get: False, or the one compiled decoder they share."""
        if not self.compile or not Decoder.covers(self.model):
            return False
        if self._decoder is None:
            self._decoder = Decoder(self.model, compile=True)
        return self._decoder

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        truncate: bool = False,
    ) -> list[list[int]]:
        """New tokens for each prompt, all in one batch (stopping after `eos_id`, one id or several, not returned).

        With a seed, prompt i samples with seed + i, so equal prompts give different samples.
        """
        if not prompts:
            raise ValueError("give at least one prompt")
        engine = Engine(self.model, None, len(prompts), eos_id, use_cache, self._compiled())
        ids = []
        each = seeded(SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed), len(prompts))
        for prompt, params in zip(prompts, each):
            ids.append(engine.submit(prompt, max_new_tokens, params, stop_at_eos=eos_id is not None, truncate=truncate))
        out: dict[int, list[int]] = {i: [] for i in ids}
        for u in _updates(engine):
            out[u.id] += u.token_ids
        return [out[i] for i in ids]

    def _pieces(
        self,
        prompt: str | Sequence[int],
        params: list[SamplingParams],
        max_new_tokens: int,
        stop: Sequence[str],
        truncate: bool,
    ) -> Iterator[list[str]]:
        engine = Engine(self.model, self._text_tokenizer(), len(params), self.end_ids, compile=self._compiled())
        ids = self._ids(prompt)
        rows = {engine.submit(ids, max_new_tokens, p, stop=stop, truncate=truncate): b for b, p in enumerate(params)}
        while engine.has_work():
            texts = [""] * len(rows)
            for u in engine.step():
                texts[rows[u.id]] += u.text
            yield texts
