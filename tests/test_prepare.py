"""Sharded, chunked, parallel prepare: ids equal whole-document encoding, byte-identical shards, resume."""

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptlab.cli import main
from gptlab.config import DataConfig, load_config
from gptlab.data import shards as shards_module
from gptlab.data.batches import Batches, file_sha256, load_prepared
from gptlab.data.chunking import is_val_document
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

GPT2_FIXTURES = Path(__file__).resolve().parents[2] / "shared/data/cs336_fixtures/spring2024/tests/fixtures"
SPECIALS = ["<|endoftext|>", "<|e|>", "<|e|><|f|>", "the"]  # one inside a longer one, one an ordinary word


def tricky_documents(n: int = 24, seed: int = 0) -> list[str]:
    """Documents made to hit cut points: blank lines before indented words, space runs, tabs, unicode, specials."""
    rng = random.Random(seed)
    pieces = [
        "the", "king", "there", "\n\n  c", "\n\n", "  ", "\t", " ", "café", "naïve", "日本語", "🙂", "x,y", "it's",
        "<|e|>", "<|e|><|f|>", "<|endoftext|>", "<|e|>x", "a<|e|><|f|>b", "1234", "\r\n", "   \n", "ß",
    ]  # fmt: skip
    docs = []
    for _ in range(n):
        words = [rng.choice(pieces) + rng.choice(["", " ", "  ", "\n", " the "]) for _ in range(rng.randint(20, 120))]
        docs.append("".join(words).strip() or "empty")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def read_split(d, split: str) -> list[int]:
    return np.concatenate(getattr(d, split)).tolist()


KINDS = ["char", "bpe", "wordpiece"] + (["gpt2"] if GPT2_FIXTURES.is_dir() else [])


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_parallel_prepare_gives_the_ids_of_whole_documents(tmp_path, kind):
    docs = tricky_documents()
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    gpt2_dir = None
    if kind == "gpt2":
        gpt2_dir = tmp_path / "gpt2"
        gpt2_dir.mkdir()
        (gpt2_dir / "vocab.json").write_bytes((GPT2_FIXTURES / "gpt2_vocab.json").read_bytes())
        (gpt2_dir / "merges.txt").write_bytes((GPT2_FIXTURES / "gpt2_merges.txt").read_bytes())
    data = DataConfig(
        source=str(source), dir=str(tmp_path / "d"), tokenizer=kind, vocab_size=400, special_tokens=SPECIALS,
        gpt2_files=str(gpt2_dir) if gpt2_dir else None, split="document", val_fraction=0.3,
        chunk_chars=24, shard_tokens=700, workers=2,
    )  # fmt: skip
    prepare(data, quiet=True)
    d = load_prepared(data.dir)
    tok = d.tokenizer()
    eot = tok.special_ids["<|endoftext|>"]
    for split in ("train", "val"):
        expected = []
        for i, doc in enumerate(docs):
            if is_val_document(i, 0.3) == (split == "val"):
                expected += tok.encode(doc) + [eot]
        assert read_split(d, split) == expected
    assert len(d.train) > 1 and all(len(s) == 700 for s in d.train[:-1])
    # specials keep their own ids: longest first, and "the" is not the ordinary token
    ids = tok.encode("<|e|><|f|>the<|e|>")
    assert ids == [tok.special_ids["<|e|><|f|>"], tok.special_ids["the"], tok.special_ids["<|e|>"]]


def test_tail_split_encodes_train_and_val_text_separately(tmp_path):
    text = "".join(tricky_documents(4, seed=1))
    source = tmp_path / "one.txt"
    source.write_text(text, encoding="utf-8")
    # doc_separator=None: the <|endoftext|> in the text stays in it (tests/test_val_source.py splits at it)
    data = DataConfig(
        source=str(source), dir=str(tmp_path / "d"), tokenizer="bpe", vocab_size=300, chunk_chars=16, doc_separator=None
    )
    prepare(data, quiet=True)
    d = load_prepared(data.dir)
    tok = d.tokenizer()
    raw = text.encode()
    cut = int(len(raw) * 0.9)
    head = raw[:cut].decode("utf-8", errors="ignore")
    assert read_split(d, "train") == tok.encode(head)
    assert read_split(d, "val") == tok.encode(text[len(head) :]) + [tok.special_ids["<|endoftext|>"]]


def test_one_and_two_workers_write_byte_identical_shards(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", tricky_documents(40, seed=2))
    base = DataConfig(source=str(source), tokenizer="bpe", vocab_size=350, split="document", shard_tokens=500)
    for workers in (1, 2):
        prepare(replace(base, dir=str(tmp_path / f"w{workers}"), workers=workers), quiet=True)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len([n for n in names if n.startswith("train_")]) > 2
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


@pytest.mark.parametrize("kind,shard_tokens,crashes", [("bpe", 400, 1), ("char", 100, 3)])
def test_interrupted_prepare_resumes_to_the_same_shards(tmp_path, monkeypatch, kind, shard_tokens, crashes):
    # char: each document is one chunk spanning many shards, and the prepare is cut short again after resuming
    source = write_jsonl(tmp_path / "docs.jsonl", tricky_documents(40, seed=3))
    base = DataConfig(source=str(source), tokenizer=kind, vocab_size=350, split="document", shard_tokens=shard_tokens)
    whole = replace(base, dir=str(tmp_path / "whole"))
    prepare(whole, quiet=True)

    cut = replace(base, dir=str(tmp_path / "cut"))
    real_close = shards_module.ShardWriter._close
    closed = []
    for _ in range(crashes):
        limit = len(closed) + 3

        def crash_on_third(self, next_chunk, skip, limit=limit):
            if len(closed) == limit:  # dies mid-write: the shard's bytes are on disk under a temporary name
                raise KeyboardInterrupt
            closed.append(self.final.name)
            real_close(self, next_chunk, skip)

        monkeypatch.setattr(shards_module.ShardWriter, "_close", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            prepare(cut, quiet=True)
    monkeypatch.setattr(shards_module.ShardWriter, "_close", real_close)
    meta = json.loads((tmp_path / "cut" / "meta.json").read_text())
    listed = [e["file"] for s in ("train", "val") for e in meta["shards"][s]]
    assert not meta["complete"] and sorted(listed) == sorted(closed)
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "cut").iterdir())  # never named as a shard
    with pytest.raises(GptlabError) as e:
        load_prepared(cut.dir)
    assert str(e.value) == (
        f"the prepare of '{cut.dir}' did not finish (run the same `gptlab prepare` again to resume it)"
    )
    assert not prepare(cut, quiet=True).skipped  # resumes after the last listed shard
    for p in (tmp_path / "whole").iterdir():
        assert (tmp_path / "cut" / p.name).read_bytes() == p.read_bytes(), p.name
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )


def test_batches_across_shards_never_cross_a_shard_end(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", tricky_documents(30, seed=4))
    data = DataConfig(source=str(source), dir=str(tmp_path / "d"), tokenizer="char", shard_tokens=300)
    prepare(data, quiet=True)
    d = load_prepared(data.dir)
    assert len(d.train) > 3
    for mode in ("random", "epoch"):
        b = Batches(d.train, 16, 8, mode, seed=5)
        for step in range(20):
            x, y = b.batch(step)
            for start, row in zip(b.starts(step), x):
                shard = int(np.searchsorted(b.bases, start, side="right")) - 1
                offset = start - b.bases[shard]
                assert offset + 17 <= len(d.train[shard])
                assert np.array_equal(row, d.train[shard][offset : offset + 16])
    epoch = Batches(d.train, 16, 4, "epoch", seed=0)
    seen = np.concatenate([epoch.starts(s) for s in range(epoch.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == epoch.steps_per_epoch * 4
    assert epoch.n_blocks == sum((len(s) - 1) // 16 for s in d.train)
    one = np.concatenate(d.train)  # a single shard reads exactly as before
    assert np.array_equal(Batches([one], 16, 8, "random", 1).batch(3)[0], Batches(one, 16, 8, "random", 1).batch(3)[0])


def test_forced_dtype_too_small_and_a_swapped_tokenizer(tmp_path):
    wide = tmp_path / "wide.txt"
    wide.write_text("".join(chr(0x20000 + i) for i in range(70_000)) + " end", encoding="utf-8")
    data = DataConfig(source=str(wide), dir=str(tmp_path / "d"), dtype="uint16")
    with pytest.raises(GptlabError) as e:
        prepare(data, quiet=True)
    assert str(e.value) == (
        "data.dtype=uint16 cannot hold the 70005 token ids of this tokenizer (use data.dtype=uint32 or auto)"
    )
    assert not (tmp_path / "d" / "meta.json").exists()
    assert prepare(replace(data, dtype="auto"), quiet=True).meta["dtype"] == "uint32"

    small = tmp_path / "small.txt"
    small.write_text("abc abd " * 100)
    other = DataConfig(source=str(small), dir=str(tmp_path / "s"))
    prepare(other, quiet=True)
    Tokenizer.train("char", ["abcdx"], 0).save(tmp_path / "s" / "tokenizer.json")
    with pytest.raises(GptlabError) as e:
        load_prepared(other.dir)
    assert str(e.value) == (
        f"'{tmp_path / 's' / 'tokenizer.json'}' does not match the tokenizer the shards in '{other.dir}' were "
        "written with (put back the original tokenizer.json, or run `gptlab prepare --overwrite` again)"
    )


def test_config_refuses_colliding_specials_and_unknown_kinds():
    with pytest.raises(GptlabError) as e:
        load_config(None, ["data.special_tokens=[<|endoftext|>,<|endoftext|>]"])
    assert str(e.value) == (
        "data.special_tokens has an empty or repeated token: ['<|endoftext|>', '<|endoftext|>'] (list each special once)"
    )
    with pytest.raises(GptlabError) as e:
        load_config(None, ["data.tokenizer=bpee"])
    assert str(e.value) == "data.tokenizer has no option 'bpee' (did you mean 'bpe'?)"
    with pytest.raises(GptlabError) as e:
        load_config(None, ["data.max_words=0"])
    assert str(e.value) == "data.max_words must be at least 1, got 0 (raise it)"


def test_tokenizer_train_and_data_inspect_commands(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "docs.jsonl", tricky_documents(10, seed=5))
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--special", "<|endoftext|>"]
    assert main([*args, "--out", str(out), "--quiet", str(corpus)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'tokenizer.json'}"
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    text = "the king's  café\n\n  c<|endoftext|>"
    assert hf(text)["input_ids"] == Tokenizer.load(out / "tokenizer.json").encode(text)

    data_dir = tmp_path / "d"
    over = [f"data.source={corpus}", f"data.dir={data_dir}", f"data.tokenizer={out / 'tokenizer.json'}"]
    assert main(["prepare", *over, "data.shard_tokens=500", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(data_dir), "--windows", "2", "--tokens", "12"]) == 0
    report = capsys.readouterr().out
    meta = json.loads((data_dir / "meta.json").read_text())
    for entry in meta["shards"]["train"] + meta["shards"]["val"]:
        assert f"{entry['file']:<18}{entry['tokens']:>15,}" in report
    assert report.count("--- window") == 2 and "PROBLEM" not in report
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (
        f"error: no prepared data in '{tmp_path / 'nowhere'}' (meta.json missing) "
        f"(run `gptlab prepare` with data.dir={tmp_path / 'nowhere'})\n"
    )
    # a word budget the corpus exceeds gives another tokenizer; a bad one is an error
    assert main([*args, "--out", str(tmp_path / "t2"), "--max-words", "100", "--quiet", str(corpus)]) == 0
    assert file_sha256(tmp_path / "t2" / "tokenizer.json") != file_sha256(out / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "t2" / "tokenizer.json").vocab_size == 300
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "t3"), "--max-words", "0", str(corpus)]) == 2
    assert (
        capsys.readouterr().err
        == "error: --max-words must be at least 1, got 0 (use at least 1; the default is 1,000,000)\n"
    )


@pytest.mark.skipif(not GPT2_FIXTURES.is_dir(), reason="needs GPT-2's vocab.json/merges.txt from ../shared/data")
def test_gpt2_preset_prepares_trains_and_samples_offline(tmp_path, capsys):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 60)
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    (gpt2_dir / "gpt2_vocab.json").write_bytes((GPT2_FIXTURES / "gpt2_vocab.json").read_bytes())
    (gpt2_dir / "gpt2_merges.txt").write_bytes((GPT2_FIXTURES / "gpt2_merges.txt").read_bytes())
    preset = str(Path(__file__).resolve().parents[1] / "configs" / "shakespeare-gpt2.yaml")
    over = [
        f"data.source={corpus}", f"data.dir={tmp_path / 'd'}", f"data.gpt2_files={gpt2_dir}",
        f"train.out_dir={tmp_path / 'run'}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "model.block_size=16", "train.batch_size=2", "train.max_iters=3", "train.eval_interval=3", "train.eval_iters=1",
        "train.device=cpu", "train.compile=false",
    ]  # fmt: skip
    assert main(["prepare", preset, *over, "--quiet"]) == 0
    assert main(["train", preset, *over, "--quiet"]) == 0
    capsys.readouterr()
    assert (
        main(["sample", str(tmp_path / "run"), "--start", "ROMEO:", "--max-new-tokens", "5", "--num-samples", "1"]) == 0
    )
    assert capsys.readouterr().out.startswith("ROMEO:")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2", 50257, 50256)


def test_chunker_never_cuts_empty_chunks_or_a_special_still_arriving():
    from gptlab.data.chunking import Chunker

    char = Tokenizer.train("char", ["abc def<|endoftext|>"], 0)
    bpe = Tokenizer.train("bpe", ["ab cd ef gh " * 50], 300)
    for tok in (char, bpe):
        chunker = Chunker(1, tok)
        pieces = ["ab cd e", "f <|endof", "text|> gh ij", " kl"]
        chunks = [c.text for i, p in enumerate(pieces) for c in chunker.feed(p, 1, i == 3, i == 3, "train")]
        assert "".join(chunks) == "".join(pieces) and all(chunks)
        assert any("<|endoftext|>" in c for c in chunks), chunks  # the special arrived in two pieces, kept whole
