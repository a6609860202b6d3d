"""Runs out to GGUF: the real llama.cpp (llama-cpp-python) loads each export and computes what gptlab computes."""

from __future__ import annotations

import math
import shutil
from itertools import islice
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from conftest import make_text, tiny_config
from test_failures import Disk, snapshot, temps
from test_specials import GPT2_FILES

from gptlab.cli import main
from gptlab.config import ModelConfig, load_config
from gptlab.data.shards import prepare
from gptlab.generate import Generator
from gptlab.interop.runs import write_run
from gptlab.model import GPT
from gptlab.tokenizers import Tokenizer
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NON_ASCII = "café — naïve résumé, it’s “quoted”.\n"  # 2- and 3-byte characters, in every corpus below
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
KINDS = ["gpt2+bpe", "modern+bpe", "char"]


def train(root: Path, kind: str) -> Path:
    """A run trained a few hundred steps (seconds), so greedy choices have margins f16 rounding does not flip."""
    (root / "corpus.txt").write_text(make_text(600) + NON_ASCII * 20)
    common = [f"data.source={root / 'corpus.txt'}", f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}",
              "data.workers=1", "model.block_size=64", "model.n_layer=2", "train.max_iters=200",
              "train.eval_interval=100", "train.eval_iters=2", "train.batch_size=8", "train.warmup_iters=10",
              "train.device=cpu", "train.compile=false"]  # fmt: skip
    if kind == "char":  # the main job's config (modern block, char tokenizer, Muon), made small
        # with the preset's earlier AdamW rate and no moving average: over 200 steps at this width they leave
        # near-ties in the greedy text (fp32's two best 0.035 apart at its 5th token) that int8's rounding breaks
        small = ["model.n_head=2", "model.n_embd=64", "train.lr=2e-3", "train.ema=0"]
        cfg = load_config(CONFIGS / "shakespeare-char.yaml", [*common, *small])
    else:
        arch = kind.split("+")[0]
        extra = ["model.n_head=2", "model.n_kv_head=1"] if arch == "modern" else []  # grouped-query attention
        specials = "data.special_tokens=['<|endoftext|>','<|im_start|>','<|im_end|>']"
        cfg = tiny_config(root, root / "corpus.txt", *common, f"model.arch={arch}", "data.tokenizer=bpe",
                          "data.vocab_size=400", "train.lr=3e-3", specials, *extra)  # fmt: skip
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    if kind == "modern+bpe":  # a chat-tuned run's template: its end of turn is <|im_end|>
        (root / "run" / "chat_template.jinja").write_text(CHATML)
    return root / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {kind: train(tmp_path_factory.mktemp(kind.replace("+", "-")), kind) for kind in KINDS}


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each run exported through the CLI in each dtype: (kind, dtype) -> OUT."""
    out = {}
    for kind, run in runs.items():
        for dtype in ("f32", "f16", "q8_0"):
            folder = tmp_path_factory.mktemp("gguf") / f"{kind}-{dtype}"
            assert main(["export", str(run), str(folder), "--format", "gguf", "--dtype", dtype]) == 0
            out[kind, dtype] = folder
    return out


@pytest.fixture(scope="module")
def llms(exported: dict[tuple[str, str], Path]):  # noqa: ANN201
    """llama.cpp's model of each export (all logits kept), loaded on first use."""
    loaded: dict[tuple[str, str], llama_cpp.Llama] = {}

    def get(kind: str, dtype: str) -> llama_cpp.Llama:
        if (kind, dtype) not in loaded:
            path = exported[kind, dtype] / "model.gguf"
            loaded[kind, dtype] = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
        return loaded[kind, dtype]

    yield get
    for llm in loaded.values():
        llm.close()


def prompt_of(kind: str) -> str:
    return "ROMEO:\nthe café" if kind == "char" else "ROMEO:\nthe king"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_gptlab_sample(kind, dtype, runs, llms, capsys):
    _, model, tokenizer = load_run(runs[kind])
    prompt = tokenizer.encode(prompt_of(kind))
    ours = Generator(model).generate([prompt], 32, temperature=0)[0]
    llm = llms(kind, dtype)
    theirs = list(islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 32))
    assert theirs == ours
    assert not set(ours) & set(tokenizer.special_ids.values())  # so `gptlab sample` runs all 32 tokens too
    capsys.readouterr()
    argv = ["sample", str(runs[kind]), "--start", prompt_of(kind), "--num-samples", "1", "--max-new-tokens", "32",
            "--temperature", "0"]  # fmt: skip
    assert main(argv) == 0
    text = llm.detokenize(prompt + theirs, special=True).decode()
    assert capsys.readouterr().out == text + "\n"


def bits_per_byte(logits: np.ndarray, ids: list[int], tokenizer: Tokenizer) -> tuple[float, int]:
    """(nats of ids[1:] under logits[:-1], bytes of their text)."""
    logits = logits[: len(ids) - 1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]].sum(), len(tokenizer.decode(ids[1:]).encode())


@pytest.mark.parametrize("kind", KINDS)
def test_q8_0_bits_per_byte_within_1_percent_of_f32(kind, runs, llms):
    _, model, tokenizer = load_run(runs[kind])
    held_out = tokenizer.encode(make_text(30, seed=7) + NON_ASCII)
    windows = [held_out[i : i + 64] for i in range(0, len(held_out) - 1, 64)][:4]
    found = {}
    for dtype in ("f32", "q8_0", "gptlab"):
        nats = size = 0
        for ids in windows:
            if dtype == "gptlab":
                with torch.no_grad():
                    logits = model(torch.tensor([ids]))[0].numpy()
            else:
                llm = llms(kind, dtype)
                llm.reset()
                llm.eval(ids)
                logits = np.array(llm.scores[: len(ids)])
            n, b = bits_per_byte(logits, ids, tokenizer)
            nats, size = nats + n, size + b
        found[dtype] = nats / size / math.log(2)
    assert abs(found["f32"] - found["gptlab"]) < 1e-3 * found["gptlab"]  # the same model
    assert abs(found["q8_0"] - found["f32"]) < 0.01 * found["f32"]


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_tokenizes_and_detokenizes_as_gptlab(kind, runs, llms):
    tokenizer = load_run(runs[kind])[2]
    texts = [NON_ASCII, "ROMEO:\n\n  the kings  crown<|endoftext|>JULIET: é—’", "  trailing  crowns   \n"]
    if kind != "char":  # a byte-level BPE takes any text; a char vocabulary only its own characters
        texts += ["日本語のテキスト 👍🏽 naïve\t\ttabs", "<|im_start|>user\nhi<|im_end|>\n"]
    llm = llms(kind, "f32")
    for text in texts:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert llm.detokenize(ids, special=True).decode() == text
        if kind != "char":  # special tokens' text read as ordinary text
            plain = tokenizer.encode(text, allow_special=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == plain


def test_metadata_tensor_types_and_modelfile(runs, exported, llms):
    tokenizer = load_run(runs["modern+bpe"])[2]
    out = exported["modern+bpe", "q8_0"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    reader = gguf.GGUFReader(out / "model.gguf")
    fields = {name: f.contents() for name, f in reader.fields.items()}
    im_end = tokenizer.special_ids["<|im_end|>"]
    assert {k: fields[k] for k in [
        "general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
    ]} == {
        "general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 32,
        "llama.block_count": 2, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
        "llama.rope.dimension_count": 16, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id, "tokenizer.ggml.eot_token_id": im_end,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML,
    }  # fmt: skip
    types = fields["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(tokenizer.special_ids.values())
    assert fields["tokenizer.ggml.tokens"][im_end] == "<|im_end|>"
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    assert llms("modern+bpe", "q8_0").metadata["tokenizer.chat_template"] == CHATML
    assert (out / "Modelfile").read_text() == (
        "# ollama create NAME -f Modelfile (from this folder), then ollama run NAME\n"
        "FROM ./model.gguf\nPARAMETER num_ctx 64\nPARAMETER temperature 0.8\nPARAMETER top_k 200\n"
        "PARAMETER top_p 1.0\nPARAMETER min_p 0.0\nPARAMETER repeat_penalty 1.0\n"
        'PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|im_end|>"\n'
    )
    gpt2 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported["gpt2+bpe", "q8_0"] / "model.gguf").tensors}
    assert gpt2["position_embd.weight"] == "F32" and gpt2["blk.0.attn_qkv.weight"] == "Q8_0"
    assert "output.weight" not in gpt2  # tied: llama.cpp reads token_embd
    sizes = {d: (exported["char", d] / "model.gguf").stat().st_size for d in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train("bpe", [make_text(100) + NON_ASCII], 300)


def random_model(vocab_size: int, **switches: object) -> GPT:
    """A random model with random norm gains and biases, so that every tensor's place is checked."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64, **switches)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(3)
    return model


@pytest.mark.parametrize(
    "switches",
    [
        {"arch": "gpt2", "bias": False, "tie_embeddings": False, "n_kv_head": 1},
        {"arch": "modern", "bias": True, "tie_embeddings": True, "n_kv_head": 2, "rope_theta": 500000.0},
        {"arch": "modern", "mlp": "relu2", "n_kv_head": 2},  # llama.cpp's arcee
    ],
    ids=["gpt2-untied-nobias-gqa", "modern-bias-tied-gqa-theta", "modern-relu2-gqa"],
)
def test_switches_export_with_equal_logits(switches, bpe, tmp_path, capsys):
    model = random_model(bpe.vocab_size, **switches)
    run = write_run(tmp_path / "run", model, bpe)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "gguf"]) == 0
    gguf_file, modelfile = tmp_path / "out" / "model.gguf", tmp_path / "out" / "Modelfile"
    assert capsys.readouterr().out == (
        f"exported {run} to {gguf_file} (llama.cpp: llama-cli -m {gguf_file}; Ollama: ollama create NAME -f {modelfile})\n"
    )
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "out" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0
    )  # fmt: skip  (an f32 KV cache: 0 is GGML_TYPE_F32)
    try:
        ids = bpe.encode(make_text(10))[:64]
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(ours).max() > 1  # logits that depend on every weight
    assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()


def test_char_vocabulary_merges_join_each_characters_bytes():
    from gptlab.interop.gguf import gguf_vocab

    tokenizer = Tokenizer.train_char(["ab é—\n"], ["<|endoftext|>"])
    tokens, types, merges = gguf_vocab(tokenizer, tokenizer.vocab_size + 2)
    # bytes in GPT-2's printable spelling: ' ' is Ġ, '\n' Ċ, é (C3 A9) Ã©, — (E2 80 94) âĢĶ
    assert tokens == ["Ċ", "Ġ", "a", "b", "Ã©", "âĢĶ", "<|endoftext|>", "[PAD7]", "[PAD8]"]
    assert types == [1, 1, 1, 1, 1, 1, 3, 5, 5]
    assert merges == ["Ã ©", "â Ģ", "âĢ Ķ"]


def test_an_ascii_char_vocabulary_loads_and_tokenizes_alike(tmp_path):
    """Shakespeare's complete works are all ASCII: no character needs a merge, yet llama.cpp needs one."""
    tokenizer = Tokenizer.train_char([make_text(20)], ["<|endoftext|>"])
    run = write_run(tmp_path / "run", random_model(tokenizer.vocab_size), tokenizer)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "gguf"]) == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model.gguf"), n_ctx=64, verbose=False)
    try:
        text = "ROMEO:\nthe  king.<|endoftext|>\n\n"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
        assert llm.detokenize(tokenizer.encode(text), special=True).decode() == text
    finally:
        llm.close()


@pytest.mark.skipif(not (GPT2_FILES / "gpt2_vocab.json").is_file(), reason="GPT-2's vocab.json/merges.txt not found")
def test_gpt2s_own_tokenizer_on_the_gpt2_block(tmp_path):
    """GPT-2's 50,257-token BPE (the `gpt2` kind, where its files are at hand): llama.cpp tokenizes, detokenizes and
    decodes greedily as gptlab does, in f16."""
    for name in ("gpt2_vocab.json", "gpt2_merges.txt"):
        shutil.copy(GPT2_FILES / name, tmp_path / name)
    tokenizer = Tokenizer.gpt2(files=tmp_path)
    assert tokenizer.kind == "gpt2"
    model = random_model(tokenizer.vocab_size, arch="gpt2")
    run = write_run(tmp_path / "run", model, tokenizer)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "gguf", "--dtype", "f16"]) == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model.gguf"), n_ctx=64, verbose=False)
    try:
        for text in ("Hello world!", NON_ASCII, "  two  spaces\n\ttab 123456 don't<|endoftext|>日本語 🙂"):
            ids = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            assert llm.detokenize(ids, special=True).decode() == text
        prompt = tokenizer.encode("ROMEO:\nthe king")
        ours = Generator(model).generate([prompt], 32, temperature=0)[0]
        assert list(islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 32)) == ours
    finally:
        llm.close()


# ----- refusals -------------------------------------------------------------------------------------------------------
def refused(argv: list[str], message: str, capsys: pytest.CaptureFixture, root: Path) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == message
    assert temps(root) == []


@pytest.mark.parametrize(
    "switches, message",
    [
        (
            {"arch": "modern", "parallel_block": True},
            "model.parallel_block=true has no llama.cpp architecture gptlab "
            "writes (train with model.parallel_block=false, or export it with --format hf)",
        ),
        (
            {"arch": "modern", "qk_norm": True},
            "model.qk_norm=true has no form in llama.cpp's gpt2 or llama "
            "architecture (train with model.qk_norm=false, or export it with --format hf)",
        ),
        (
            {"arch": "gpt2", "mlp": "gelu_exact"},
            "model.mlp=gelu_exact (erf GELU) has no form in llama.cpp's gpt2 "
            "architecture, whose GELU is the tanh approximation (train with model.mlp=gelu (GPT-2's), or export it "
            "with --format hf)",
        ),
        (
            {"arch": "modern", "norm": "layernorm"},
            "model.norm=layernorm has no llama.cpp architecture with "
            "model.position=rope (llama.cpp's llama needs model.norm=rmsnorm; export models whose switches match GPT-2 "
            "or Llama)",
        ),
        (
            {"arch": "gpt2", "mlp": "relu2"},
            "model.mlp=relu2 has no llama.cpp architecture with model.position=learned (llama.cpp's gpt2 needs "
            "model.mlp=gelu; export models whose switches match GPT-2 or Llama)",
        ),
        (
            {"arch": "modern", "logit_softcap": 15.0},
            "model.logit_softcap=15.0 has no form in llama.cpp's gpt2, llama or arcee architecture (train with "
            "model.logit_softcap=0)",
        ),
    ],  # fmt: skip
    ids=["parallel_block", "qk_norm", "gelu_exact", "layernorm+rope", "gpt2+relu2", "logit_softcap"],
)
def test_switches_llama_cpp_cannot_represent_are_refused(switches, message, bpe, tmp_path, capsys):
    run = write_run(tmp_path / "run", random_model(bpe.vocab_size, **switches), bpe)
    refused(["export", str(run), str(tmp_path / "out"), "--format", "gguf"], f"error: {message}\n", capsys, tmp_path)
    assert not (tmp_path / "out").exists()


def test_bad_dtypes_tokenizers_and_folders_are_refused(bpe, tmp_path, capsys):
    run = write_run(tmp_path / "run", random_model(bpe.vocab_size), bpe)
    out = tmp_path / "out"
    refused(["export", str(run), str(out), "--format", "gguf", "--dtype", "q4_0"],
            "error: --dtype q4_0 is not a GGUF type gptlab writes (use f32, f16 or q8_0)\n", capsys, tmp_path)  # fmt: skip
    refused(["export", str(run), str(out), "--dtype", "f16"],
            "error: --dtype is for --format gguf (drop --dtype, or add --format gguf)\n", capsys, tmp_path)  # fmt: skip
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused(["export", str(run), str(out), "--format", "gguf"],
            f"error: '{out}' is not empty (give a new or empty folder)\n", capsys, tmp_path)  # fmt: skip
    refused(["export", str(run), str(out / "notes.txt"), "--format", "gguf"],
            f"error: '{out / 'notes.txt'}' is a file (give a folder to export into)\n", capsys, tmp_path)  # fmt: skip
    for fmt in ("gguf", "hf"):  # a file where a parent folder should be
        refused(["export", str(run), str(out / "notes.txt" / "x"), "--format", fmt],
                f"error: cannot make the folder '{out / 'notes.txt'}' (File exists) (give a path whose parents are "
                "folders)\n", capsys, tmp_path)  # fmt: skip
    assert snapshot(out) == {"notes.txt": b"keep me"}
    wordpiece = Tokenizer.train("wordpiece", [make_text(50)], 300)
    run = write_run(tmp_path / "wp", random_model(wordpiece.vocab_size), wordpiece)
    refused(["export", str(run), str(tmp_path / "wp-out"), "--format", "gguf"],
            "error: a wordpiece tokenizer has no GGUF form: llama.cpp's WordPiece is BERT's (lowercased text, '##' "
            "pieces), not gptlab's byte-level one (train the run with data.tokenizer=bpe (byte-level BPE), or export "
            "it with --format hf)\n", capsys, tmp_path)  # fmt: skip
    assert not (tmp_path / "wp-out").exists()


@pytest.mark.parametrize("failure", ["read_only", "full"])
def test_read_only_or_full_out_leaves_nothing(failure, bpe, tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", random_model(bpe.vocab_size), bpe)  # about 500 KB as f32
    disk = Disk(tmp_path / "disk", monkeypatch)
    try:
        shutil.copytree(run, disk.path / "old")
        if failure == "read_only":
            disk.read_only()
        else:
            disk.fill(100)
        before = snapshot(disk.path / "old")
        new = disk.path / "new"
        reason, fix = {
            "read_only": ("Read-only file system", "choose a writable folder"),
            "full": ("No space left on device", "free disk space, or write to another disk"),
        }[failure]
        refused(["export", str(run), str(new), "--format", "gguf"], f"error: cannot write '{new}' ({reason}) ({fix})\n",
                capsys, tmp_path)  # fmt: skip
        assert not new.exists() and snapshot(disk.path / "old") == before
    finally:
        monkeypatch.undo()
        disk.unmount()


def test_an_interrupted_export_leaves_nothing(bpe, tmp_path, monkeypatch):
    from gptlab.interop.gguf import export_gguf

    run = write_run(tmp_path / "run", random_model(bpe.vocab_size), bpe)

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(run, tmp_path / "out", dtype="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
