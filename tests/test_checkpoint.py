from pathlib import Path

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.train import checkpoint as ckpt
from gptlab.train.trainer import Trainer


def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(prepared, monkeypatch):
    from dataclasses import replace

    Trainer(replace(prepared, train=replace(prepared.train, max_iters=10)), quiet=True).fit()
    root = Path(prepared.train.out_dir) / "checkpoints"
    assert ckpt.read_pointer(root / "latest") == "step_10"

    def crash(*args, **kwargs):  # the training state is already written when the weights' write dies
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    longer = replace(prepared, train=replace(prepared.train, max_iters=20))
    with pytest.raises(GptlabError) as e:
        Trainer(longer, resume=True, quiet=True).fit()
    assert str(e.value) == (
        f"could not write checkpoint '{root / 'step_15'}' (OSError: disk full) (free disk space or fix the folder's "
        "permissions; the previous checkpoint is kept)"
    )
    monkeypatch.undo()
    assert ckpt.read_pointer(root / "latest") == "step_10"
    assert not (root / "step_15").exists()  # only a temporary folder was left, under another name
    cfg, model, tok = ckpt.load_run(prepared.train.out_dir, "latest")
    resumed = Trainer(longer, resume=True, quiet=True)
    assert resumed.step == 10
    resumed.fit()
    assert resumed.step == 20 and not list(root.glob(".tmp-*"))


def test_corrupted_and_truncated_checkpoints_are_user_errors(prepared):
    Trainer(prepared, quiet=True).fit()
    step = Path(prepared.train.out_dir) / "checkpoints" / "step_20"
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GptlabError) as e:
        ckpt.load_run(prepared.train.out_dir, "latest")
    assert str(e.value).startswith(f"checkpoint '{step}' is corrupted: model.safetensors unreadable (")
    assert str(e.value).endswith("(pick an older checkpoint)")

    state = step / "state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(GptlabError) as e:
        ckpt.load_state(step)
    assert str(e.value) == f"checkpoint '{step}' is corrupted: state.pt unreadable (pick an older checkpoint)"

    (step / "meta.json").write_text('{"format_version": 99, "step": 20}')
    with pytest.raises(GptlabError) as e:
        ckpt.read_meta(step)
    assert str(e.value) == (
        f"checkpoint '{step}' has format version 99, expected 2 (use the gptlab version that wrote it)"
    )


def test_weights_of_another_shape_are_refused(prepared):
    Trainer(prepared, quiet=True).fit()
    path = ckpt.find_checkpoint(prepared.train.out_dir, "latest")
    from dataclasses import replace

    from gptlab.model import GPT

    other = GPT(replace(prepared.model, n_embd=64, vocab_size=30))
    with pytest.raises(GptlabError) as e:
        ckpt.load_model_tensors(other, ckpt.load_weights(path), str(path))
    assert str(e.value).startswith(f"checkpoint '{path}' does not match the model config: shape of ")


def test_state_holds_only_weights_only_safe_types(prepared):
    Trainer(prepared, quiet=True).fit()
    path = ckpt.find_checkpoint(prepared.train.out_dir, "latest")
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 20 and len(state["rng"]) == 1  # one RNG state per rank
    ckpt.set_rng_state(state["rng"][0])  # restores without error
    assert (path / "train_state" / ".metadata").is_file()  # the model and optimizer state, by parameter name


def test_a_stop_before_the_first_step_saves_nothing(prepared, capsys):
    """A checkpoint at step 0 would hold an optimizer state torch.distributed.checkpoint had to invent (a zero step)."""
    trainer = Trainer(prepared, quiet=True)
    trainer._stop_requested = True  # Ctrl-C while the run was starting
    trainer.fit()
    assert trainer.step == 0 and not (Path(prepared.train.out_dir) / "checkpoints").exists()
    assert "interrupted before the first step: nothing to save" in capsys.readouterr().err
