"""The ``redundancy-monitor`` command line. It parses arguments and calls the library.

Each subcommand is a ``cmd_<name>`` function, whose docstring is its help (first line)
and description, and an ``add_<name>_arguments``; both are listed in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from redundancy_monitor._version import __version__
from redundancy_monitor.errors import RedundancyMonitorError
from redundancy_monitor.extras import require

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit code 2), without usage."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,2,3"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("empty list; pass e.g. 1,2,3")
    return values


def _positive_list(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be positive integers")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _pair_set(text: str) -> str:
    from redundancy_monitor.probing.variants import parse_pairs

    try:
        parse_pairs(text, 3)
    except RedundancyMonitorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_batch_options(p: argparse.ArgumentParser, n_seq: int, tokenizer: str) -> None:
    """Where the tokenizer comes from (`tokenizer`: its help), the probe batch's shape and
    the pair set."""
    p.add_argument("--tokenizer", metavar="PATH", help=tokenizer)
    p.add_argument(
        "--n-seq", type=_positive, default=n_seq, help=f"sequences in the batch ({n_seq})"
    )
    p.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence (128)")
    p.add_argument(
        "--pairs", type=_pair_set, default="adjacent", help="adjacent | window:k | all (adjacent)"
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """How the model is loaded."""
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (cpu)")


def _add_trust_module(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="also allow --model-config classes from MODULE (imported: trust its code)",
    )


# -- score --------------------------------------------------------------------------


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument(
        "--text",
        nargs="+",
        required=True,
        metavar="FILE",
        help="text files for the probe batch ('-' reads stdin)",
    )
    p.add_argument(
        "--heldout",
        metavar="FILE",
        help="held-out text for perplexity (default: the text after the batch)",
    )
    _add_batch_options(
        p, n_seq=32, tokenizer="take the tokenizer from PATH (default: the checkpoint's)"
    )
    _add_model_options(p)
    p.add_argument(
        "--budgets",
        type=_positive_list,
        default=(1, 2, 3),
        help="layers to remove, comma-separated (1,2,3)",
    )
    p.add_argument("--window", type=_positive, help="perplexity window (min(512, max positions))")
    p.add_argument("--stride", type=_positive, help="perplexity stride (window // 2)")
    p.add_argument("--random-draws", type=_positive, default=5, help="random baseline draws (5)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the probe-batch draw, the random baseline, racing and the bootstrap (0)",
    )
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="measure every removal set on all of the held-out text, one full forward of each "
        "pruned model (slow; default: shared computation, stopping sets once clearly worse)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write result.json, summary.md, plots and a TensorBoard run here",
    )
    p.add_argument("--export-pruned", metavar="DIR", help="write a pruned checkpoint here")
    p.add_argument(
        "--remove", type=_int_list, metavar="L1,L2", help="layers to remove for --export-pruned"
    )
    p.add_argument("--budget", type=_positive, help="with --protocol: export that removal set")
    p.add_argument("--protocol", choices=("interchange", "replacement"), default="interchange")
    p.add_argument(
        "--target-halfwidth",
        type=float,
        default=0.02,
        metavar="NATS",
        help="interval half-width of the median gap that the sample-size advice aims at (0.02)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="one line per phase on stderr instead of progress bars",
    )


def cmd_score(args: argparse.Namespace) -> int:
    """score a saved checkpoint and measure which layers can be removed

    Probe replacement and interchange distances of a saved causal LM, measure the cost of
    removing layers (d_del and held-out perplexity) per budget for each selector, and
    recommend the cheapest set.
    """
    from redundancy_monitor.tools.loading import check_output_folder
    from redundancy_monitor.tools.score import ScoreConfig, score_checkpoint
    from redundancy_monitor.tools.score_outputs import terminal_summary, write_outputs

    # Our own bars show progress; keep stderr for them and for one-line errors.
    hf_logging = require("transformers.utils.logging", "redundancy-monitor score")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    config = ScoreConfig(
        path=args.path,
        text=tuple(args.text),
        tokenizer=args.tokenizer,
        heldout=args.heldout,
        n_seq=args.n_seq,
        seq_len=args.seq_len,
        pairs=args.pairs,
        budgets=args.budgets,
        dtype=args.dtype,
        device=args.device,
        window=args.window,
        stride=args.stride,
        random_draws=args.random_draws,
        seed=args.seed,
        export_pruned=args.export_pruned,
        remove=args.remove,
        budget=args.budget,
        protocol=args.protocol,
        progress=not args.no_progress,
        target_halfwidth=args.target_halfwidth,
        exhaustive=args.exhaustive,
    )
    if args.out:
        check_output_folder(args.out, "--out")  # before the scoring, not after it
    run = score_checkpoint(config)
    print(terminal_summary(run))
    if args.out:
        write_outputs(run, args.out, notice=lambda m: print(m, file=sys.stderr))
        print(f"\nwrote {args.out}/result.json, summary.md, plots and tensorboard/")
    return EXIT_OK


# -- replay -------------------------------------------------------------------------


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints",
        metavar="CKPT",
        nargs="+",
        help="HF checkpoint folders, Lightning .ckpt files, or folders holding them",
    )
    p.add_argument("--text", required=True, metavar="FILE", help="text for the probe batch")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument(
        "--model-config",
        metavar="PATH",
        help="for .ckpt files: a HF config.json (or its folder), or a JSON "
        '{"class": "pkg.module:Class", "kwargs": {...}} naming an nn.Module class from '
        "transformers, torch or a --trust-module",
    )
    _add_trust_module(p)
    p.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="unpickle .ckpt files the safe loader refuses (runs code the files name: "
        "only for files you trust)",
    )
    _add_batch_options(p, n_seq=8, tokenizer="tokenizer (default: from a checkpoint)")
    _add_model_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_replay(args: argparse.Namespace) -> int:
    """probe a series of saved checkpoints into a run folder, in step order

    Probe saved checkpoints (Hugging Face checkpoint folders, Lightning .ckpt files with
    --model-config, or folders holding them) in step order on one probe batch; RUN_DIR
    gets what the training monitor writes (JSONL, TensorBoard, alerts). Run it again to
    resume an interrupted replay.
    """
    from redundancy_monitor.monitoring.probe_config import ProbeConfig
    from redundancy_monitor.tools.loading import (
        check_output_folder,
        load_tokenizer,
        probe_batch_from_text,
        read_text,
        resolve_device,
    )
    from redundancy_monitor.tools.replay import (
        ModelLoader,
        check_positions,
        find_checkpoints,
        find_tokenizer,
        replay,
    )

    check_output_folder(args.out, "--out")  # before any work, not after it
    resolve_device(args.device)  # a missing GPU fails here, not every checkpoint
    checkpoints = find_checkpoints(args.checkpoints, trust=args.trust_checkpoints)
    loader = ModelLoader(
        args.model_config,
        args.dtype,
        args.device,
        trust_checkpoints=args.trust_checkpoints,
        trusted_modules=tuple(args.trust_module),
    )
    if any(c.kind == "lightning" for c in checkpoints):
        loader.template()  # a missing or refused --model-config fails here, before any work
    check_positions(checkpoints, loader, args.seq_len)
    tokenizer = load_tokenizer(args.tokenizer or find_tokenizer(checkpoints))
    ids = probe_batch_from_text(tokenizer, read_text([args.text]), args.n_seq, args.seq_len)
    if not args.no_progress:
        hf_logging = require("transformers.utils.logging", "redundancy-monitor replay")
        hf_logging.disable_progress_bar()  # one bar, ours with the ETA, is enough
    done = replay(
        checkpoints,
        ids,
        args.out,
        loader,
        config=ProbeConfig(pairs=args.pairs),
        progress=not args.no_progress,
    )
    print(
        f"replayed {len(done.probed)} checkpoint(s) into {done.out_dir} "
        f"({len(done.already_done)} already done, {len(done.failed)} failed, "
        f"{done.n_alerts} new alert(s)); see it with: redundancy-monitor report {done.out_dir}"
    )
    if done.failed and not done.probed and not done.already_done:
        print(
            f"redundancy-monitor replay: error: none of the {len(done.failed)} checkpoint(s) "
            f"could be probed (steps {', '.join(map(str, done.failed))}); the reason of each "
            "is logged above",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return EXIT_OK


# -- watch --------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _alert_config(text: str):
    import json
    from pathlib import Path

    from redundancy_monitor.monitoring.alerts import AlertConfig

    try:
        spec = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read alert settings {text!r}: {e}") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError(
            "alert settings must be a JSON object of AlertConfig fields"
        )
    try:
        return AlertConfig(**spec)
    except TypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; see AlertConfig for the fields") from None
    except RedundancyMonitorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="the folder the run saves checkpoints into")
    batch = p.add_mutually_exclusive_group(required=True)
    batch.add_argument("--text", metavar="FILE", help="text for the probe batch")
    batch.add_argument(
        "--probe-batch", metavar="FILE.pt", help="token ids saved with torch.save (weights-only)"
    )
    _add_batch_options(p, n_seq=8, tokenizer="tokenizer for --text (default: from a checkpoint)")
    p.add_argument(
        "--log-dir",
        metavar="DIR",
        help="folder to write (default: CKPT_DIR/../redundancy beside a 'checkpoints' "
        "folder, else CKPT_DIR/runs/redundancy)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (cpu)")
    p.add_argument(
        "--exit-when-idle",
        type=_seconds,
        metavar="S",
        help="exit once no checkpoint appeared or changed for S seconds, counted from the "
        "first one (default: run until stopped)",
    )
    p.add_argument(
        "--until-step", type=int, metavar="N", help="exit once a checkpoint at step >= N is probed"
    )
    p.add_argument(
        "--model-config",
        metavar="PATH",
        help="for .ckpt files and DCP folders without a config.json: a HF config.json (or its "
        'folder), or a JSON {"class": "pkg.module:Class", "kwargs": {...}} naming an nn.Module '
        "class from transformers, torch or a --trust-module",
    )
    _add_trust_module(p)
    p.add_argument(
        "--alerts",
        type=_alert_config,
        metavar="JSON",
        help="alert settings: a JSON object of AlertConfig fields, e.g. '{\"gap_threshold\": 0.2}', "
        "or a file holding one",
    )
    p.add_argument(
        "--settle",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="a checkpoint counts as written once unchanged for S seconds (2)",
    )
    p.add_argument(
        "--webhook",
        metavar="URL",
        help="post each alert to this http(s) URL (a Slack incoming webhook, a pager's or "
        "your own endpoint), off the probing thread, with a timeout and retries",
    )
    p.add_argument(
        "--webhook-format",
        choices=("slack", "json"),
        default="json",
        help='slack: {"text": ...}; json: the alert\'s fields and a text (json)',
    )


def cmd_watch(args: argparse.Namespace) -> int:
    """follow a run's checkpoint folder and probe each new checkpoint (a sidecar)

    Follow CKPT_DIR while a run writes checkpoints into it (Hugging Face checkpoint-<step>
    folders, Lightning .ckpt files, torch.distributed.checkpoint folders), wait until
    each is completely written, and probe it once, in step order. The log folder gets
    what the in-process monitor writes (JSONL, TensorBoard, alerts); a callback with
    sidecar=LOG_DIR acts on the alerts. Restart it to resume.
    """
    import signal

    from redundancy_monitor.monitoring.probe_config import ProbeConfig
    from redundancy_monitor.tools.loading import (
        check_output_folder,
        load_probe_batch,
        load_tokenizer,
        probe_batch_from_text,
        read_text,
        resolve_device,
    )
    from redundancy_monitor.tools.replay import ModelLoader, find_tokenizer
    from redundancy_monitor.tools.watch import watch

    hf_logging = require("transformers.utils.logging", "redundancy-monitor watch")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    resolve_device(args.device)
    if args.log_dir is not None:
        check_output_folder(args.log_dir, "--log-dir")
    loader = ModelLoader(
        args.model_config,
        device=args.device,
        trust_checkpoints=False,
        trusted_modules=tuple(args.trust_module),
    )
    if args.model_config is not None:
        loader.template()  # a bad config fails now, not at the first checkpoint
    batch: Any  # an (ids, mask) pair, or a function of the checkpoints that makes one
    if args.probe_batch is not None:
        batch = load_probe_batch(args.probe_batch)
    else:
        text = read_text([args.text])

        def batch_from_text(tokenizer):
            return probe_batch_from_text(tokenizer, text, args.n_seq, args.seq_len), None

        if args.tokenizer is not None:
            batch = batch_from_text(load_tokenizer(args.tokenizer))
        else:

            def batch_from_checkpoints(refs):  # the first complete one that has a tokenizer
                return batch_from_text(load_tokenizer(find_tokenizer(refs)))

            batch = batch_from_checkpoints

    def stop(signum, frame):
        raise KeyboardInterrupt  # closes the run folder on the way out

    hook = None
    if args.webhook is not None:
        from redundancy_monitor.monitoring.webhook import WebhookAlerts

        where = args.log_dir or args.ckpt_dir
        hook = WebhookAlerts(args.webhook, args.webhook_format, run=str(where))
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        done = watch(
            args.ckpt_dir,
            loader,
            batch,
            log_dir=args.log_dir,
            config=ProbeConfig(pairs=args.pairs),
            alerts=args.alerts,
            settle_seconds=args.settle,
            exit_when_idle=args.exit_when_idle,
            until_step=args.until_step,
            notice=lambda m: print(f"watch: {m}", file=sys.stderr, flush=True),
            sinks=[hook] if hook is not None else (),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if hook is not None:
        print(
            f"watch: webhook: {hook.n_sent} alert(s) delivered, {hook.n_failed} failed, "
            f"{hook.n_dropped} dropped",
            file=sys.stderr,
        )
    print(
        f"watched {args.ckpt_dir}: probed {len(done.probed)} checkpoint(s) into {done.log_dir} "
        f"({len(done.already_done)} already done, {len(done.failed)} failed, "
        f"{len(done.skipped)} skipped, {done.n_alerts} new alert(s)); {done.reason}"
    )
    return EXIT_OK


# -- report -------------------------------------------------------------------------


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder the monitor or replay wrote")
    p.add_argument("--out", metavar="HTML", help="file to write (default RUN_DIR/report.html)")
    p.add_argument(
        "--removal",
        metavar="RESULT_JSON",
        help="result.json of `redundancy-monitor score` with measured removal costs "
        "(default: RUN_DIR/result.json if present)",
    )


def cmd_report(args: argparse.Namespace) -> int:
    """write a self-contained HTML report (and its PNGs) of a run folder

    Summarise a run folder written by the monitor or by replay in one HTML file with
    embedded images (no network needed), plus the PNGs beside it.
    """
    from redundancy_monitor.tools.report import write_report

    report = write_report(args.run_dir, args.out, args.removal)
    print(f"wrote {report.html} and {len(report.images)} PNG(s) beside it")
    for sentence in report.summary:
        print(f"  - {sentence}")
    return EXIT_OK


# -- compare ------------------------------------------------------------------------


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="CKPT_A", help="the earlier checkpoint (folder or .gguf)")
    p.add_argument("b", metavar="CKPT_B", help="the later checkpoint")
    p.add_argument(
        "--text",
        nargs="+",
        required=True,
        metavar="FILE",
        help="text files for the probe batch ('-' reads stdin)",
    )
    _add_batch_options(p, n_seq=32, tokenizer="take the tokenizer from PATH (default: CKPT_A's)")
    _add_model_options(p)
    p.add_argument(
        "--target-halfwidth",
        type=float,
        default=0.005,
        metavar="NATS",
        help="half-width of the median gap's change that the sample-size advice aims at (0.005)",
    )
    p.add_argument("--out", metavar="FILE", help="write the comparison as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_compare(args: argparse.Namespace) -> int:
    """the paired change between two checkpoints on one probe batch

    Probe both checkpoints on the same sequences cut from --text and print the change
    from CKPT_A to CKPT_B of every summary scalar and pair, each with a paired bootstrap
    interval (the same sequences resampled together at both), and how many sequences a
    target precision of the change needs.
    """
    from redundancy_monitor.files import write_json_atomic
    from redundancy_monitor.tools.compare import CompareConfig, compare_checkpoints

    hf_logging = require("transformers.utils.logging", "redundancy-monitor compare")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    config = CompareConfig(
        a=args.a,
        b=args.b,
        text=tuple(args.text),
        tokenizer=args.tokenizer,
        n_seq=args.n_seq,
        seq_len=args.seq_len,
        pairs=args.pairs,
        dtype=args.dtype,
        device=args.device,
        target_halfwidth=args.target_halfwidth,
        progress=not args.no_progress,
    )
    comparison = compare_checkpoints(config)
    print(comparison.text())
    if args.out:
        write_json_atomic(args.out, comparison.to_dict())
        print(f"\nwrote {args.out}")
    return EXIT_OK


#: name -> (function adding the subcommand's arguments, the function running it)
SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {
    "score": (add_score_arguments, cmd_score),
    "replay": (add_replay_arguments, cmd_replay),
    "watch": (add_watch_arguments, cmd_watch),
    "report": (add_report_arguments, cmd_report),
    "compare": (add_compare_arguments, cmd_compare),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="redundancy-monitor",
        description="Layer redundancy of transformer LMs: replacement vs interchange.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_arguments, command) in SUBCOMMANDS.items():
        summary, _, details = inspect.cleandoc(command.__doc__ or "").partition("\n\n")
        p = sub.add_parser(name, help=summary, description=" ".join(details.split()))
        add_arguments(p)
        p.set_defaults(func=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RedundancyMonitorError as e:
        reason = " ".join(str(e).split())
        print(f"redundancy-monitor {args.command}: error: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
