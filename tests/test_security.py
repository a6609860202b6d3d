"""Nothing read from a run directory or a model folder runs code.

Payloads that run a shell command when unpickled (or YAML-constructed, or rendered by an unsandboxed template)
are planted in every file that a resume, sample, eval, export, serve or import reads; the command would create a
marker file, which must never appear. Pickles are refused, YAML tags are refused, JSON and safetensors headers
are data only. The two-rank resume is in test_distributed.py (it reuses that module's runs).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_text, tiny_config
from safetensors.torch import load_file, save_file

from gptlab.cli import main
from gptlab.data.shards import prepare
from gptlab.safe_pickle import read_dcp_metadata
from gptlab.train.checkpoint import load_run
from gptlab.train.trainer import Trainer


class Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def yaml_payload(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def json_payload(marker: Path) -> dict:
    """jsonpickle's spelling of a call: data to a JSON reader, code to jsonpickle."""
    return {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [f"touch {marker}"]}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4 (train_state written by torch.distributed.checkpoint)."""
    tmp = tmp_path_factory.mktemp("security")
    (tmp / "corpus.txt").write_text(make_text())
    cfg = tiny_config(tmp, tmp / "corpus.txt", "train.max_iters=4", "train.eval_interval=2")
    prepare(cfg.data, quiet=True)
    Trainer(cfg, quiet=True).fit()
    return Path(cfg.train.out_dir)


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def step(run: Path) -> Path:
    """The checkpoint a resume reads."""
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


# ----- the plants: each writes a payload into one file of a run directory ------------------------------------
def plant_metadata(run: Path, marker: Path) -> None:
    (step(run) / "train_state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def plant_inside_metadata(run: Path, marker: Path) -> None:
    """A well-formed checkpoint metadata with a payload in one of its fields."""
    md = read_dcp_metadata(step(run) / "train_state")
    md.storage_meta.modules = [Payload(marker)]
    (step(run) / "train_state" / ".metadata").write_bytes(pickle.dumps(md))


def plant_distcp(run: Path, marker: Path) -> None:
    """A non-tensor item of the optimizer state (a param group's setting) pointed at a payload in the .distcp file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = step(run) / "train_state"
    md = read_dcp_metadata(folder)
    key = next(k for k in md.storage_data if isinstance(md.state_dict_metadata[k.fqn], BytesStorageMetadata))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    info = md.storage_data[key]
    data_file = folder / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[key] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()), info.transform_descriptors)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def plant_outside_path(run: Path, marker: Path) -> None:
    """A well-formed metadata whose first item is read from a file outside the checkpoint (any file the user can
    read), and another's past the end of its file (a read of /dev/zero's size)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder = step(run) / "train_state"
    md = read_dcp_metadata(folder)
    (first, a), (second, b) = list(md.storage_data.items())[:2]
    md.storage_data[first] = _StorageInfo("../../../config.yaml", 0, 10, a.transform_descriptors)
    md.storage_data[second] = _StorageInfo(b.relative_path, 0, 1 << 40, b.transform_descriptors)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def plant_state(run: Path, marker: Path) -> None:
    state = torch.load(step(run) / "state.pt", weights_only=True)
    state["history"].append({"step": 4, "note": Payload(marker)})
    torch.save(state, step(run) / "state.pt")


def plant_config(run: Path, marker: Path) -> None:
    path = run / "config.yaml"
    path.write_text(f"note: {yaml_payload(marker)}\n" + path.read_text())


def plant_meta_json(run: Path, marker: Path) -> None:
    path = step(run) / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "note": json_payload(marker)}))


def plant_run_json(run: Path, marker: Path) -> None:
    path = run / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "note": json_payload(marker)}))


def plant_safetensors_header(run: Path, marker: Path) -> None:
    """The weights file's header (JSON) with a pickled payload among its metadata strings."""
    path = step(run) / "model.safetensors"
    tensors = load_file(path)
    save_file(tensors, path, metadata={"format": "pt", "note": pickle.dumps(Payload(marker)).hex()})


Plant = Callable[[Path, Path], None]
REFUSED = "was refused: {file} holds objects no checkpoint holds, such as code"


@pytest.mark.parametrize(
    "plant, message",
    [
        (plant_metadata, REFUSED.format(file="train_state")),
        (plant_inside_metadata, REFUSED.format(file="train_state")),
        (plant_distcp, REFUSED.format(file="train_state")),
        (plant_outside_path, "outside the checkpoint's folder"),
        (plant_state, REFUSED.format(file="state.pt")),
        (plant_config, "config.yaml"),
        (plant_meta_json, None),  # JSON is data: the extra key is ignored and the run resumes
        (plant_run_json, None),
    ],
    ids=lambda p: getattr(p, "__name__", "")[6:],
)
def test_a_resume_never_runs_code_planted_in_the_run(run, tmp_path, capsys, plant: Plant, message: str | None):
    marker = tmp_path / "MARKER"
    plant(run, marker)
    code = main(["train", "--resume", str(run), "--quiet", "train.max_iters=6"])
    err = capsys.readouterr().err
    assert not marker.exists()
    if message is None:
        assert code == 0, err
        return
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("plant", [plant_config, plant_safetensors_header, plant_meta_json], ids=lambda p: p.__name__)
@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_sample_eval_and_export_never_run_code_planted_in_the_run(run, tmp_path, capsys, plant: Plant, command):
    marker = tmp_path / "MARKER"
    plant(run, marker)
    args = {
        "sample": ["sample", str(run), "--max-new-tokens", "4", "--checkpoint", "latest"],
        "eval": ["eval", str(run), "--checkpoint", "latest", "--max-tokens", "64"],
        "export": ["export", str(run), str(tmp_path / "hf"), "--checkpoint", "latest"],
    }[command]
    code = main(args)
    err = capsys.readouterr().err
    assert not marker.exists()
    if plant is plant_config:  # YAML's python tags are refused, as a damaged config
        assert code == 2 and err.startswith("error: ") and "config.yaml" in err and "Traceback" not in err
    else:  # the payload is a string in a JSON header: data, never unpickled
        assert code == 0, err


def test_serve_never_runs_code_planted_in_the_config_or_the_chat_template(run, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from gptlab.chat import load_chat_template
    from gptlab.serve import create_app

    marker = tmp_path / "MARKER"
    # a template escaping Jinja's sandbox would reach os through a global's __init__.__globals__
    (run / "chat_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{{ messages[0].content }}"
    )
    _, model, tokenizer = load_run(run, "latest")
    app = create_app(model, tokenizer, "run", chat_template=load_chat_template(run, tokenizer))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert 400 <= r.status_code < 500, r.text
    assert not marker.exists()

    plant_config(run, marker)
    assert main(["serve", str(run), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml" in err and "Traceback" not in err
    assert not marker.exists()


def hf_folder(tmp_path: Path) -> Path:
    """A random GPT-2 in transformers' format, with tokenizer.json (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab.interop.hf import hf_tokenizer
    from gptlab.tokenizers import Tokenizer

    tokenizer = Tokenizer.train("bpe", [make_text(50)], 280)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                    bos_token_id=None, eos_token_id=None))  # fmt: skip
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    hf_tokenizer(tokenizer).save_pretrained(folder)
    return folder


def test_import_hf_never_runs_code_from_the_model_folder(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    folder = hf_folder(tmp_path)
    # custom code named by config.json: transformers runs it only when trusted, which gptlab never asks for
    (folder / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["import", "hf", str(folder), str(tmp_path / "run1")]) in (0, 2)
    assert not marker.exists()

    # pickled weights (pytorch_model.bin) instead of safetensors, holding a payload
    folder = hf_folder(tmp_path / "bin")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "note": Payload(marker)}, folder / "pytorch_model.bin")
    capsys.readouterr()  # transformers' progress bars while saving
    code = main(["import", "hf", str(folder), str(tmp_path / "run2")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert not marker.exists()


def test_import_nanogpt_never_runs_code_from_its_files(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    torch.save({"model": {}, "note": Payload(marker)}, tmp_path / "ckpt.pt")
    assert main(["import", "nanogpt", str(tmp_path / "ckpt.pt"), str(tmp_path / "run")]) == 2
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "stoi": Payload(marker)}))
    assert main(["import", "nanogpt-data", str(data), str(tmp_path / "prepared")]) == 2
    err = capsys.readouterr().err
    assert all(line.startswith("error: ") for line in err.splitlines()) and "Traceback" not in err
    assert not marker.exists()


def test_the_metadata_reader_builds_only_checkpoint_types(trained):
    """The restricted reader reads what torch wrote, and refuses a payload whether it is the file or inside it."""
    from gptlab.safe_pickle import RefusedPickle, load_metadata

    folder = step(trained) / "train_state"
    assert (
        read_dcp_metadata(folder).state_dict_metadata.keys()
        == pickle.loads((folder / ".metadata").read_bytes()).state_dict_metadata.keys()
    )
    with pytest.raises(RefusedPickle, match="refused to build posix.system"):
        load_metadata(pickle.dumps({"metadata": Payload(Path("/nonexistent/marker"))}))
    with pytest.raises(RefusedPickle, match="holds a dict, not checkpoint metadata"):
        load_metadata(pickle.dumps({"a": 1}))
    # BUILD would otherwise set attributes of an allowed class, an enum member or a dataclass beyond its fields,
    # for the rest of the process: PROTO 4, GLOBAL, a state, BUILD, STOP
    a_class = b"\x80\x04cpathlib\nPurePosixPath\nN}\x8c\x0a__module__\x8c\x04evils\x86b."
    member = b"\x80\x04ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00\x85R}\x8c\x01a\x8c\x01bsb."
    extra_field = b"\x80\x04ctorch.distributed.checkpoint.metadata\nStorageMeta\n)\x81}\x8c\x01a\x8c\x01bsb."
    for data, what in ((a_class, "state of a type"), (member, "state of a _MEM_FORMAT_ENCODING"),
                       (extra_field, "state of StorageMeta with fields it does not have")):  # fmt: skip
        with pytest.raises(RefusedPickle, match=what):
            load_metadata(data)
    assert Path.__module__ == "pathlib"
