"""The `ray-detect` command: one entry point for the job and the commands around it.

    ray-detect run [key=value ...]     the batch job, configured by Hydra overrides
    ray-detect report|export|evaluate  read a finished results directory
    ray-detect submit                  run the job as a RayJob on a KubeRay cluster
    ray-detect bench                   the benchmark

`python -m app ...` is the same program. Without a command, or with a Hydra override or flag first
(`python -m app data.path=...`, `python -m app --cfg job`), it runs the job, as it always has.
Every command exits with a code of ExitCode and reports a mistake as one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, NoReturn, Optional

import hydra

import app.conf  # noqa: F401  (registers the typed config schema)

if TYPE_CHECKING:
    from app.summary import Summary

log = logging.getLogger(__name__)

PROG = "ray-detect"


class ExitCode(IntEnum):
    """The exit codes of every command (the "Exit codes" table of docs/cli.md)."""

    OK = 0
    FAILURE = 1  # anything unexpected (a traceback says what)
    USAGE = 2  # bad arguments, overrides or configuration; an unusable results directory; a missing extra
    TOO_MANY_ERRORS = 3  # run: more images failed than data.max_error_fraction allows (every row is written)
    GPU_UNUSABLE = 4  # run: a detector actor holds a GPU that torch cannot use
    OUTPUT_IN_USE = 5  # run: another run holds output.path (or took it over)
    KUBERNETES = 6  # submit: the Kubernetes API refused or could not be reached, or no kubeconfig
    JOB_FAILED = 7  # submit --wait: the RayJob failed or was stopped
    WAIT_TIMEOUT = 8  # submit --wait: --timeout passed; the RayJob goes on
    INPUTS_LEFT = 9  # run: storage kept failing for some inputs (faults that may pass); a rerun reads them
    OUTPUT_FULL = 10  # run: output.path's filesystem is full; the rows committed so far are kept
    STORAGE_REFUSED = 11  # run: storage refuses the run (access denied, a rejected credential, a missing bucket)
    STOPPED = 12  # run: SIGTERM; the rows finished before are committed and the lease released


def fail(code: ExitCode, line: str) -> NoReturn:
    """Stop with one line on stderr and an exit code."""
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


class CommandParser(argparse.ArgumentParser):
    """The parser of every command: a mistake is one line, `ray-detect <cmd>: error: ...`, exit code 2."""

    def error(self, message):
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------
# Hydra overrides and the job
# ---------------------------------------------------------------------------------------------------


class OverrideError(Exception):
    """Hydra overrides that do not compose; the message is the first line of Hydra's."""


def compose_overrides(overrides: list[str]):
    """The app's config with the overrides, composed as `ray-detect run` will; OverrideError if a key,
    an option or a value is wrong."""
    from app.config import compose_config

    try:
        return compose_config(overrides)
    except Exception as error:  # Hydra and OmegaConf raise many types; each names the bad override or key
        text = str(error).strip()
        raise OverrideError(text.splitlines()[0] if text else type(error).__name__) from error


def print_summary(summary: Summary) -> None:
    errors = ", ".join(f"{kind}={count}" for kind, count in summary.errors_by_kind.items()) or "none"
    print(
        f"ray-detect: {summary.inputs} images ({summary.ok} ok, {summary.errors} errors: {errors}), "
        f"{summary.detections} detections; {summary.processed} processed by this run in "
        f"{summary.wall_seconds:.1f} s ({summary.images_per_second:.2f} images/s)\n"
        f"ray-detect: results in {summary.output_path} (manifest: {summary.output_path}/_manifest.json)"
    )
    if summary.duplicates:
        print(f"ray-detect: {summary.duplicates} input(s) listed more than once: one row each")
    if summary.read_retries or summary.transient:
        print(f"ray-detect: storage faults: {summary.read_retries} read(s) retried; {summary.transient} input(s) left "
              f"unread, without a row (a rerun reads them)")
    if summary.detector_actors:
        devices = ", ".join(f"{device} x{count}" for device, count in summary.detector_devices.items())
        peak = ", ".join(f"{kind} {count}" for kind, count in summary.peak_actors.items())
        print(f"ray-detect: detector actors used: {summary.detector_actors}, on {summary.detector_nodes} node(s), "
              f"holding {summary.detector_gpus:g} GPU(s); devices: {devices}; at most at once: {peak}")
    if summary.slowest_stage:
        # Stages of under 0.05 s of work (Ray Data's own, such as turning the listing into blocks) say nothing.
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in summary.stage_seconds.items() if seconds >= 0.05)
        print(f"ray-detect: slowest stage: {summary.slowest_stage} (work per worker: {stages})")
    for warning in summary.warnings:
        log.warning(warning)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def job(cfg) -> None:
    """The batch job on the config Hydra composed; each way it stops has its exit code."""
    # Imported here: the job's modules load Ray and torch, which no other command needs.
    from app.commit import DeviceUnavailable, InputsLeft, Stopped
    from app.config import ConfigError
    from app.output.dataset import OutputFull
    from app.output.lease import LeaseLost, OutputInUse
    from app.output.verdicts import StorageRefused, storage_refusal
    from app.pipeline import TooManyErrors, run

    try:
        print_summary(run(cfg))
    except ConfigError as error:
        fail(ExitCode.USAGE, f"ray-detect: config error: {error}")
    except OutputInUse as error:
        if cfg.output.skip_if_in_use:  # a scheduled run while the previous one still goes: not a failure
            print(f"ray-detect: skipped, output.skip_if_in_use=true: {error}")
            return
        fail(ExitCode.OUTPUT_IN_USE, f"ray-detect: output in use: {error}")
    except LeaseLost as error:
        fail(ExitCode.OUTPUT_IN_USE, f"ray-detect: output in use: {error}")
    except DeviceUnavailable as error:
        fail(ExitCode.GPU_UNUSABLE, f"ray-detect: GPU unusable: {error}")
    except OutputFull as error:
        fail(ExitCode.OUTPUT_FULL, f"ray-detect: output full: {error}")
    except StorageRefused as error:
        fail(ExitCode.STORAGE_REFUSED, f"ray-detect: storage refused: {error}")
    except OSError as error:  # storage refusing what the run itself writes or reads (its lease, settings, ...)
        refusal = storage_refusal(error)
        if refusal is None:
            raise
        fail(ExitCode.STORAGE_REFUSED, f"ray-detect: storage refused: {refusal}")
    except Stopped as error:
        fail(ExitCode.STOPPED, f"ray-detect: stopped: {error}")
    except InputsLeft as error:
        if error.summary is not None:
            print_summary(error.summary)
        fail(ExitCode.INPUTS_LEFT, f"ray-detect: inputs left: {error}")
    except TooManyErrors as error:
        print_summary(error.summary)
        fail(ExitCode.TOO_MANY_ERRORS, f"ray-detect: failed: {error}")


def run(argv: list[str]) -> int:
    """`ray-detect run [Hydra flags] [overrides]`: compose the overrides, then hand them to Hydra."""
    # Hydra's own parser tells its flags (--cfg job, --help, --multirun, ...) from the overrides, as
    # hydra.main will; it is internal to Hydra, which has no public one.
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = f"{PROG} run"
    args = parser.parse_args(argv)
    # Composing first turns Hydra's own report of a bad override (a stack of messages, exit code 1) into
    # one line and exit code 2, before Ray starts. Where the flags choose another config or a sweep,
    # Hydra composes on its own.
    if not (args.multirun or args.config_path or args.config_name or args.config_dir or args.experimental_rerun):
        try:
            compose_overrides(args.overrides)
        except OverrideError as error:
            fail(ExitCode.USAGE, f"ray-detect: config error: {error}")
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # hydra.main reads its arguments from sys.argv
    try:
        job()
    finally:
        sys.argv = saved
    return ExitCode.OK


# ---------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    main: str  # "module:function", called with the command's arguments
    summary: str  # its line in `ray-detect --help`
    extra: Optional[tuple[str, str]] = None  # (module, extra): what it needs beyond the job's dependencies


COMMANDS = {
    "run": Command("app.cli:run", "run the detection job; arguments are Hydra overrides (key=value) and flags"),
    "report": Command("app.report:main", "a static HTML report of a results directory, with previews"),
    "export": Command("app.export:main", "export detections as COCO JSON or Pascal VOC XML"),
    "evaluate": Command("app.evaluate:main", "COCO-style mAP of a results directory against ground truth",
                        ("pycocotools", "eval")),
    "submit": Command("app.submit:main", "run the job as a RayJob on a KubeRay cluster", ("kubernetes", "submit")),
    "bench": Command("app.bench:main", "the throughput and memory benchmark", ("psutil", "bench")),
}


def require_extra(name: str) -> None:
    """Stop with exit code 2 and the pip command when a command's extra is not installed: the image and
    a plain `pip install ray-detect` carry only what the job needs."""
    if COMMANDS[name].extra is None:
        return
    module, extra = COMMANDS[name].extra
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        fail(ExitCode.USAGE, f"{PROG} {name}: error: {module} is not installed: pip install '{PROG}[{extra}]'")


def starts_a_run(word: str) -> bool:
    """Whether a first argument belongs to the job: a Hydra override (key=value, +key=value, ~key) or
    one of Hydra's flags. -h and --help are ray-detect's own."""
    if word in ("-h", "--help"):
        return False
    return "=" in word or word.startswith(("-", "~"))


def top_parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Object-detection batch inference over image sets with Ray Data and torchvision.",
        epilog=f"`{PROG} COMMAND --help` shows a command's options; `{PROG} run --help` is Hydra's help with "
               f"the config groups. Without a command, or with an override first, {PROG} runs the job. "
               f"`python -m app ...` is the same as `{PROG} ...`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.summary, add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """`ray-detect [COMMAND] [ARGS...]`; returns the exit code, or exits with it (sys.exit) on a failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or starts_a_run(argv[0]):
        return run(argv)
    name = top_parser().parse_args(argv[:1]).command
    require_extra(name)
    module, _, function = COMMANDS[name].main.partition(":")
    result = getattr(importlib.import_module(module), function)(argv[1:])
    # submit and run return an exit code; report, export and evaluate return nothing, bench its results.
    return result if isinstance(result, int) else ExitCode.OK
