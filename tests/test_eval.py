"""gptlab eval: bits-per-byte, loss and perplexity against hand computations, and HellaSwag-style scoring."""

from __future__ import annotations

import io
import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text, tiny_config

from gptlab.cli import main
from gptlab.data.batches import load_prepared
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.evaluate import (
    HELLASWAG_URL,
    ending_loglikelihoods,
    evaluate_run,
    hellaswag_file,
    load_hellaswag,
    score_choices,
    score_tokens,
)
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

EXTRA = "\nJULIET:\nle café — déjà vu, sweet é.\n"  # multi-byte characters: é is 2 bytes, — is 3
FORMAT = 'each line must be one JSON object with "ctx", "endings" and "label" (HellaSwag\'s format)'


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step run on a char tokenizer whose alphabet has é and —, its data prepared in an absolute data.dir."""
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "corpus.txt").write_text(make_text() + EXTRA * 20)
    cfg = tiny_config(tmp, tmp / "corpus.txt", "train.max_iters=2")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    return Path(cfg.train.out_dir)


def hand_losses(model, ids: list[int]) -> list[float]:
    """Nats of each token after the first: windows of block_size + 1 tokens, each starting on the last one's end."""
    B, out = model.cfg.block_size, []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, B):
            window = ids[s : s + B + 1]
            logp = torch.log_softmax(model(torch.tensor([window[:-1]]))[0].float(), -1)
            out += [-logp[j, window[j + 1]].item() for j in range(len(window) - 1)]
    return out


def test_bits_per_byte_equals_a_hand_computation(run, monkeypatch):
    _, model, tok = load_run(run, "best", "cpu")
    text = "KING:\nthe café — sweet day<|endoftext|>ROMEO:\nlove é night, crown — heart blood sweet fair.\n"
    ids = tok.encode(text)
    assert len(ids) > 3 * model.cfg.block_size  # several windows, the last one short
    nats = hand_losses(model, ids)
    # the scored text is all but the first character; <|endoftext|> counts no bytes
    n_bytes = len(text[1:].replace("<|endoftext|>", "").encode("utf-8"))
    assert n_bytes > len(text[1:]) - len("<|endoftext|>")  # é and — are several bytes each
    got = score_tokens(model, tok, ids, batch_size=2)
    assert (got.tokens, got.bytes) == (len(ids) - 1, n_bytes)
    assert got.loss == pytest.approx(sum(nats) / len(nats), rel=1e-6)
    assert got.perplexity == pytest.approx(math.exp(got.loss), rel=1e-12)
    assert got.bits_per_byte == pytest.approx(sum(nats) / math.log(2) / n_bytes, rel=1e-6)
    # max_tokens: the first 20 predictions only (the same numbers: attention is causal)
    capped = score_tokens(model, tok, ids, max_tokens=20)
    assert (capped.tokens, capped.bytes) == (20, len(tok.decode(ids[1:21]).encode()))
    assert capped.loss == pytest.approx(sum(nats[:20]) / 20, rel=1e-6)
    # a tokenizer without a byte table (a foreign tokenizer.json): bytes of the decoded text, the same here
    monkeypatch.setattr(tok, "token_bytes", lambda: None)
    assert score_tokens(model, tok, ids, batch_size=3).bytes == n_bytes


def test_a_text_file_and_the_prepared_folder_agree_on_the_same_tokens(run, tmp_path):
    cfg, _, tok = load_run(run, "best", "cpu")
    val = np.concatenate(load_prepared(cfg.data.dir).val)
    text = tok.decode(val.tolist())
    assert tok.encode(text) == val.tolist() and text.endswith("<|endoftext|>")
    (tmp_path / "val.txt").write_text(text)
    from_file = evaluate_run(run, data=tmp_path / "val.txt", device="cpu").sections["text"]
    from_folder = evaluate_run(run, data=cfg.data.dir, device="cpu").sections["text"]
    default = evaluate_run(run, device="cpu").sections["text"]  # the run's own data.dir, val split
    assert from_file.split is None and from_folder.split == default.split == "val"
    assert from_file.tokens == from_folder.tokens == default.tokens == len(val) - 1
    assert from_file.bytes == from_folder.bytes == len(text[1:].replace("<|endoftext|>", "").encode())
    # the thread governor adapts to the machine's load, and sums over another thread count round differently
    assert from_file.loss == pytest.approx(from_folder.loss, rel=1e-9)
    assert from_folder.loss == pytest.approx(default.loss, rel=1e-9)
    train = evaluate_run(run, split="train", max_tokens=500, device="cpu").sections["text"]
    assert train.tokens == 500 and train.loss != default.loss


def test_data_of_another_tokenizer_or_sft_examples_is_refused(run, tmp_path):
    (tmp_path / "other.txt").write_text("abc xyz\n" * 300)
    other = tiny_config(tmp_path, tmp_path / "other.txt", f"data.dir={tmp_path / 'other'}")
    prepare(other.data, quiet=True)
    with pytest.raises(GptlabError) as e:
        evaluate_run(run, data=tmp_path / "other", device="cpu")
    assert str(e.value) == (
        f"the data in '{tmp_path / 'other'}' was prepared with another tokenizer than the run '{run}' (give --data "
        f"a text file (it is encoded with the run's tokenizer), or prepare the data with "
        f"data.tokenizer={run / 'tokenizer.json'})"
    )
    rows = [{"prompt": f"KING:\nthe {w}", "response": f" good {w}."} for w in ["king", "queen", "lord"] * 10]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = tiny_config(tmp_path, tmp_path / "sft.jsonl", "data.format=sft", f"data.dir={tmp_path / 'sft'}",
                      f"data.tokenizer={run / 'tokenizer.json'}")  # fmt: skip
    prepare(sft.data, quiet=True)
    with pytest.raises(GptlabError) as e:
        evaluate_run(run, data=tmp_path / "sft", device="cpu")
    assert str(e.value) == (
        f"'{tmp_path / 'sft'}' holds prompt/response examples (data.format=sft), not a text stream (score a text "
        "file or a text prepared folder with --data; an sft run's val_loss is in its metrics.jsonl)"
    )


EXAMPLES = [  # (context, endings): endings of unequal lengths, one context longer than the model's 16 tokens
    ("KING:\nthe", ["king.", "good night day love death sword crown.", "fair", "lord sweet heart blood."]),
    ("ROMEO:\nlove the sweet fair queen of the crown and the", ["day.", "sword", "heart good night.", "é"]),
    ("JULIET: good", ["night sweet love.", "blood", "death fair crown king queen lord.", "day"]),
    ("KING:\nthe queen", ["lord.", "sweet", "good day.", "love"]),
]


def hand_choice_scores(model, tok) -> list[tuple[list[float], list[float]]]:
    """(sums, means) of each ending's log-likelihood, one ending at a time, the context cut on the left."""
    B, out = model.cfg.block_size, []
    with torch.no_grad():
        for ctx, endings in EXAMPLES:
            sums, means = [], []
            for ending in endings:
                end = tok.encode(" " + ending)[:B]  # an ending longer than the context keeps its start
                toks = (tok.encode(ctx) + end)[-(B + 1) :]
                logp = torch.log_softmax(model(torch.tensor([toks[:-1]]))[0].float(), -1)
                ll = [logp[j, toks[j + 1]].item() for j in range(len(toks) - 1 - len(end), len(toks) - 1)]
                sums.append(sum(ll))
                means.append(sum(ll) / len(ll))
            out.append((sums, means))
    return out


def test_hellaswag_accuracy_equals_a_hand_computation(run, tmp_path):
    _, model, tok = load_run(run, "best", "cpu")
    scores = hand_choice_scores(model, tok)
    by_sum = [int(np.argmax(s)) for s, _ in scores]
    by_mean = [int(np.argmax(m)) for _, m in scores]
    disagree = [i for i in range(len(scores)) if by_sum[i] != by_mean[i]]
    agree = [i for i in range(len(scores)) if i not in disagree]
    assert disagree and agree  # the length normalisation changes some picks, not all
    # labels: the mean's pick where the two disagree (acc_norm right, acc wrong), elsewhere right for both once
    labels = [by_mean[i] if i in disagree else (by_sum[i] + (i != agree[0])) % 4 for i in range(len(scores))]
    lines = []
    for i, ((ctx, endings), label) in enumerate(zip(EXAMPLES, labels)):
        row = {"ctx": ctx, "endings": endings, "label": label, "ind": i}
        if i == 2:  # ctx_a + ctx_b where ctx is missing; a label written as text (Hugging Face's copy)
            a, b = ctx.split(" ")
            row = {"ctx_a": a, "ctx_b": b, "endings": endings, "label": str(label)}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    (tmp_path / "hs.jsonl").write_text("".join(lines) + "\n")
    examples = load_hellaswag(tmp_path / "hs.jsonl")
    assert examples[2].ctx == "JULIET: good" and examples[2].label == labels[2]  # the parts joined by a space
    acc = sum(int(np.argmax(s)) == y for (s, _), y in zip(scores, labels)) / 4
    acc_norm = sum(int(np.argmax(m)) == y for (_, m), y in zip(scores, labels)) / 4
    assert acc != acc_norm
    for batch_size in (6, 64):  # one example per forward, or all at once (rows padded to the longest)
        lls = ending_loglikelihoods(model, tok, examples, batch_size=batch_size)
        for (sums, counts), (hand_sums, hand_means) in zip(lls, scores):
            assert sums == pytest.approx(hand_sums, rel=1e-5)
            assert [s / c for s, c in zip(sums, counts)] == pytest.approx(hand_means, rel=1e-5)
        got = score_choices(model, tok, examples, batch_size=batch_size)
        assert (got.n, got.correct, got.acc, got.acc_norm) == (4, acc * 4, acc, acc_norm)


def test_the_hellaswag_download_is_cached_and_offline_says_what_to_do(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    expected = (
        f"could not download HellaSwag from {HELLASWAG_URL} (no network) (offline? download hellaswag_val.jsonl "
        "where there is internet and pass --hellaswag PATH to it)"
    )
    with pytest.raises(GptlabError) as e:
        hellaswag_file()
    assert str(e.value) == expected
    assert main(["eval", str(run), "--hellaswag"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert list((tmp_path / "cache" / "hellaswag").iterdir()) == []  # no temporary file left behind

    row = json.dumps({"ctx": "KING:\nthe", "endings": ["king.", "day"], "label": 0}) + "\n"
    calls = []

    def online(url, timeout):
        calls.append(url)
        return io.BytesIO(row.encode())

    monkeypatch.setattr(urllib.request, "urlopen", online)
    path = hellaswag_file("val")
    assert path == tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl" and path.read_text() == row
    assert hellaswag_file() == path and calls == [HELLASWAG_URL]  # the second time from the cache
    assert main(["eval", str(run), "--hellaswag", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"hellaswag: {path}: n 1, acc " in out and "text:" not in out  # --hellaswag alone: no text score


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "line 2 is not JSON (Expecting property name enclosed in double quotes)"),
        ('{"ctx": "the", "label": 0}', "line 2 has no 'endings'"),
        ('{"ctx": "the", "endings": ["a", "b"], "label": 2}', "line 2: label 2 is not an index of its 2 endings"),
    ],
)
def test_a_malformed_hellaswag_line_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"ctx": "the", "endings": ["a", "b"], "label": 1})
    (tmp_path / "hs.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(GptlabError) as e:
        load_hellaswag(tmp_path / "hs.jsonl")
    assert str(e.value) == f"'{tmp_path / 'hs.jsonl'}' {problem} ({FORMAT})"


def test_text_the_tokenizer_cannot_encode_is_a_user_error(run, tmp_path):
    _, model, tok = load_run(run, "best", "cpu")
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"ctx": "the king", "endings": ["good", "жизнь"], "label": 0}) + "\n")
    with pytest.raises(GptlabError) as e:
        score_choices(model, tok, load_hellaswag(path))
    assert str(e.value) == (
        f"'{path}' line 1: text has characters outside the tokenizer's vocabulary: 'ж', 'з', 'и', 'н', 'ь' "
        "(evaluate a run whose tokenizer covers the text (bpe, gpt2: every byte is a token))"
    )
    (tmp_path / "ru.txt").write_text("the жизнь")
    with pytest.raises(GptlabError) as e:
        evaluate_run(run, data=tmp_path / "ru.txt", device="cpu")
    assert str(e.value).startswith(f"'{tmp_path / 'ru.txt'}': text has characters outside the tokenizer's vocab")
    (tmp_path / "latin1.txt").write_bytes("the café".encode("latin-1"))
    with pytest.raises(GptlabError) as e:
        evaluate_run(run, data=tmp_path / "latin1.txt", device="cpu")
    assert str(e.value) == (
        f"'{tmp_path / 'latin1.txt'}' is not UTF-8 text (unexpected end of data at byte 7) (convert it to UTF-8)"
    )


def test_the_cli_prints_the_numbers_or_json_and_refuses_a_missing_path(run, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("KING:\nthe café — sweet day.\nROMEO:\nlove é night, crown — heart.\n")
    (tmp_path / "hs.jsonl").write_text(json.dumps({"ctx": "KING:\nthe", "endings": ["king.", "day"], "label": 1}))
    want = evaluate_run(run, data=tmp_path / "t.txt", hellaswag=tmp_path / "hs.jsonl", device="cpu")
    text, hs = want.sections["text"], want.sections["hellaswag"]
    args = ["eval", str(run), "--data", str(tmp_path / "t.txt"), "--hellaswag", str(tmp_path / "hs.jsonl")]
    assert main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"text: {tmp_path / 't.txt'}: {text.tokens:,} tokens, {text.bytes:,} bytes" in out
    assert f"loss {text.loss:.4f} nats/token, perplexity {text.perplexity:.3f}, bits-per-byte " in out
    assert f"bits-per-byte {text.bits_per_byte:.4f}" in out
    assert f"hellaswag: {tmp_path / 'hs.jsonl'}: n 1, acc {hs.acc:.4f}, acc_norm {hs.acc_norm:.4f}" in out
    assert main([*args, "--json", "--checkpoint", "latest", "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(want.to_dict()))
    assert got["checkpoint"] == "step_2" and got["text"]["bytes"] == len(
        "ING:\nthe café — sweet day.\n".encode()
    ) + len("ROMEO:\nlove é night, crown — heart.\n".encode())
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err == (
        f"error: data '{tmp_path / 'missing.txt'}' not found (give a UTF-8 text file or a prepared data folder)\n"
    )
