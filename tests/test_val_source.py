"""Data as it comes: a validation file of its own (data.val_source) and .txt documents between <|endoftext|>."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptlab.cli import main
from gptlab.config import DataConfig, load_config
from gptlab.data import sources
from gptlab.data.batches import load_prepared
from gptlab.data.shards import prepare
from gptlab.data.sources import open_source, split_documents
from gptlab.errors import GptlabError

ROOT = Path(__file__).resolve().parents[1]
SEP = "<|endoftext|>"
WORDS = "once upon a time there was a little girl named lily she liked to play with her dog in the park".split()


def stories(n: int, seed: int, marker: str) -> list[str]:
    """Short TinyStories-like documents; each carries `marker`, so a story's file can be told from its text."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))) + f' {marker}.\n"Yes," said {marker}.'
        for _ in range(n)
    ]


def write_stories(path: Path, docs: list[str]) -> Path:
    """TinyStories' .txt layout: each story, then a line holding only the separator."""
    path.write_text("".join(f"{d}\n{SEP}\n" for d in docs), encoding="utf-8")
    return path


def joined(tok, docs: list[str]) -> list[int]:
    """Documents as gptlab joins them: each one's ids, then the end-of-text id."""
    eot = tok.special_ids[SEP]
    return [i for d in docs for i in (*tok.encode(d), eot)]


def split_ids(d, split: str) -> list[int]:
    return np.concatenate(getattr(d, split)).tolist()


def run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.d_ff=64", "model.block_size=16",
    "train.batch_size=4", "train.max_iters=4", "train.max_tokens=null", "train.eval_interval=2", "train.eval_iters=1",
    "train.warmup_iters=1", "train.device=cpu", "train.compile=false",
]  # fmt: skip


def test_tinystories_preset_prepares_and_trains_offline_with_a_validation_file(tmp_path, capsys):
    train_docs, val_docs = stories(40, 0, "Tom"), stories(12, 1, "Zyzzyva") * 3
    train_txt = write_stories(tmp_path / "TinyStories-train.txt", train_docs)
    valid_txt = write_stories(tmp_path / "TinyStories-valid.txt", val_docs)
    preset = str(ROOT / "configs" / "tinystories-bpe.yaml")
    data = [
        f"data.source={train_txt}", f"data.val_source={valid_txt}", f"data.dir={tmp_path / 'd'}",
        "data.vocab_size=400", "data.workers=1", "data.chunk_chars=50",
    ]  # fmt: skip
    rc, out, err = run(["prepare", preset, *data, "--quiet"], capsys)
    assert rc == 0, err
    d = load_prepared(tmp_path / "d")
    tok = d.tokenizer()
    # val is the validation file's stories, each ending with the end-of-text id; train is the train file's
    assert split_ids(d, "val") == joined(tok, val_docs)
    assert split_ids(d, "train") == joined(tok, train_docs)
    assert d.meta["val_tokens"] == len(joined(tok, val_docs)) and d.meta["documents"] == 40 + 36
    eot = tok.special_ids[SEP]
    for split, marker, other in (("train", "Tom", "Zyzzyva"), ("val", "Zyzzyva", "Tom")):
        ids = split_ids(d, split)
        text = tok.decode([i for i in ids if i != eot])
        assert other not in text and marker in text  # nothing crosses from one file into the other
        assert SEP not in text and "endoftext" not in text  # separators are not text
    # the tokenizer learned the train text only: the word repeated all over the val file got no token of its own
    assert len(tok.encode(" Zyzzyva")) > 2 and len(tok.encode(" Tom")) == 1
    assert f"{len(joined(tok, val_docs)):,} val tokens" in out

    rc, out, err = run(["train", preset, *data, *TINY, f"train.out_dir={tmp_path / 'run'}", "--quiet"], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in lines if "val_loss" in x]
    assert val and all(np.isfinite(val))

    # the same prepare again: up to date; another validation file: another setting
    rc, out, _ = run(["prepare", preset, *data], capsys)
    assert rc == 0 and out.startswith("up to date:")
    other = write_stories(tmp_path / "other-valid.txt", val_docs[:5])
    rc, _, err = run(["prepare", preset, *data, f"data.val_source={other}"], capsys)
    assert rc == 2 and "already holds data prepared from another source or setting" in err


def test_simplebooks_preset_reads_a_plain_valid_txt_as_one_document(tmp_path, capsys):
    train_text = "\n\n".join(stories(30, 2, "Ann")) + "\n"
    valid_text = "  The valid book.\n\n" + "\n\n".join(stories(8, 3, "Bob")) + "\n\n"  # its whitespace is kept
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.txt").write_text(train_text)
    (tmp_path / "raw" / "valid.txt").write_text(valid_text)
    preset = str(ROOT / "configs" / "simplebooks-word.yaml")
    data = [
        f"data.source={tmp_path / 'raw' / 'train.txt'}", f"data.val_source={tmp_path / 'raw' / 'valid.txt'}",
        f"data.dir={tmp_path / 'd'}", "data.vocab_size=300", "data.workers=1",
    ]  # fmt: skip
    rc, _, err = run(["prepare", preset, *data, "--quiet"], capsys)
    assert rc == 0, err
    d = load_prepared(tmp_path / "d")
    tok = d.tokenizer()
    assert split_ids(d, "val") == joined(tok, [valid_text]) and split_ids(d, "train") == joined(tok, [train_text])
    over = [*TINY, "train.max_iters=null", "train.max_epochs=1", f"train.out_dir={tmp_path / 'run'}"]
    rc, _, err = run(["train", preset, *data, *over, "--quiet"], capsys)
    assert rc == 0, err
    assert any("val_loss" in json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_zero_validation_tokens_fail_at_once_and_leave_no_folder(tmp_path, capsys):
    preset = str(ROOT / "configs" / "tinystories-bpe.yaml")
    train_txt = write_stories(tmp_path / "train.txt", stories(3, 4, "Tom"))
    base = [f"data.source={train_txt}", f"data.dir={tmp_path / 'd'}", "data.vocab_size=300", "data.workers=1"]
    # what the preset's old offline instructions did: the whole .txt as one story, which the document split
    # cannot send to val
    rc, _, err = run(["prepare", preset, *base, "data.val_source=null", "data.doc_separator=null"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err == (
        "error: data.split=document drew 0 of the 1 document(s) of "
        f"'{train_txt}' for validation at data.val_fraction=0.1, 0 val tokens; data.doc_separator=null reads a text "
        "file as one document (set data.val_source to a validation file, or data.split=tail)\n"
    )
    assert not (tmp_path / "d").exists()
    # three stories, none drawn for val: the error says so, and both of its fixes then work without --overwrite
    rc, _, err = run(["prepare", preset, *base, "data.val_source=null"], capsys)
    assert rc == 2 and err.startswith("error: data.split=document drew 0 of the 3 document(s)")
    assert not (tmp_path / "d").exists()
    rc, out, err = run(["prepare", preset, *base, "data.val_source=null", "data.split=tail", "--quiet"], capsys)
    assert rc == 0 and out.startswith("prepared:"), err
    valid_txt = write_stories(tmp_path / "valid.txt", stories(2, 5, "Zed"))
    over = [f"data.dir={tmp_path / 'd2'}", f"data.val_source={valid_txt}", "data.val_fraction=0.05"]
    rc, out, err = run(["prepare", preset, *base, *over], capsys)
    assert rc == 0 and out.startswith("prepared:"), err
    assert "note: data.val_fraction=0.05 is not used: data.val_source is the val split" in err


def test_validation_source_refusals_come_before_anything_is_written(tmp_path, capsys, monkeypatch):
    preset = str(ROOT / "configs" / "tinystories-bpe.yaml")
    train_txt = write_stories(tmp_path / "train.txt", stories(10, 6, "Tom"))
    base = [f"data.source={train_txt}", f"data.dir={tmp_path / 'd'}", "data.vocab_size=300", "data.workers=1"]
    empty = tmp_path / "valid.txt"
    empty.write_text(f"\n{SEP}\n  \n")
    cases = {
        f"data.val_source={empty}": (
            f"error: data.val_source: '{empty}' is empty (give a file with text in it, or data.val_source=null to "
            "carve val out of data.source)\n"
        ),
        f"data.val_source={train_txt}": (
            f"error: '{train_txt}' is in both data.source and data.val_source (give data.val_source a text apart "
            "from the training text, or unset it to carve val out of data.source)\n"
        ),
        f"data.val_source={tmp_path / 'nope.txt'}": f"error: data.val_source: data source '{tmp_path / 'nope.txt'}' "
        "not found (",
        "data.doc_separator=''": "error: data.doc_separator is empty (",
    }
    for override, message in cases.items():
        rc, _, err = run(["prepare", preset, *base, override], capsys)
        assert rc == 2 and err.startswith(message), err
        assert not (tmp_path / "d").exists()
    # the preset's own validation source is the hub's: offline, it says so at once and names the local way
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc, _, err = run(["prepare", preset, *base], capsys)
    assert rc == 2 and not (tmp_path / "d").exists()
    assert err == (
        "error: data.val_source: could not download hub dataset 'roneneldan/TinyStories' (offline?: "
        "HF_DATASETS_OFFLINE is set) (download it where there is internet and set data.val_source to its local "
        ".jsonl/.parquet/.txt file or folder, or data.val_source=null to carve val out of data.source)\n"
    )
    # val_fraction: 0 is refused alone, allowed (and not used) beside a validation source
    with pytest.raises(GptlabError, match="data.val_fraction must be in"):
        load_config(preset, [*base, "data.val_fraction=0", "data.val_source=null"])
    assert load_config(preset, [*base, "data.val_fraction=0"]).data.val_fraction == 0


def test_folders_globs_and_hub_splits_as_validation_sources(tmp_path):
    for name, docs in (("a", stories(3, 7, "Ann")), ("b", stories(4, 8, "Bob"))):
        (tmp_path / "val").mkdir(exist_ok=True)
        write_stories(tmp_path / "val" / f"{name}.txt", docs)
    train = write_stories(tmp_path / "train.txt", stories(20, 9, "Tom"))
    base = DataConfig(source=str(train), tokenizer="char", workers=1, vocab_size=0)
    expected = stories(3, 7, "Ann") + stories(4, 8, "Bob")
    for i, val in enumerate((str(tmp_path / "val"), str(tmp_path / "val" / "*.txt"))):
        prepare(replace(base, val_source=val, dir=str(tmp_path / f"d{i}")), quiet=True)
        d = load_prepared(tmp_path / f"d{i}")
        assert split_ids(d, "val") == joined(d.tokenizer(), expected)
    # a folder overlapping the train files is refused
    with pytest.raises(GptlabError, match="is in both data.source and data.val_source"):
        prepare(replace(base, source=str(tmp_path / "val"), val_source=str(tmp_path / "val" / "b.txt")), quiet=True)
    # a hub dataset (here a local folder `datasets` streams): its train split trains, its validation split validates
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, docs in (("train", stories(20, 10, "Tom")), ("validation", stories(5, 11, "Val"))):
        (hub / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    data = replace(base, source=f"hf:{hub}", val_source=f"hf:{hub}", dir=str(tmp_path / "h"), tokenizer="bpe")
    data = replace(data, vocab_size=300)
    prepare(data, quiet=True)
    d = load_prepared(tmp_path / "h")
    assert split_ids(d, "val") == joined(d.tokenizer(), stories(5, 11, "Val"))
    assert split_ids(d, "train") == joined(d.tokenizer(), stories(20, 10, "Tom"))
    with pytest.raises(GptlabError, match="read the same split 'train'"):
        prepare(replace(data, val_hub_split="train", dir=str(tmp_path / "h2")), quiet=True)


def reference_documents(text: str) -> list[str]:
    """What split_documents means, on a whole text: whitespace next to a separator dropped, empty ones skipped."""
    if SEP not in text:
        return [text] if text else []
    parts = text.split(SEP)
    docs = [p.lstrip() if k else p for k, p in enumerate(parts)]
    docs = [p.rstrip() if k < len(parts) - 1 else p for k, p in enumerate(docs)]
    return [p for p in docs if p]


def test_separators_are_found_across_any_block_boundary():
    rng = random.Random(0)
    alphabet = ["a", "bc", " ", "\n", "\r\n", "é", SEP, "<|end", "oftext|>", "<", "|>"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        bounds = [0, *cuts, len(text)]
        blocks = [(text[a:b], len(text[a:b].encode()), False) for a, b in zip(bounds, bounds[1:])]
        chunks = list(split_documents([*blocks, ("", 0, True)], SEP))
        assert sum(n for _, n, _ in chunks) == len(text.encode())  # every byte counted once
        docs, current = [], ""
        for piece, _, end in chunks:
            current += piece
            if end and current:  # ("", n, True) closes the document before: nothing new
                docs.append(current)
                current = ""
        assert docs == reference_documents(text), (text, blocks)


def test_big_text_files_split_while_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 64)  # many blocks, separators straddling their ends
    docs = stories(50, 12, "Tom")
    path = write_stories(tmp_path / "big.txt", docs)
    src = open_source(str(path), separator=SEP)
    pieces = list(src.pieces())
    assert max(len(p.text) for p in pieces) < 200 and sum(p.nbytes for p in pieces) == path.stat().st_size
    got, current = [], ""
    for p in pieces:
        current += p.text
        if p.doc_end:
            got.append(current)
            current = ""
    assert got == docs
    # without a separator setting the file is one document, exactly as written
    assert "".join(p.text for p in open_source(str(path)).pieces()) == path.read_text()


def test_data_prepared_before_the_new_settings_still_matches(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, a plain text without any separator. " * 40)
    data = DataConfig(source=str(text), dir=str(tmp_path / "d"), tokenizer="char", workers=1)
    prepare(data, quiet=True)
    meta_path = tmp_path / "d" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("val_source", "val_hub_split", "doc_separator"):
        del meta["settings"][key]
    meta_path.write_text(json.dumps(meta))
    assert prepare(data, quiet=True).skipped
    valid = tmp_path / "v.txt"
    valid.write_text("hello world, the validation text.")
    with pytest.raises(GptlabError, match="already holds data prepared from another source"):
        prepare(replace(data, val_source=str(valid)), quiet=True)


def test_sft_examples_take_a_validation_file_too(tmp_path):
    from gptlab.tokenizers import Tokenizer

    Tokenizer.train("bpe", ["Q: the king? A: the queen."], 300, [SEP]).save(tmp_path / "tokenizer.json")
    for name, n in (("train", 9), ("valid", 4)):
        rows = [{"prompt": f"Q{i}: {name}?", "response": f"A: {name} {i}."} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(
        source=str(tmp_path / "train.jsonl"), val_source=str(tmp_path / "valid.jsonl"), format="sft",
        tokenizer=str(tmp_path / "tokenizer.json"), dir=str(tmp_path / "d"),
    )  # fmt: skip
    prepare(data, quiet=True)
    d = load_prepared(data.dir)
    assert (len(d.examples["train"]), len(d.examples["val"])) == (9, 4)
    assert "valid" in d.tokenizer().decode(d.examples["val"].tokens.tolist())
    assert "valid" not in d.tokenizer().decode(d.examples["train"].tokens.tolist())
    assert prepare(data, quiet=True).skipped
    with pytest.raises(GptlabError, match="already holds data prepared from another source"):
        prepare(replace(data, val_source=None), quiet=True)


@pytest.mark.parametrize("crash_at,split", [(2, "train"), (12, "val")])
def test_an_interrupted_prepare_with_a_validation_file_resumes_to_the_same_shards(
    tmp_path, monkeypatch, crash_at, split
):
    from gptlab.data import shards as shards_module

    train = write_stories(tmp_path / "train.txt", stories(30, 13, "Tom"))
    valid = write_stories(tmp_path / "valid.txt", stories(12, 14, "Val"))
    base = DataConfig(source=str(train), val_source=str(valid), tokenizer="bpe", vocab_size=300, shard_tokens=150)
    whole = replace(base, dir=str(tmp_path / "whole"))
    prepare(whole, quiet=True)
    names = {p.name for p in (tmp_path / "whole").iterdir()}
    assert {"train_00003.bin", "val_00001.bin"} <= names  # several shards of each split
    real_close = shards_module.ShardWriter._close
    closed = []

    def crash(self, next_chunk, skip):
        if len(closed) == crash_at:
            assert self.split == split  # dies in the train file's shards, or in the validation file's
            raise KeyboardInterrupt
        closed.append(self.final.name)
        real_close(self, next_chunk, skip)

    cut = replace(base, dir=str(tmp_path / "cut"))
    monkeypatch.setattr(shards_module.ShardWriter, "_close", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cut, quiet=True)
    monkeypatch.setattr(shards_module.ShardWriter, "_close", real_close)
    assert not prepare(cut, quiet=True).skipped
    assert {p.name for p in (tmp_path / "cut").iterdir()} == names
    for name in names:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
