import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.generate import Generator, sample_next
from gptlab.model import GPT


def tiny(arch: str = "modern") -> GPT:
    """A random model with weights scaled up, so its next token depends on the whole context."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_cached_greedy_equals_uncached_greedy_also_past_the_context(arch):
    gen = Generator(tiny(arch))
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
    assert sample_next(logits, temperature=1.0, top_k=1).item() == 3
    # the top token holds ~64% of the mass: top_p 0.5 keeps it alone
    assert sample_next(logits, temperature=1.0, top_p=0.5).item() == 3
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(50)}
    assert picks == {2, 3}


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="longer than the context of 16"):
        Generator(tiny()).generate([list(range(17))], 3)
