"""Reading pickles that gptlab did not write (a shared run directory, a downloaded model) without running code.

Run directories are shared: copied from a cluster, downloaded, sent by a colleague. torch's own reader of a
`torch.distributed.checkpoint` folder (a checkpoint's train_state/) unpickles `.metadata` with the full `pickle`
and the non-tensor items of the `.distcp` files with `torch.load(weights_only=False)`, so a planted `__reduce__`
runs on load. Here `.metadata` goes through an unpickler that builds only the classes torch's checkpoint metadata
is made of (a fixed list, nothing callable beyond them, state set only on their dataclass instances), and every
non-tensor item through torch's restricted unpickler (`weights_only=True`: tensors and plain containers) before
the planner sees it. Tensor items are read with `weights_only=True` already. `weights_only_refusal` tells such a
refusal from a damaged file.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem


class RefusedPickle(pickle.UnpicklingError):
    """A checkpoint file asked to build something a checkpoint never holds."""


def _metadata_classes() -> dict[tuple[str, str], Any]:
    """What `.metadata` may name: torch's checkpoint-metadata dataclasses and enums, and the values inside them."""
    allowed: dict[tuple[str, str], Any] = {}
    for name, obj in vars(dcp_metadata).items():  # the module's own data types, whatever this torch version has
        if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__:
            if dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum):
                allowed[(dcp_metadata.__name__, name)] = obj
    allowed[(_StorageInfo.__module__, _StorageInfo.__name__)] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):  # dtypes are pickled by name (torch.float32); they are values, not callables
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> torch.layout
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls  # StorageMeta.checkpoint_id: where it was written
    return allowed


class _MetadataUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD opcode can be checked too
    """An unpickler that resolves only the globals of `_metadata_classes` (every GLOBAL, STACK_GLOBAL, INST and EXT
    opcode goes through `find_class`, Python's documented way to restrict unpickling) and sets the state (BUILD) of
    their dataclass instances only, field by field: never of a class, an enum member or a path, which BUILD would
    otherwise rewrite for the whole process."""

    allowed = _metadata_classes()
    buildable = frozenset(c for c in allowed.values() if isinstance(c, type) and dataclasses.is_dataclass(c))
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedPickle(f"refused to build {module}.{name}, which is no part of a checkpoint") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused a persistent id, which is no part of a checkpoint's metadata")

    def load_build(self) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        cls = type(inst)
        if cls not in self.buildable:
            raise RefusedPickle(f"refused to set the state of a {cls.__name__}, which is no part of a checkpoint")
        if "__setstate__" not in vars(cls):  # a plain dataclass: its own fields only (torch's __setstate__ checks)
            fields = {f.name for f in dataclasses.fields(cls)}
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state, None)  # (dict, slots)
            if not all(p is None or (isinstance(p, dict) and set(p) <= fields) for p in parts):
                raise RefusedPickle(f"refused a state of {cls.__name__} with fields it does not have")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


# how torch's weights-only unpickler says it refused to build or call something (a damaged file says other things:
# "Unsupported operand", "truncated", ...)
REFUSALS = ("GLOBAL", "Can only create new object", "Can only build", "must be imported to load")


def weights_only_refusal(e: BaseException) -> str | None:
    """What a `torch.load(weights_only=True)` error says was refused, if it refused a global (not a damaged file)."""
    for part in str(e).split("\n\n"):  # torch wraps the reason in paragraphs of advice
        if any(word in part for word in REFUSALS):
            return " ".join(part.split())[:200]
    return None


def load_metadata(data: bytes) -> Metadata:
    """A `.metadata` file's contents, built only from checkpoint-metadata types."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise RefusedPickle(f"the file holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def read_dcp_metadata(folder: str | os.PathLike, rank: int | None = None) -> Metadata:
    """The `.metadata` file of a checkpoint folder (or a rank's own `__N.metadata`), read by `load_metadata`."""
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    return load_metadata(Path(folder, name).read_bytes())


class SafeFileSystemReader(FileSystemReader):
    """torch's `FileSystemReader`, with `.metadata` read by `load_metadata` instead of `pickle.load`, and the data
    it points at checked to lie inside the folder's own files (not /etc/passwd, not 1 TB of /dev/zero)."""

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        sizes: dict[str, int] = {}
        for info in metadata.storage_data.values():
            name = info.relative_path
            if name not in sizes:
                if Path(name).name != name or name in ("", ".", ".."):
                    raise RefusedPickle(f"the metadata points at '{name}', outside the checkpoint's folder")
                sizes[name] = Path(self.path, name).stat().st_size  # a missing file: FileNotFoundError, damaged
            if not 0 <= info.offset <= info.offset + info.length <= sizes[name]:
                raise ValueError(f"the metadata points past the end of '{name}' (a truncated file)")
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(self.path, kwargs.get("rank"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """torch's `DefaultLoadPlanner`, whose non-tensor items pass torch's restricted unpickler first."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = value.read()
        try:  # refuses any global but tensors' rebuild functions and plain containers: nothing it builds runs code
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            reason = weights_only_refusal(e)
            if reason is None:
                raise  # damaged, not refused
            raise RefusedPickle(f"item '{read_item.dest_index.fqn}': {reason}") from e
        super().load_bytes(read_item, io.BytesIO(data))  # what was accepted builds the same plain objects again
