"""Reading a torch.distributed.checkpoint (DCP) folder into one plain module, in one process.

FSDP2 and ModelParallel runs save DCP folders: per-rank ``*.distcp`` data files, then a
``.metadata`` file renamed into place, so its presence marks a complete save. DCP itself
reads ``.metadata`` with plain pickle and non-tensor entries with
``torch.load(weights_only=False)``; either can run code hidden in a hostile file. Here
the metadata goes through an unpickler that builds only DCP's own metadata types, and
only tensors are read (by DCP's weights-only tensor loader), resharded into the full
tensors of the module.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redundancy_monitor.errors import CheckpointError

METADATA_FILE = ".metadata"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def is_dcp_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses and enums, torch dtypes and sizes; nothing else."""

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and (
                dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)
            ):
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _OTHER_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"a {METADATA_FILE} file refers to {module}.{name}, which a DCP checkpoint's "
            "metadata never holds; the file was not written by torch.distributed.checkpoint "
            "(or by a newer version); it was not loaded"
        )


def read_metadata(path: Path):
    """The `Metadata` of the DCP folder `path`, read without running code from it.

    Raises:
        CheckpointError: unreadable, or not DCP metadata.
    """
    try:
        with open(path / METADATA_FILE, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / METADATA_FILE}: {exc}") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path / METADATA_FILE} does not hold DCP metadata")
    return metadata


def tensor_shapes(path: Path) -> dict[str, torch.Size]:
    """Every tensor the DCP folder `path` holds (flattened key -> full shape)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {
        key: entry.size
        for key, entry in read_metadata(path).state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }


def load_into(module: nn.Module, path: Path, prefix: str) -> None:
    """Copy the tensors saved under ``prefix + <module key>`` in `path` into `module`.

    Weights the checkpoint lacks are an error unless they share storage with one it
    holds (tied embeddings).

    Raises:
        CheckpointError: a missing or differently shaped weight, unsafe metadata.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    saved = tensor_shapes(path)
    own = module.state_dict(keep_vars=False)
    wanted = {prefix + k: v for k, v in own.items() if prefix + k in saved}
    _check_complete(path, own, wanted, prefix)
    wrong = [k for k, v in wanted.items() if tuple(saved[k]) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path} holds {k} with shape {tuple(saved[k])}, the module built from the model "
            f"config has {tuple(wanted[k].shape)}; check the config matches the run"
        )

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(Path(self.path))
            metadata.storage_meta = StorageMeta(load_id=self.load_id)
            return metadata

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            raise CheckpointError(
                f"{path}: {read_item.dest_index.fqn} is a pickled object, not a tensor; "
                "it was not loaded"
            )

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*single process")
        with torch.no_grad():
            dcp.load(wanted, storage_reader=Reader(path), planner=TensorsOnly(), no_dist=True)


def _check_complete(path: Path, own: dict, wanted: dict, prefix: str) -> None:
    loaded = {v.untyped_storage().data_ptr() for k, v in own.items() if prefix + k in wanted}
    missing = [
        k
        for k, v in own.items()
        if prefix + k not in wanted and v.untyped_storage().data_ptr() not in loaded
    ]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weight(s) of the module built from the model config "
            f"(e.g. {prefix}{missing[0]}); check the config matches the run, or set "
            "state_dict_prefix in it"
        )
