"""`redundancy-monitor replay`: the gap trajectory of a series of saved checkpoints.

Each checkpoint is loaded in step order and probed on one fixed batch; the results go
through a `RedundancyMonitor` (its JSONL and TensorBoard sinks and its alert rules), so
the run folder holds exactly what the live monitor writes during training. The
monitor's state is saved after every checkpoint; an interrupted replay resumes from it
the way a resumed training run does, and already probed steps are not redone.

transformers (and torch's unpickler for Lightning files) are used only here, on demand.
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

from redundancy_monitor.errors import CheckpointError, InvalidPairsError, InvalidProtocolError
from redundancy_monitor.files import write_json_atomic
from redundancy_monitor.monitoring.alerts import AlertConfig
from redundancy_monitor.monitoring.executor import ProbeOutcome
from redundancy_monitor.monitoring.monitor import RedundancyMonitor
from redundancy_monitor.monitoring.schedule import ProbeSchedule
from redundancy_monitor.monitoring.tensorboard import TensorBoardSink
from redundancy_monitor.probing.engine import DEFAULT_BATCH_TOKENS
from redundancy_monitor.probing.probe import probe
from redundancy_monitor.probing.result import Thresholds
from redundancy_monitor.probing.variants import check_protocols

log = logging.getLogger("redundancy_monitor")

STATE_FILE = "replay_state.json"
RECORD_FILE = "redundancy.jsonl"
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
    kind: str  # "hf" (a save_pretrained folder) or "lightning" (a .ckpt file)


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


def _load_lightning_file(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # retried below; reported if that fails too
        first = exc
    # Lightning files often pickle hyper-parameters (Namespace, custom classes) that the
    # safe loader refuses. The user named this file, the trust Lightning's own
    # load_from_checkpoint asks for.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read Lightning checkpoint {path}: {exc} (safe loader: {first})"
        ) from None


def checkpoint_step(path: Path, kind: str) -> int:
    """The optimizer step of a checkpoint: trainer state, then name, then file contents.

    Raises:
        CheckpointError: no step to be found anywhere.
    """
    if kind == "hf":
        state = path / "trainer_state.json"
        if state.is_file():
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
            if isinstance(step, int):
                return step
    step = _step_from_name(path.stem if kind == "lightning" else path.name)
    if step is None and kind == "lightning":
        step = _load_lightning_file(path).get("global_step")
    if step is None:
        raise CheckpointError(
            f"cannot tell the optimizer step of {path}: it has no trainer_state.json and no "
            "step in its name; rename it like checkpoint-<step> (or step=<step>.ckpt)"
        )
    return int(step)


def _collect(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        if path.suffix == ".ckpt":
            return [(path, "lightning")]
        raise CheckpointError(
            f"{path} is a file but not a Lightning .ckpt; pass a Hugging Face checkpoint "
            "folder (config.json + weights), a .ckpt file, or a folder holding them"
        )
    if is_hf_checkpoint(path):
        return [(path, "hf")]
    found: list[tuple[Path, str]] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() or child.suffix == ".ckpt":
            try:
                found.extend(_collect(child))
            except CheckpointError:
                continue  # other files and folders in a run directory are fine
    return found


def find_checkpoints(paths: Sequence[str | os.PathLike]) -> list[CheckpointRef]:
    """Every checkpoint named by `paths` (checkpoints or folders holding them), by step.

    Two checkpoints at one step (Lightning's ``last.ckpt`` next to ``step=N.ckpt``)
    keep the first by path, with a warning.

    Raises:
        CheckpointError: a path does not exist, or nothing found in a folder.
    """
    refs: dict[int, CheckpointRef] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        found = _collect(path)
        if not found:
            raise CheckpointError(
                f"no checkpoint in {path}: expected Hugging Face checkpoint folders "
                "(config.json + model.safetensors or pytorch_model.bin) or Lightning .ckpt files"
            )
        for found_path, kind in found:
            ref = CheckpointRef(checkpoint_step(found_path, kind), found_path, kind)
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

    Hugging Face folders load with ``from_pretrained``. Lightning files need
    `model_config`: a Hugging Face ``config.json`` (or its folder), or a JSON file
    ``{"class": "package.module:ClassName", "kwargs": {...}}`` for any other module;
    either may set ``"state_dict_prefix"`` (found automatically otherwise, e.g. ``model.``
    for a LightningModule holding the LM as ``self.model``).
    """

    model_config: str | os.PathLike | None = None
    dtype: str = "auto"
    device: str = "cpu"
    _template: nn.Module | None = field(default=None, init=False, repr=False)
    _prefix: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")

    def __call__(self, ref: CheckpointRef) -> nn.Module:
        model = self._hf(ref.path) if ref.kind == "hf" else self._lightning(ref.path)
        if self.dtype != "auto":
            model = model.to(DTYPES[self.dtype])
        return model.to(self.device).eval()

    def _hf(self, path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs = {} if self.dtype == "auto" else {"dtype": DTYPES[self.dtype]}
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)

    def template(self) -> nn.Module:
        """The module Lightning weights are loaded into, built once from `model_config`."""
        if self._template is None:
            self._template, self._prefix = build_module(self.model_config)
        return self._template

    def _lightning(self, path: Path) -> nn.Module:
        module = self.template()
        data = _load_lightning_file(path)
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


def build_module(model_config: str | os.PathLike | None) -> tuple[nn.Module, str | None]:
    """The module a Lightning checkpoint's weights go into, and its state-dict prefix.

    Raises:
        CheckpointError: no config given, unreadable, or naming nothing buildable.
    """
    if model_config is None:
        raise CheckpointError(
            "Lightning .ckpt files hold weights only; pass --model-config with a Hugging Face "
            "config.json (or its folder), or a JSON file "
            '{"class": "package.module:ClassName", "kwargs": {...}}'
        )
    path = Path(model_config)
    path = path / "config.json" if path.is_dir() else path
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read --model-config {path}: {exc}") from None
    prefix = spec.pop("state_dict_prefix", None)
    if "class" in spec:
        module_name, _, class_name = str(spec["class"]).partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise CheckpointError(
                f"--model-config names class {spec['class']!r}, which cannot be imported "
                f"({exc}); use 'package.module:ClassName' importable from here"
            ) from None
        return cls(**spec.get("kwargs", {})), prefix
    if "model_type" in spec:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**spec)
        return AutoModelForCausalLM.from_config(config), prefix
    raise CheckpointError(
        f"--model-config {path} has neither 'model_type' (a Hugging Face config) nor 'class'"
    )


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


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"no usable tokenizer in {path} ({exc}); pass --tokenizer DIR"
        ) from None


def find_tokenizer(checkpoints: Sequence[CheckpointRef]) -> Path:
    for ref in checkpoints:
        if ref.kind == "hf" and any((ref.path / f).is_file() for f in TOKENIZER_FILES):
            return ref.path
    raise CheckpointError(
        "none of the checkpoints holds tokenizer files; pass --tokenizer DIR (a folder "
        "saved with tokenizer.save_pretrained)"
    )


# ----- the replay -----------------------------------------------------------------------


@dataclass
class ReplayOutcome:
    """What one `replay` call did."""

    out_dir: Path
    probed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    n_alerts: int = 0


def _check_settings(saved: dict[str, Any], settings: dict[str, Any], out_dir: Path) -> None:
    changed = [k for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        raise CheckpointError(
            f"{out_dir} holds a replay with other settings ({', '.join(changed)}: "
            f"{[saved[k] for k in changed]} then, {[settings[k] for k in changed]} now); "
            "resume with the same settings, or pass a new --out"
        )


def replay(
    checkpoints: Sequence[CheckpointRef],
    input_ids: torch.Tensor,
    out_dir: str | os.PathLike,
    load_model: Callable[[CheckpointRef], nn.Module],
    *,
    attention_mask: torch.Tensor | None = None,
    pairs: str = "adjacent",
    protocols: Sequence[str] = ("replacement", "interchange"),
    thresholds: Thresholds | None = None,
    alerts: AlertConfig | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
) -> ReplayOutcome:
    """Probe `checkpoints` in step order into `out_dir`, resuming a replay already there.

    Args:
        checkpoints: from `find_checkpoints`.
        input_ids, attention_mask: the probe batch, the same for every checkpoint.
        out_dir: the run folder (``redundancy.jsonl``, TensorBoard events, replay state).
        load_model: builds the model of one checkpoint (e.g. a `ModelLoader`).
        pairs, protocols, thresholds, batch_tokens: passed to `probe()`.
        alerts: the alert rules, evaluated over the series as during training.
        progress: show a progress bar with an ETA.

    Raises:
        CheckpointError: resuming with other settings, or a checkpoint earlier than the
            last one already replayed.
        MonitorStateError: resuming with another probe batch.

    A checkpoint that fails to load or probe is recorded as a failed probe (with its
    alert) and the replay goes on.
    """
    protocols = check_protocols(protocols)
    checkpoints = sorted(checkpoints, key=lambda c: c.step)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    settings = {"pairs": pairs, "protocols": list(protocols)}
    saved = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else None
    if saved is not None:
        _check_settings(saved.get("settings", {}), settings, out_dir)
    resumed_at = None if saved is None else saved["monitor"].get("last_step")
    monitor = RedundancyMonitor(
        input_ids,
        attention_mask=attention_mask,
        schedule=ProbeSchedule.explicit([c.step for c in checkpoints], at_train_end=False),
        pairs=pairs,
        protocols=protocols,
        thresholds=thresholds,
        batch_tokens=batch_tokens,
        executor="inline",
        alerts=alerts,
        jsonl_path=out_dir / RECORD_FILE,
        sinks=[
            TensorBoardSink(
                log_dir=out_dir, purge_step=None if resumed_at is None else resumed_at + 1
            )
        ],
    )
    outcome = ReplayOutcome(out_dir)
    if saved is not None:
        monitor.load_state_dict(saved["monitor"])
    done = set(monitor.probed_steps)
    todo = [c for c in checkpoints if c.step not in done]
    outcome.already_done = sorted(c.step for c in checkpoints if c.step in done)
    early = [c for c in todo if resumed_at is not None and c.step <= resumed_at]
    if early:
        raise CheckpointError(
            f"{out_dir} already holds probes up to step {resumed_at}; {early[0].path} (step "
            f"{early[0].step}) would come out of order. Replay it into a new --out"
        )
    n_alerts = len(monitor.alerts)
    bar = _progress(len(checkpoints), len(outcome.already_done), progress)
    try:
        if todo:
            monitor.start()  # after a resume: marks where the earlier replay's records end
        for ref in todo:
            bar.set_postfix_str(f"step {ref.step}")
            result = _probe_checkpoint(
                ref, load_model, input_ids, attention_mask, monitor.probe_kwargs
            )
            monitor.record_outcome(result)
            (outcome.failed if result.error else outcome.probed).append(ref.step)
            state = {"settings": settings, "monitor": monitor.state_dict()}
            write_json_atomic(state_path, state, indent=1)
            bar.update(1)
    finally:
        bar.close()
        monitor.close()
    outcome.n_alerts = len(monitor.alerts) - n_alerts
    return outcome


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="replay", unit="ckpt", disable=not enabled)


def _probe_checkpoint(
    ref: CheckpointRef, load_model: Callable, ids, mask, probe_kwargs: dict[str, Any]
) -> ProbeOutcome:
    started = time.perf_counter()
    try:
        result, error = probe(load_model(ref), ids, mask, **probe_kwargs), None
    except (InvalidPairsError, InvalidProtocolError):
        raise  # a wrong setting, not a bad checkpoint: every other one would fail too
    except Exception as exc:  # one bad checkpoint must not end the replay
        result = None
        error = f"{type(exc).__name__}: {exc} ({ref.path})\n{traceback.format_exc(limit=6)}"
    return ProbeOutcome(ref.step, result, error, time.perf_counter() - started, 0.0)
