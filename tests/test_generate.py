import pytest
import torch
from conftest import scaled_model

from gptlab.config import ModelConfig
from gptlab.generate import Engine, Generator, SamplingParams, filter_logits, sample_next
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer


def tiny(arch: str = "modern", vocab_size: int = 40, block_size: int = 16) -> GPT:
    """A random model with weights scaled up, so its next token depends on the whole context."""
    return scaled_model(vocab_size, block_size, arch=arch)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_cached_greedy_equals_uncached_greedy_also_past_the_context(arch, parallel):
    gen = Generator(scaled_model(40, 16, arch=arch, parallel_block=parallel))
    prompts = [[1, 2, 3, 4, 5]]
    # 40 new tokens on a 16-token context: the window slides and is prefilled again several times
    cached = gen.generate(prompts, 40, temperature=0, use_cache=True)
    uncached = gen.generate(prompts, 40, temperature=0, use_cache=False)
    assert cached == uncached and len(cached[0]) == 40


def test_batched_equals_one_by_one():
    gen = Generator(tiny())
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [5]]
    together = gen.generate(prompts, 30, temperature=0)  # 30 tokens on a 16-token context: windows slide
    alone = [gen.generate([p], 30, temperature=0)[0] for p in prompts]
    assert together == alone
    assert len({tuple(t) for t in together}) == 3  # the rows really differ
    # a row that stops early (at an EOS) leaves the batch without changing the others
    eos = together[1][5]
    stopped = gen.generate(prompts, 30, temperature=0, eos_id=eos)
    assert stopped == [gen.generate([p], 30, temperature=0, eos_id=eos)[0] for p in prompts]
    assert any(len(t) < 30 for t in stopped)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    gen = Generator(tiny())
    a = gen.generate([[1, 2]], 20, temperature=1.0, top_k=10, seed=7)
    b = gen.generate([[1, 2]], 20, temperature=1.0, top_k=10, seed=7)
    c = gen.generate([[1, 2]], 20, temperature=1.0, top_k=10, seed=8)
    assert a == b and a != c


def test_stops_at_eos_and_leaves_it_out():
    gen = Generator(tiny())
    greedy = gen.generate([[1, 2]], 10, temperature=0)[0]
    eos = greedy[3]
    stopped = gen.generate([[1, 2]], 10, temperature=0, eos_id=eos)[0]
    assert stopped == greedy[: greedy.index(eos)]


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1)).item() == 3
    # the top token holds ~64% of the mass: top_p 0.5 keeps it alone
    assert sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5)).item() == 3
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g).item() for _ in range(50)}
    assert picks == {2, 3}
    # mass reaching top_p exactly: the smallest prefix that reaches it, as transformers keeps
    halves = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isinf(filter_logits(halves, SamplingParams(top_p=0.5))).tolist() == [[False, True, True]]
    assert torch.isinf(filter_logits(halves, SamplingParams(top_p=0.75))).tolist() == [[False, False, True]]


def test_prompt_longer_than_context_is_refused_or_cut_on_the_left():
    gen = Generator(tiny())
    with pytest.raises(ValueError) as e:
        gen.generate([list(range(17))], 3)
    assert str(e.value) == "the prompt has 17 tokens, more than the context of 16"
    cut = gen.generate([list(range(20))], 5, temperature=0, truncate=True)
    assert cut == gen.generate([list(range(4, 20))], 5, temperature=0)


TEXT = "naïve café — 日本語のテキスト 🙂 the king and the queen.\n" * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train("bpe", [TEXT], 300)


def run(engine: Engine, ids: list[int]) -> dict[int, list]:
    """Step the engine until it is idle; every update of each request, in order."""
    got: dict[int, list] = {i: [] for i in ids}
    while engine.has_work():
        for u in engine.step():
            got[u.id].append(u)
    return got


def text_of(updates: list) -> str:
    return "".join(u.text for u in updates)


def test_batched_logits_equal_one_by_one_within_1e_5():
    model = tiny(block_size=32)
    prompts = [[1, 2, 3], list(range(5, 25)), [9], [4, 4, 4, 4, 4, 4, 4]]

    def logits_of(batch: list[list[int]]) -> list[torch.Tensor]:
        engine, seen = Engine(model, max_batch=8), []
        forward = engine._forward
        engine._forward = lambda: seen.append(forward()) or seen[-1]
        run(engine, [engine.submit(p, 12, SamplingParams(temperature=0)) for p in batch])
        return seen

    together = logits_of(prompts)
    for i, p in enumerate(prompts):
        alone = logits_of([p])
        for step, row in enumerate(alone):
            assert torch.allclose(together[step][i], row[0], atol=1e-5, rtol=0)


def test_requests_joining_a_running_batch_get_their_own_tokens_in_n_plus_8_forwards():
    model, n = tiny(block_size=32), 20
    prompts = [[i + 1] * (i + 1) for i in range(8)]
    alone = [Generator(model).generate([p], n, temperature=0)[0] for p in prompts]
    engine = Engine(model, max_batch=8)
    ids, got = [], {}
    for p in prompts:  # one request joins after each step
        ids.append(engine.submit(p, n, SamplingParams(temperature=0)))
        for u in engine.step():
            got.setdefault(u.id, []).extend(u.token_ids)
    got.update(
        {
            k: got.get(k, []) + v
            for k, v in ((k, sum((u.token_ids for u in us), [])) for k, us in run(engine, ids).items())
        }
    )
    assert [got[i] for i in ids] == alone
    assert engine.forward_calls <= n + 8
    assert engine.num_running == engine.num_waiting == 0 and engine.cache is None


class Scripted(GPT):
    """A GPT (its cache and all) whose greedy choice for row 0 follows a script of token ids."""

    def __init__(self, cfg: ModelConfig, script: list[int]) -> None:
        super().__init__(cfg)
        self.script, self.calls = script, 0

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        logits = super().forward(*args, **kwargs)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits[:, -1, token] = 1e4
        return logits


def scripted(tok: Tokenizer, text: str) -> tuple[Scripted, list[int]]:
    ids = tok.encode(text)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16)
    return Scripted(cfg, ids).eval(), ids


SAID = "the king — café 日本語 🙂🙂 the queen said: the end"


def test_stop_strings_cut_exactly(bpe):
    for stop in ("the queen", "🙂", "é 日", "end", SAID[:1]):
        model, ids = scripted(bpe, SAID)
        engine = Engine(model, bpe)
        rid = engine.submit([0], len(ids), SamplingParams(temperature=0), stop=[stop, "never there"])
        updates = run(engine, [rid])[rid]
        assert text_of(updates) == SAID[: SAID.index(stop)]
        assert updates[-1].finished and updates[-1].finish_reason == "stop"
        assert all(not any(s in u.text for s in (stop,)) for u in updates)


def test_streamed_text_equals_the_whole_and_never_splits_a_character(bpe):
    assert any("\ufffd" in bpe.decode([t]) for t in bpe.encode(SAID))  # some characters span several tokens
    model, ids = scripted(bpe, SAID)
    pieces = list(Generator(model, bpe).stream([0], len(ids), SamplingParams(temperature=0)))
    assert "".join(pieces) == SAID and len(pieces) > 5
    assert all("\ufffd" not in p for p in pieces)
    model, ids = scripted(bpe, SAID)
    assert Generator(model, bpe).complete([0], len(ids), SamplingParams(temperature=0)) == SAID
    # bytes that are not UTF-8 (a random model) still come out once they cannot become a character
    gen = Generator(tiny(vocab_size=bpe.vocab_size, block_size=64), bpe)
    for seed in range(3):
        pieces = list(gen.stream([5], 60, SamplingParams(temperature=1.0, seed=seed)))
        ids = gen.generate([[5]], 60, temperature=1.0, seed=seed)[0]
        # the same characters; only how many U+FFFD mark the bad bytes may differ, decoded in pieces
        assert "".join(pieces).replace("\ufffd", "") == bpe.decode(ids).replace("\ufffd", "")


def test_seeded_sampling_does_not_depend_on_batch_mates():
    model = tiny()
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    alone = Engine(model)
    a = sum((u.token_ids for u in run(alone, [alone.submit([1, 2], 15, params)])[0]), [])
    crowd = Engine(model)
    ids = [crowd.submit([5, 6, 7], 15, SamplingParams(temperature=1.0)), crowd.submit([1, 2], 15, params)]
    b = sum((u.token_ids for u in run(crowd, ids)[ids[1]]), [])
    assert a == b


def test_cancel_frees_the_row():
    engine = Engine(tiny())
    ids = [engine.submit([1, 2], 30, SamplingParams(temperature=0)) for _ in range(3)]
    engine.step()
    engine.cancel(ids[1])
    updates = engine.step()
    assert [u.finish_reason for u in updates if u.id == ids[1]] == ["cancelled"]
    assert engine.num_running == 2 and engine.cache.k.shape[1] == 2


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.9, repetition_penalty=1.5, top_k=20, top_p=0.9),
    ],
)
def test_sampling_filters_match_transformers(params):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )  # fmt: skip

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    seen = torch.tensor([[1, 4, 7, 30]])
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        procs.append(MinPLogitsWarper(params.min_p))
    theirs = procs(seen, logits.clone())
    ours = filter_logits(logits, params, seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    assert torch.allclose(ours[kept], theirs[kept], atol=1e-6)


def test_bad_sampling_values_are_refused():
    engine = Engine(tiny())
    cases = {
        SamplingParams(temperature=-1): "temperature must be a finite number >= 0, got -1",
        SamplingParams(top_k=0): "top_k must be at least 1, got 0",
        SamplingParams(top_p=0): "top_p must be in (0, 1], got 0",
        SamplingParams(min_p=1.5): "min_p must be in [0, 1], got 1.5",
        SamplingParams(repetition_penalty=0): "repetition_penalty must be a finite number > 0, got 0",
    }
    for params, message in cases.items():
        with pytest.raises(ValueError) as e:
            engine.submit([1], 3, params)
        assert str(e.value) == message
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit([], 3)


def byte_id(tok: Tokenizer, data: bytes) -> int:
    return tok.token_bytes().index(data)


def run_script(tok: Tokenizer, ids: list[int], max_new: int, stop: list[str] = ()) -> list:
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16)
    model = Scripted(cfg, ids).eval()
    engine = Engine(model, tok)
    rid = engine.submit([0], max_new, SamplingParams(temperature=0), stop=stop)
    return run(engine, [rid])[rid]


def test_several_stop_strings_cut_at_the_earliest(bpe):
    for stops in (["king", "e king"], ["e king", "king"], ["queen", "k"]):
        updates = run_script(bpe, bpe.encode(SAID), 100, stops)
        assert text_of(updates) == SAID[: min(SAID.index(s) for s in stops)]


def test_held_bytes_come_out_at_the_end_and_stops_still_apply(bpe):
    lead = byte_id(bpe, "日".encode()[:1])
    # end-of-text while a character is incomplete: what is complete comes out, then the bad byte as U+FFFD
    updates = run_script(bpe, [*bpe.encode("the king"), lead, bpe.eos_id], 100)
    assert text_of(updates) == "the king\ufffd" and updates[-1].finish_reason == "stop"
    # max tokens reached with a stop string in text that was held back
    ids = [*bpe.encode("the king"), *bpe.encode(" na"), lead]
    updates = run_script(bpe, ids, len(ids), stop=["na"])
    assert text_of(updates) == "the king " and updates[-1].finish_reason == "stop"
    # a stray byte does not break the 4-byte character after it
    ids = [
        *bpe.encode("ok "),
        byte_id(bpe, b"\x80"),
        *(byte_id(bpe, bytes([b])) for b in "🙂".encode()),
        *bpe.encode(" ok"),
    ]
    updates = run_script(bpe, ids, len(ids))
    assert text_of(updates) == "ok \ufffd🙂 ok" == bpe.decode(ids)
    assert all(u.text.count("\ufffd") <= 1 for u in updates)
