"""A task's exact-match metric: greedy generation on a split's prompts, compared with the answers token for token."""

from __future__ import annotations

import numpy as np
import torch

from gptlab.data.batches import Examples
from gptlab.data.tasks import exact_match
from gptlab.errors import GptlabError
from gptlab.generate import Generator
from gptlab.model import GPT


def check_task_context(examples: dict[str, Examples] | None, block_size: int) -> None:
    """A task's examples must fit the context whole: prompt, answer and end token (inputs are one shorter)."""
    longest = max((int(np.diff(ex.offsets).max()) for ex in (examples or {}).values() if len(ex)), default=0)
    if longest - 1 > block_size:
        raise GptlabError(
            f"model.block_size={block_size} is too short for task examples of {longest} tokens",
            f"set model.block_size={longest - 1}",
        )


def prompts_and_answers(examples: Examples, limit: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """The first `limit` (0 = all) examples split at the loss mask: prompt ids, and answer ids without the end token."""
    n = len(examples) if limit <= 0 else min(limit, len(examples))
    prompts, answers = [], []
    for i in range(n):
        start, end, cut = examples.span(i)
        ids = examples.tokens[start:end].tolist()
        prompts.append(ids[:cut])
        answers.append(ids[cut:-1])  # a task's answer ends with <EOS>, which generation stops at
    return prompts, answers


def greedy_answers(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, batch_size: int = 500
) -> list[list[int]]:
    """Greedy continuations of `prompts` up to `eos_id` (not included), in batches; the model's mode is kept."""
    was_training = model.training
    model.eval()
    try:
        gen, out = Generator(model), []
        for b in range(0, len(prompts), batch_size):
            out += gen.generate(prompts[b : b + batch_size], max_new_tokens, temperature=0.0, eos_id=eos_id)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def task_exact_match(model: GPT, examples: Examples, eos_id: int | None, limit: int = 0) -> float:
    """Exact match of greedy answers on (the first `limit` of) a split: one more token than the longest answer is
    generated, so an answer must end with <EOS> where the true one does to count."""
    prompts, answers = prompts_and_answers(examples, limit)
    predicted = greedy_answers(model, prompts, max(map(len, answers)) + 1, eos_id)
    return exact_match(predicted, answers)
