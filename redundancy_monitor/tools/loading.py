"""What offline scoring reads: a local checkpoint, its tokenizer, and text cut into a
probe batch plus a disjoint held-out part. Nothing is downloaded (local_files_only).

transformers is imported here, on demand, never by `import redundancy_monitor`.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path
from typing import Any

import torch

from redundancy_monitor.errors import CheckpointError
from redundancy_monitor.extras import require

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"unknown device {device!r}; pass e.g. cpu, cuda or cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(
            f"device {device!r} asked for, but CUDA is not available; pass --device cpu"
        )
    return dev


def _gguf_location(path: Path) -> dict[str, Any]:
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            f"{path.name} is a GGUF file; reading it needs the optional 'gguf' package: "
            "pip install 'redundancy-monitor[gguf]'"
        )
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def _location(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{str(path)!r} is a file but not a .gguf; pass a Hugging Face checkpoint "
                "folder (config.json + weights) or a .gguf file"
            )
        return path, _gguf_location(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{str(path)!r} has no config.json; pass a Hugging Face checkpoint folder saved "
            "with save_pretrained, or a .gguf file"
        )
    return path, {"pretrained_model_name_or_path": str(path)}


def load_checkpoint(
    path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
):
    """Load a causal LM and its tokenizer from a local folder or .gguf file.

    Args:
        path: a folder with config.json and weights (tokenizer files optional), or a
            ``.gguf`` file (needs the ``gguf`` extra).
        tokenizer: a folder (or .gguf) to take the tokenizer from instead of `path`.
        dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        CheckpointError: missing path, not a causal LM, no tokenizer, unknown dtype or
            device, gguf package missing.
    """
    require("transformers", "loading a checkpoint")  # fails naming the extra to install
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dev = resolve_device(device)
    path, where = _location(path)
    # Files from users are hostile: whatever a damaged or forged config, weights file
    # (a truncated model.safetensors raises SafetensorError) or tokenizer raises becomes
    # one line naming the file, not a traceback.
    try:
        config = AutoConfig.from_pretrained(**where, local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read the config of {str(path)!r}: {_first_line(e)}"
        ) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(
            f"{str(path)!r} is not a causal LM (model_type {config.model_type!r} has no "
            "causal-LM class in transformers); score needs a decoder-only language model"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            **where, local_files_only=True, dtype=DTYPES[dtype]
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot load weights from {str(path)!r}: {type(e).__name__}: {_first_line(e)}; "
            "the weights file is damaged or not a checkpoint: save it again"
        ) from None
    tok = load_tokenizer(path if tokenizer is None else tokenizer)
    # transformers 5 types `to` through a decorator that mypy reads as taking the model
    # (other versions do not: unused-ignore keeps the check quiet there)
    return model.to(dev).eval(), tok  # type: ignore[arg-type, unused-ignore]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local folder (or a .gguf file); nothing is downloaded.

    Raises:
        CheckpointError: the path does not exist or holds no usable tokenizer.
    """
    require("transformers", "loading a tokenizer")
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"tokenizer path {str(path)!r} does not exist; pass --tokenizer DIR")
    gguf = path.is_file() and path.suffix.lower() == ".gguf"
    where = _gguf_location(path) if gguf else {"pretrained_model_name_or_path": str(path)}
    try:
        return AutoTokenizer.from_pretrained(**where, local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"no usable tokenizer in {str(path)!r} ({_first_line(e)}); pass --tokenizer DIR"
        ) from None


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Fail before any work when `path` cannot be a folder to write into (it is created
    later if missing).

    Raises:
        CheckpointError: `path` is a file, or cannot be created or written.
    """
    folder = Path(path)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise CheckpointError(
                f"{flag} {str(folder)!r} is a file, not a folder; pass a folder to write into "
                "(it is created if missing)"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CheckpointError(f"{flag} {str(folder)!r} is not writable; pass another folder")
        return
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(
            f"{flag} {str(folder)!r} cannot be created: {str(parent)!r} is a file; pass a "
            "folder path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"{flag} {str(folder)!r} cannot be created: {str(parent)!r} is not writable"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_text(sources: list[str]) -> str:
    """Concatenate text files (``-`` = stdin), separated by blank lines.

    Raises:
        CheckpointError: a file cannot be read, is not UTF-8, or is binary (holds NUL
            bytes). Decoding leniently would probe on replacement characters without a word.
    """
    parts = []
    for source in sources:
        name = "standard input" if source == "-" else f"text file {source!r}"
        try:
            if source != "-" and stat.S_ISCHR(os.stat(source).st_mode):
                raise CheckpointError(f"{name} is a device, not a text file; pass a text file")
            data = _read_stdin() if source == "-" else Path(source).read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {name}: {e.strerror}") from None
        parts.append(decode_text(data, name))
    return "\n\n".join(parts)


def _read_stdin() -> bytes:
    buffer = getattr(sys.stdin, "buffer", None)  # None when replaced by a text stream
    return buffer.read() if buffer is not None else sys.stdin.read().encode("utf-8")


def decode_text(data: bytes, name: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped).

    Raises:
        CheckpointError: not UTF-8, or binary (NUL bytes), naming where.
    """
    nul = data.find(b"\0")
    if nul >= 0:
        raise CheckpointError(
            f"{name} is binary, not text (a NUL byte at offset {nul}); pass a plain UTF-8 text file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass another file"
        ) from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_batch_shape(n_seq: int, seq_len: int) -> None:
    if n_seq < 1 or seq_len < 2:
        raise CheckpointError(f"need --n-seq >= 1 and --seq-len >= 2, got {n_seq} and {seq_len}")


def probe_batch_from_text(tokenizer, text: str, n_seq: int, seq_len: int) -> torch.Tensor:
    """Up to `n_seq` consecutive sequences of `seq_len` tokens from the start of `text`
    (all of it may be used: nothing is held out).

    Raises:
        CheckpointError: bad sizes, or too little text for one sequence.
    """
    check_batch_shape(n_seq, seq_len)
    ids = tokenize(tokenizer, text)
    n = min(n_seq, len(ids) // seq_len)
    if n == 0:
        raise CheckpointError(
            f"the text has {len(ids)} tokens, too few for one sequence of --seq-len {seq_len}; "
            "pass more text or a smaller --seq-len"
        )
    return ids[: n * seq_len].reshape(n, seq_len)


def load_probe_batch(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (and mask) saved with ``torch.save``: a ``[n_seq, seq_len]`` tensor,
    ``(ids, mask)``, or a dict with ``input_ids`` (and ``attention_mask``). Read with
    the weights-only loader: a file holding anything but tensors and containers is refused.

    Raises:
        CheckpointError: unreadable, or not tensors.
        InvalidBatchError: not usable as a probe batch.
    """
    from redundancy_monitor.probing.batch import make_batch
    from redundancy_monitor.probing.inputs import ids_and_mask

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read --probe-batch {str(path)!r}: {e.strerror}") from None
    except Exception as e:
        raise CheckpointError(
            f"--probe-batch {str(path)!r} is not a tensor file the weights-only loader reads "
            f"({_first_line(e)}); save token ids with torch.save(ids, path)"
        ) from None
    ids, mask = ids_and_mask(data)
    make_batch(ids, mask)  # refuses what no probe could use, here rather than per checkpoint
    return ids, mask
