"""`redundancy-monitor replay`: the gap trajectory of a series of saved checkpoints.

Each checkpoint is loaded in step order and probed on one fixed batch; the results go
through the `Recorder` a live monitor uses (its JSONL and TensorBoard sinks and its alert
rules), so the run folder holds exactly what the monitor writes during training. The
recorder's state is saved after every checkpoint; an interrupted replay resumes from it
the way a resumed training run does, and already probed steps are not redone.
`ReplayRun` is that run folder; `redundancy-monitor watch` (tools/watch.py) records
through it too.

transformers (and torch's unpickler for Lightning files) are used only here, on demand.
Checkpoint files are hostile until the user says otherwise: discovery reads names only,
Lightning files are read with torch's safe loader (``weights_only=True``) unless
`trust_checkpoints` is set, and a ``--model-config`` class is imported only from
transformers, torch or a module the user trusts by name, and must be an `nn.Module`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redundancy_monitor.errors import (
    CheckpointError,
    CheckpointVanished,
    InvalidConfigError,
    InvalidPairsError,
    InvalidProtocolError,
    MissingModelConfig,
    MonitorStateError,
    RedundancyMonitorError,
)
from redundancy_monitor.files import RECORD_FILE, write_json_atomic
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.guard import protocols_identity, same_pair_set
from redundancy_monitor.monitoring.jsonl import JsonlSink
from redundancy_monitor.monitoring.probe_config import ProbeConfig
from redundancy_monitor.monitoring.record import ProbeRecord
from redundancy_monitor.monitoring.recorder import Recorder
from redundancy_monitor.monitoring.sinks import Sink
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
from redundancy_monitor.probing.batch import make_batch
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.result import Thresholds
from redundancy_monitor.tools import dcp

log = logging.getLogger("redundancy_monitor")

STATE_FILE = "replay_state.json"
#: What a replay's `probe_failure` alert says happens next (no training runs here).
REPLAY_AFTER_FAILURE = "the checkpoint is recorded as failed and the next one is probed"
#: What a replay's refusal of a checkpoint of another model (or depth) advises.
REPLAY_MISMATCH_HINT = (
    "Replay the checkpoints of each model into a folder of its own (replay --out, watch --log-dir)."
)
HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----- finding checkpoints and their steps ----------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """One saved checkpoint: its optimizer step, where it is, and its format."""

    step: int
    path: Path
    kind: str  # "hf" (a save_pretrained folder), "lightning" (a .ckpt file) or "dcp"


def is_hf_checkpoint(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and any((path / w).is_file() for w in HF_WEIGHTS)
    )


def _step_from_name(name: str) -> int | None:
    for pattern in (r"step[-_=]?(\d+)", r"checkpoint[-_](\d+)", r"^(\d+)$"):
        match = re.search(pattern, name)
        if match:
            return int(match.group(1))
    return None


def _load_lightning_file(path: Path, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's contents, read with torch's safe loader.

    Lightning files may pickle hyper-parameters (Namespace, custom classes) that the safe
    loader refuses; unpickling those runs whatever code the file names, so it is done
    only when the user trusts the file (`trust`, ``--trust-checkpoints``).
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trust:
            raise CheckpointError(
                f"cannot read Lightning checkpoint {path} with the safe loader "
                f"({_first_line(exc)}); if it pickles objects and you trust the file, pass "
                "--trust-checkpoints (trust_checkpoints=True): unpickling runs code the file names"
            ) from None
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as unsafe:
            raise CheckpointError(
                f"cannot read Lightning checkpoint {path}: {_first_line(unsafe)}"
            ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a {type(data).__name__}, not a Lightning checkpoint (a dict)"
        )
    return data


def _first_line(exc: BaseException) -> str:
    # without terminal colour codes (torch's safe loader bolds part of its message)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _trainer_state_step(folder: Path) -> int | None:
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, still being written, or not JSON
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def checkpoint_step(path: Path, kind: str, read_file: bool = True, trust: bool = False) -> int:
    """The optimizer step of a checkpoint: trainer state, then name, then (for a Lightning
    file named by the user, `read_file`) its ``global_step``, read with the safe loader
    (`trust`: with the full unpickler if that fails). A DCP folder without a step of its
    own takes its parent's (an HF ``checkpoint-<step>`` folder holding it).

    Raises:
        CheckpointError: no step to be found.
    """
    if kind == "lightning":
        step = _step_from_name(path.stem)
        if step is None and read_file:
            step = _load_lightning_file(path, trust).get("global_step")
    else:
        for folder in (path, path.parent) if kind == "dcp" else (path,):
            step = _trainer_state_step(folder)
            step = _step_from_name(folder.name) if step is None else step
            if step is not None:
                break
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(
            f"cannot tell the optimizer step of {path}: it has no trainer_state.json and no "
            "step in its name; rename it like checkpoint-<step> (or step=<step>.ckpt)"
        )
    return step


def checkpoints_in(path: Path, named: bool = True) -> list[tuple[Path, str, bool]]:
    """``(checkpoint, kind, named by the user)`` of every checkpoint at or under `path`,
    complete or not; names only, no file is read (`named`: `path` itself was given)."""
    if path.is_file():
        if path.suffix == ".ckpt":
            return [(path, "lightning", named)]
        raise CheckpointError(
            f"{path} is a file but not a Lightning .ckpt; pass a Hugging Face checkpoint "
            "folder (config.json + weights), a .ckpt file, or a folder holding them"
        )
    if is_hf_checkpoint(path):
        return [(path, "hf", named)]
    if dcp.is_dcp_checkpoint(path):
        return [(path, "dcp", named)]
    found: list[tuple[Path, str, bool]] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() or child.suffix == ".ckpt":
            try:
                found.extend(checkpoints_in(child, named=False))
            except CheckpointError:
                continue  # other files and folders in a run directory are fine
    return found


def find_checkpoints(
    paths: Sequence[str | os.PathLike], trust: bool = False
) -> list[CheckpointRef]:
    """Every checkpoint named by `paths` (checkpoints or folders holding them), by step.

    Found in a folder, a checkpoint's step comes from its ``trainer_state.json`` or its
    name, never from its contents: a ``.ckpt`` without a step in its name (``last.ckpt``)
    is left out with a warning. A ``.ckpt`` named directly may have its ``global_step``
    read with the safe loader (`trust`: with the full unpickler if that fails).
    Two checkpoints at one step keep the first by path, with a warning.

    Raises:
        CheckpointError: a path does not exist, or nothing found in a folder.
    """
    refs: dict[int, CheckpointRef] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        found = checkpoints_in(path)
        if not found:
            raise CheckpointError(
                f"no checkpoint in {path}: expected Hugging Face checkpoint folders "
                "(config.json + model.safetensors or pytorch_model.bin), Lightning .ckpt "
                "files or torch.distributed.checkpoint folders (with a .metadata file)"
            )
        for found_path, kind, named in found:
            if kind == "lightning" and not named and _step_from_name(found_path.stem) is None:
                log.warning(
                    "replay: leaving out %s: no step in its name (the file is not read to "
                    "find one); name it step=<step>.ckpt, or pass it on its own",
                    found_path,
                )
                continue
            step = checkpoint_step(found_path, kind, read_file=named, trust=trust)
            ref = CheckpointRef(step, found_path, kind)
            if ref.step in refs:
                log.warning(
                    "replay: %s is at step %d like %s; keeping only the latter",
                    ref.path,
                    ref.step,
                    refs[ref.step].path,
                )
                continue
            refs[ref.step] = ref
    return [refs[s] for s in sorted(refs)]


# ----- building models ------------------------------------------------------------------


@dataclass
class ModelLoader:
    """Turns a `CheckpointRef` into a model on `device`.

    Hugging Face folders load with ``from_pretrained``. Lightning files and
    torch.distributed.checkpoint (DCP) folders need `model_config`: a Hugging Face
    ``config.json`` (or its folder), or a JSON file
    ``{"class": "package.module:ClassName", "kwargs": {...}}`` for another `nn.Module`
    (from transformers, torch, or a module listed in `trusted_modules`); either may set
    ``"state_dict_prefix"`` (found automatically otherwise, e.g. ``model.`` for a
    LightningModule holding the LM as ``self.model``). A DCP folder without one uses the
    ``config.json`` in it or beside it (an HF checkpoint folder holding it).

    Lightning files are read with the safe loader (weights only); `trust_checkpoints`
    lets one it refuses be unpickled in full, which runs code from the file: only for
    files you trust. DCP folders are never unpickled (see `tools.dcp`).
    """

    model_config: str | os.PathLike | None = None
    dtype: str = "auto"
    device: str = "cpu"
    trust_checkpoints: bool = False
    trusted_modules: tuple[str, ...] = ()
    _template: nn.Module | None = field(default=None, init=False, repr=False)
    _prefix: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")

    def __call__(self, ref: CheckpointRef) -> nn.Module:
        if ref.kind == "hf":
            model = self._hf(ref.path)
        elif ref.kind == "dcp":
            model = self._dcp(ref)
        else:
            model = self._lightning(ref.path)
        if self.dtype != "auto":
            model = model.to(DTYPES[self.dtype])
        return model.to(self.device).eval()

    def _hf(self, path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs = {} if self.dtype == "auto" else {"dtype": DTYPES[self.dtype]}
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)

    def model_config_for(self, ref: CheckpointRef) -> str | os.PathLike | None:
        """The config the model of a Lightning file or DCP folder is built from."""
        if self.model_config is not None or ref.kind != "dcp":
            return self.model_config
        beside = [f / "config.json" for f in (ref.path, ref.path.parent)]
        return next((c for c in beside if c.is_file()), None)

    def template(self, model_config: str | os.PathLike | None = None) -> nn.Module:
        """The module Lightning or DCP weights are loaded into, built once from
        `model_config` (default: the loader's)."""
        if self._template is None:
            self._template, self._prefix = build_module(
                model_config or self.model_config, self.trusted_modules
            )
        return self._template

    def _dcp(self, ref: CheckpointRef) -> nn.Module:
        module = self.template(self.model_config_for(ref))
        shapes = dcp.tensor_shapes(ref.path)
        prefix = self._prefix if self._prefix is not None else state_dict_prefix(module, shapes)
        dcp.load_into(module, ref.path, prefix)
        return module

    def _lightning(self, path: Path) -> nn.Module:
        module = self.template()
        data = _load_lightning_file(path, self.trust_checkpoints)
        state = data.get("state_dict", data)
        prefix = self._prefix if self._prefix is not None else state_dict_prefix(module, state)
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing = module.load_state_dict(weights, strict=False).missing_keys
        if missing:
            raise CheckpointError(
                f"{path} lacks {len(missing)} weight(s) of the module built from "
                f"--model-config (e.g. {missing[:3]}); check the config matches the run, or "
                "set state_dict_prefix in it"
            )
        return module


#: Packages a ``--model-config`` class may come from without the user naming its module.
TRUSTED_PACKAGES = ("transformers", "torch")


def build_module(
    model_config: str | os.PathLike | None, trusted_modules: Sequence[str] = ()
) -> tuple[nn.Module, str | None]:
    """The module a Lightning checkpoint's weights go into, and its state-dict prefix.

    A ``"class"`` is imported only from transformers, torch or a module in
    `trusted_modules` (``--trust-module``), and only an `nn.Module` subclass is built.

    Raises:
        CheckpointError: no config given, unreadable, or naming nothing buildable.
    """
    if model_config is None:
        raise MissingModelConfig(
            "Lightning .ckpt files and torch.distributed.checkpoint folders hold weights "
            "only; pass --model-config with a Hugging Face config.json (or its folder), or a "
            'JSON file {"class": "package.module:ClassName", "kwargs": {...}}'
        )
    path = Path(model_config)
    path = path / "config.json" if path.is_dir() else path
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read --model-config {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"--model-config {path} must hold a JSON object")
    prefix = spec.pop("state_dict_prefix", None)
    if "class" in spec:
        cls = _module_class(str(spec["class"]), trusted_modules)
        kwargs = spec.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"--model-config {path}: 'kwargs' must be a JSON object")
        try:
            return cls(**kwargs), prefix
        except Exception as exc:
            raise CheckpointError(
                f"--model-config: {spec['class']}(**kwargs) failed: {_first_line(exc)}"
            ) from None
    if "model_type" in spec:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**spec)
        return AutoModelForCausalLM.from_config(config), prefix
    raise CheckpointError(
        f"--model-config {path} has neither 'model_type' (a Hugging Face config) nor 'class'"
    )


def _module_class(name: str, trusted_modules: Sequence[str]) -> type[nn.Module]:
    """The `nn.Module` subclass ``"package.module:ClassName"`` names, imported only from a
    trusted package (checked before anything is imported)."""
    module_name, _, class_name = name.partition(":")
    trusted = (*TRUSTED_PACKAGES, *trusted_modules)
    if not any(module_name == t or module_name.startswith(t + ".") for t in trusted):
        raise CheckpointError(
            f"--model-config names class {name!r} from module {module_name!r}, which is not "
            f"trusted: classes are imported only from {', '.join(TRUSTED_PACKAGES)} or a "
            f"module you name with --trust-module {module_name.split('.')[0] or 'MODULE'}"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"--model-config names class {name!r}, which cannot be imported ({exc}); use "
            "'package.module:ClassName' importable from here"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(
            f"--model-config names {name!r}, which is not an nn.Module class; name the "
            "model class the checkpoint's weights belong to"
        )
    return cls


def state_dict_prefix(module: nn.Module, state: dict[str, Any]) -> str:
    """The prefix that maps a checkpoint's keys onto `module`'s (``""`` or e.g. ``model.``).

    Raises:
        CheckpointError: no prefix makes every weight of `module` appear.
    """
    wanted = list(module.state_dict())
    if not wanted:
        return ""
    anchor = wanted[0]
    candidates = sorted({k[: -len(anchor)] for k in state if k.endswith(anchor)}, key=len)
    for prefix in candidates:
        if all(prefix + k in state for k in wanted):
            return prefix
    raise CheckpointError(
        f"the checkpoint's weights do not match the module built from --model-config (it "
        f"expects e.g. {anchor!r}; the file has e.g. {list(state)[:3]}); check the config, or "
        "set state_dict_prefix in it"
    )


# ----- the probe batch -----------------------------------------------------------------


def max_positions(ref: CheckpointRef, load_model: Callable) -> int | None:
    """The most positions the model of `ref` takes (``max_position_embeddings``), read
    from its config without loading weights; None when unknown (no such limit)."""
    config = None
    if ref.kind == "hf":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(ref.path, local_files_only=True)
        except Exception:  # a damaged config fails that checkpoint's probe, with its reason
            return None
    elif isinstance(load_model, ModelLoader):
        try:
            config = getattr(load_model.template(load_model.model_config_for(ref)), "config", None)
        except CheckpointError:
            return None
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def check_positions(
    checkpoints: Sequence[CheckpointRef], load_model: Callable, seq_len: int
) -> None:
    """Refuse, before any work, a probe batch longer than a checkpoint's model takes
    (every probe of it would fail).

    Raises:
        CheckpointError: naming the checkpoint and the longest usable ``--seq-len``.
    """
    for ref in checkpoints:
        limit = max_positions(ref, load_model)
        if limit is not None and seq_len > limit:
            raise CheckpointError(
                f"--seq-len {seq_len} exceeds the {limit} positions the model of {ref.path} "
                f"takes (max_position_embeddings); pass --seq-len {limit} or less"
            )


def find_tokenizer(checkpoints: Sequence[CheckpointRef]) -> Path:
    for ref in checkpoints:
        if ref.kind == "hf" and any((ref.path / f).is_file() for f in TOKENIZER_FILES):
            return ref.path
    raise CheckpointError(
        "none of the checkpoints holds tokenizer files; pass --tokenizer DIR (a folder "
        "saved with tokenizer.save_pretrained)"
    )


# ----- the run folder -------------------------------------------------------------------


def _same_setting(key: str, saved, now, n_layers: int | None) -> bool:
    if key == "pairs":  # "adjacent", "window:1" and the explicit list are one pair set
        return same_pair_set(saved, now, n_layers)
    if key == "protocols":
        return protocols_identity(saved) == protocols_identity(now)
    return saved == now


def _check_settings(
    saved: dict[str, Any], settings: dict[str, Any], out_dir: Path, n_layers: int | None
) -> None:
    changed = [
        k for k in settings if k in saved and not _same_setting(k, saved[k], settings[k], n_layers)
    ]
    if changed:
        raise CheckpointError(
            f"{out_dir} holds a replay with other settings ({', '.join(changed)}: "
            f"{[saved[k] for k in changed]} then, {[settings[k] for k in changed]} now); "
            "resume with the same settings, or write into another folder (replay --out, "
            "watch --log-dir)"
        )


class ReplayRun:
    """A run folder that probes of saved checkpoints are recorded into, through the
    `Recorder` the live monitor uses (JSONL, TensorBoard, alerts), resumable from its
    state file.

    Opening a folder that holds a state file resumes it: its alert state, history and
    probed steps are restored, and the next `record` marks where the earlier records end.
    The state file keeps the recorder's state with the probed steps, under ``"monitor"``
    (the keys of a monitor's `state_dict()`).

    Args:
        out_dir: the run folder.
        input_ids, attention_mask: the probe batch, the same for every checkpoint.
        config: what each probe measures (`probe()` settings).
        alerts: the alert rules, evaluated over the series as during training.
        state_file: name of the state file in `out_dir`.

    Raises:
        CheckpointError: the folder holds a run with other settings.
        MonitorStateError: the folder holds a run of another probe batch.
        InvalidBatchError: a probe batch that cannot be used.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        input_ids: torch.Tensor,
        config: ProbeConfig,
        *,
        attention_mask: torch.Tensor | None = None,
        alerts: AlertConfig | None = None,
        state_file: str = STATE_FILE,
        sinks: Sequence[Sink] = (),
    ):
        self.config = config
        batch = make_batch(input_ids.detach().cpu(), _cpu(attention_mask))
        self.out_dir = Path(out_dir)
        make_run_folder(self.out_dir)
        self.state_path = self.out_dir / state_file
        self.settings = {"pairs": config.pairs, "protocols": list(config.protocols)}
        saved = {}
        if self.state_path.is_file():
            saved = json.loads(self.state_path.read_text(encoding="utf-8"))
            identity = saved["monitor"].get("trajectory") or {}
            _check_settings(
                saved.get("settings", {}), self.settings, self.out_dir, identity.get("n_layers")
            )
        state = saved.get("monitor", {})
        self._steps: list[int] = list(state.get("probed_steps", []))
        self._last_step: int | None = state.get("last_step")
        self._tensorboard = TensorBoardSink(
            log_dir=self.out_dir,
            purge_step=None if self._last_step is None else self._last_step + 1,
        )
        self.recorder = Recorder(
            [self._tensorboard, JsonlSink(self.out_dir / RECORD_FILE), *sinks],
            alerts=alerts,
            probe_config=self.config,
        )
        self.recorder.after_failure = REPLAY_AFTER_FAILURE
        self.recorder.mismatch_hint = REPLAY_MISMATCH_HINT
        if state:
            self.recorder.load_state_dict(state)
        try:
            self.recorder.use_batch(batch.sha256)
        except MonitorStateError:
            raise MonitorStateError(
                f"{self.out_dir} holds a replay of another probe batch; its trajectory "
                "would not be comparable. Resume with the same probe text and batch shape "
                "(--text, --n-seq, --seq-len, --tokenizer; watch: or the same --probe-batch), "
                "or write into another folder (replay --out, watch --log-dir)"
            ) from None
        self._ids, self._mask = input_ids, attention_mask
        self._started = False

    @property
    def probed_steps(self) -> set[int]:
        """Steps recorded so far (probed or failed), earlier sessions included."""
        return set(self._steps)

    @property
    def last_step(self) -> int | None:
        return self._last_step

    @property
    def alerts(self):
        return self.recorder.alerts

    def record(
        self, ref: CheckpointRef, load_model: Callable[[CheckpointRef], nn.Module]
    ) -> ProbeRecord:
        """Load and probe one checkpoint, record it, save the state.

        A checkpoint that fails to load or probe is recorded as a failed probe (with its
        alert).

        Raises:
            CheckpointError: `ref` is not after the last recorded step.
            CheckpointVanished: the checkpoint was deleted while it was read (nothing
                is recorded).
        """
        if self._last_step is not None and ref.step <= self._last_step:
            raise CheckpointError(
                f"{self.out_dir} already holds probes up to step {self._last_step}; {ref.path} "
                f"(step {ref.step}) would come out of order. Replay it into a new --out"
            )
        record = _probe_checkpoint(ref, load_model, self._ids, self._mask, self.config)
        if not self._started:  # after a resume: marks where the earlier records end
            resumed = self._last_step is not None
            self.recorder.mark_start(
                self._last_step + 1 if self._last_step is not None else ref.step, resumed
            )
            self._started = True
        self._last_step = ref.step
        self._steps.append(ref.step)
        self.recorder.record(record)
        try:  # a sidecar may be killed at any moment: keep TensorBoard as current as the state
            self._tensorboard.flush()
        except Exception as exc:
            log.warning("replay: flushing TensorBoard events failed: %s", exc)
        position = {"last_step": self._last_step, "probed_steps": list(self._steps)}
        state = {"settings": self.settings, "monitor": {**self.recorder.state_dict(), **position}}
        write_json_atomic(self.state_path, state, indent=1)
        return record

    def close(self) -> None:
        self.recorder.close()


def make_run_folder(out_dir: Path) -> None:
    """Create the run folder (and its parents).

    Raises:
        CheckpointError: it, or a folder above it, is a file, or it cannot be created.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"run folder {str(out_dir)!r} cannot be created: it or a folder above it is a "
            "file; pass a folder to write into (replay --out, watch --log-dir)"
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"run folder {str(out_dir)!r} cannot be created: {exc.strerror}"
        ) from None


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().cpu()


# ----- the replay -----------------------------------------------------------------------


@dataclass
class ReplayOutcome:
    """What one `replay` call did."""

    out_dir: Path
    probed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    n_alerts: int = 0
    #: step -> the first line of why each failed checkpoint failed
    errors: dict[int, str] = field(default_factory=dict)


def replay(
    checkpoints: Sequence[CheckpointRef],
    input_ids: torch.Tensor,
    out_dir: str | os.PathLike,
    load_model: Callable[[CheckpointRef], nn.Module],
    *,
    attention_mask: torch.Tensor | None = None,
    config: ProbeConfig | None = None,
    alerts: AlertConfig | None = None,
    progress: bool = True,
    pairs: str | None = None,
    protocols: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    batch_tokens: int | None = None,
) -> ReplayOutcome:
    """Probe `checkpoints` in step order into `out_dir`, resuming a replay already there.

    Args:
        checkpoints: from `find_checkpoints`.
        input_ids, attention_mask: the probe batch, the same for every checkpoint.
        out_dir: the run folder (``redundancy.jsonl``, TensorBoard events, replay state).
        load_model: builds the model of one checkpoint (e.g. a `ModelLoader`).
        config: what each probe measures, as for the monitor (None: the defaults).
        alerts: the alert rules, evaluated over the series as during training.
        progress: show a progress bar with an ETA.
        pairs, protocols, thresholds, batch_tokens: the older spelling of `config`
            (kept working); not together with `config`.

    Raises:
        CheckpointError: resuming with other settings, or a checkpoint earlier than the
            last one already replayed; `out_dir` is a file.
        MonitorStateError: resuming with another probe batch.
        InvalidConfigError: `config` together with its older keywords.

    A checkpoint that fails to load or probe is recorded as a failed probe (with its
    alert) and the replay goes on.
    """
    checkpoints = sorted(checkpoints, key=lambda c: c.step)
    config = probe_config_of(config, pairs, protocols, thresholds, batch_tokens)
    run = ReplayRun(out_dir, input_ids, config, attention_mask=attention_mask, alerts=alerts)
    outcome = ReplayOutcome(run.out_dir)
    done = run.probed_steps
    todo = [c for c in checkpoints if c.step not in done]
    outcome.already_done = sorted(c.step for c in checkpoints if c.step in done)
    n_alerts = len(run.alerts)
    bar = _progress(len(checkpoints), len(outcome.already_done), progress)
    try:
        for ref in todo:
            bar.set_postfix_str(f"step {ref.step}")
            record = run.record(ref, load_model)
            if record.failed:
                outcome.failed.append(ref.step)
                outcome.errors[ref.step] = (record.error or "failed").strip().splitlines()[0]
            else:
                outcome.probed.append(ref.step)
            bar.update(1)
    finally:
        bar.close()
        run.close()
    outcome.n_alerts = len(run.alerts) - n_alerts
    return outcome


def probe_config_of(
    config: ProbeConfig | None,
    pairs: str | None = None,
    protocols: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    batch_tokens: int | None = None,
) -> ProbeConfig:
    """`config`, or one made of the older keywords of `replay()` / `watch()`.

    Raises:
        InvalidConfigError: both given.
    """
    old: dict[str, Any] = {"pairs": pairs, "protocols": protocols, "thresholds": thresholds}
    old["batch_tokens"] = batch_tokens
    given = {k: v for k, v in old.items() if v is not None}
    if config is None:
        if protocols is not None:
            given["protocols"] = tuple(protocols)
        return ProbeConfig(**given)
    if given:
        raise InvalidConfigError(
            f"pass either config=ProbeConfig(...) or {', '.join(given)}, not both; "
            f"e.g. config=ProbeConfig({', '.join(f'{k}=...' for k in given)})"
        )
    if not isinstance(config, ProbeConfig):
        raise InvalidConfigError(f"config must be a ProbeConfig, got {type(config).__name__}")
    return config


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="replay", unit="ckpt", disable=not enabled)


def _probe_checkpoint(
    ref: CheckpointRef, load_model: Callable, ids, mask, config: ProbeConfig
) -> ProbeRecord:
    started = time.perf_counter()
    try:
        result, error = probe(load_model(ref), ids, mask, **config.probe_kwargs()), None
    except (InvalidPairsError, InvalidProtocolError, MissingModelConfig):
        raise  # a wrong setting, not a bad checkpoint: every other one would fail too
    except Exception as exc:  # one bad checkpoint must not end the replay
        if not ref.path.exists():
            raise CheckpointVanished(
                f"{ref.path} was deleted while it was being read ({type(exc).__name__}: {exc})"
            ) from None
        result = None
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())} ({ref.path})"
        if not isinstance(exc, RedundancyMonitorError):  # a refusal says it all in one line
            error += f"\n{traceback.format_exc(limit=6)}"
    return ProbeRecord(ref.step, result, error, time.perf_counter() - started, 0.0)
