import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptlab.config import DataConfig
from gptlab.data.batches import Batches, load_prepared
from gptlab.data.shards import prepare
from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer


def test_prepare_writes_memmappable_shards_tokenizer_and_meta(prepared, text_file):
    d = load_prepared(prepared.data.dir)
    meta = json.loads((d.dir / "meta.json").read_text())
    assert meta["complete"] and meta["dtype"] == "uint16" and d.train[0].dtype == np.uint16
    assert [e["file"] for e in meta["shards"]["train"]] == ["train_00000.bin"]  # the one-shard case
    raw = np.memmap(d.dir / "train_00000.bin", dtype=np.uint16, mode="r")
    assert np.array_equal(raw, d.train[0])
    text = text_file.read_text()
    assert meta["vocab_size"] == len(set(text)) + 1  # the characters and <|endoftext|>
    tok = Tokenizer.load(d.dir / "tokenizer.json")
    whole = tok.decode(np.concatenate([*d.train, *d.val]).tolist())
    assert whole == text + "<|endoftext|>"  # one document, closed by the end-of-text token
    # nanoGPT's tail split: the first 90% of the text's bytes are train
    assert tok.decode(d.train[0].tolist()) == text[: int(len(text.encode()) * 0.9)]
    assert meta["train_tokens"] + meta["val_tokens"] == len(text) + 1 and meta["documents"] == 1


def test_prepare_again_skips_and_refuses_another_source(prepared, tmp_path):
    assert prepare(prepared.data, quiet=True).skipped
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 20)
    with pytest.raises(GptlabError) as e:
        prepare(replace(prepared.data, source=str(other)), quiet=True)
    assert str(e.value) == (
        f"'{prepared.data.dir}' already holds data prepared from another source or setting "
        "(pass --overwrite, or set data.dir to a new folder)"
    )
    assert not prepare(replace(prepared.data, source=str(other)), overwrite=True, quiet=True).skipped


def test_data_prepared_before_max_words_existed(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the king and the queen\n" * 50)
    for kind in ("char", "bpe"):
        data = DataConfig(source=str(text), dir=str(tmp_path / kind), tokenizer=kind, vocab_size=300)
        prepare(data, quiet=True)
        meta_path = Path(data.dir) / "meta.json"
        meta = json.loads(meta_path.read_text())
        del meta["settings"]["max_words"]
        meta_path.write_text(json.dumps(meta))
        if kind == "char":  # max_words trains nothing here: still the same data, whatever its value
            assert prepare(data, quiet=True).skipped
            assert prepare(replace(data, max_words=5), quiet=True).skipped
        else:  # trained without a word budget: maybe another tokenizer
            with pytest.raises(GptlabError, match="another source or setting"):
                prepare(data, quiet=True)


def test_bad_text_is_a_clear_error(prepared, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = {
        str(bad): f"'{bad}' is not valid UTF-8 at byte 6 "
        "(convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8, or pass --errors replace)",
        str(empty): f"'{empty}' is empty (give a file with text in it)",
    }
    for source, message in cases.items():
        with pytest.raises(GptlabError) as e:
            prepare(replace(prepared.data, source=source, dir=str(tmp_path / "d")), quiet=True)
        assert str(e.value) == message
    d = replace(prepared.data, source=str(bad), dir=str(tmp_path / "d"), errors="replace", val_fraction=0.5)
    assert prepare(d, quiet=True).meta["complete"]
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json")
    data = load_prepared(tmp_path / "d")
    assert tok.decode(np.concatenate([*data.train, *data.val]).tolist()) == "hello \ufffd world<|endoftext|>"


def test_folder_source_and_builtin_corpus(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("abc\n" * 50)
    (folder / "sub" / "b.txt").write_text("xyz" * 50)
    meta = prepare(DataConfig(source=str(folder), dir=str(tmp_path / "d")), quiet=True).meta
    assert meta["documents"] == 2 and meta["vocab_size"] == 8  # a b c x y z \n <|endoftext|>
    assert meta["train_tokens"] + meta["val_tokens"] == 200 + 150 + 2
    from gptlab.data.sources import builtin_corpus_files

    files = builtin_corpus_files()
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)


def test_batch_of_a_step_is_a_pure_function_and_ranks_take_strided_rows(prepared):
    d = load_prepared(prepared.data.dir)
    for mode in ("random", "epoch"):
        a = Batches(d.train, 16, 8, mode, seed=3, steps_per_epoch=5)
        b = Batches(d.train, 16, 8, mode, seed=3, steps_per_epoch=5)
        x7, y7 = a.batch(7)
        a.batch(100)
        assert np.array_equal(b.batch(7)[0], x7) and np.array_equal(a.batch(7)[0], x7)
        assert np.array_equal(x7[:, 1:], y7[:, :-1])
        ranks = [Batches(d.train, 16, 8, mode, seed=3, steps_per_epoch=5, rank=r, world=2).batch(7)[0] for r in (0, 1)]
        assert np.array_equal(ranks[0], x7[0::2]) and np.array_equal(ranks[1], x7[1::2])


def test_epoch_mode_reads_every_block_once_per_epoch(prepared):
    d = load_prepared(prepared.data.dir)
    b = Batches(d.train, 16, 4, "epoch", seed=0)
    starts = np.concatenate([b.starts(s) for s in range(b.steps_per_epoch)])
    assert len(set(starts.tolist())) == len(starts) == b.steps_per_epoch * 4
    assert set(starts.tolist()) <= set(range(0, b.n_blocks * 16, 16))
    next_epoch = np.concatenate([b.starts(b.steps_per_epoch + s) for s in range(b.steps_per_epoch)])
    # a new shuffle each epoch; only the n_blocks % batch_size blocks of the partial last batch are left out
    assert len(set(next_epoch.tolist())) == len(next_epoch) and not np.array_equal(next_epoch, starts)
    assert b.n_blocks - len(starts) == b.n_blocks % 4


def test_corpus_shorter_than_context(prepared):
    d = load_prepared(prepared.data.dir)
    with pytest.raises(GptlabError) as e:
        Batches(d.val, 100_000, 4, "random", seed=0, split="val")
    assert str(e.value) == (
        f"the val split has {len(d.val[0])} tokens, fewer than the context of 100000 + 1 "
        "(lower model.block_size or give more text)"
    )
