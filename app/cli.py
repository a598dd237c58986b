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

import copy
import importlib
import logging
import logging.config
import string
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from app.exit_codes import CommandParser, ExitCode, fail

if TYPE_CHECKING:
    from app.summary import Summary

log = logging.getLogger(__name__)

PROG = "ray-detect"


# ---------------------------------------------------------------------------------------------------
# Hydra overrides and the job
# ---------------------------------------------------------------------------------------------------


class OverrideError(Exception):
    """Hydra overrides that do not compose; the message is the first line of Hydra's."""


def compose_overrides(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The app's config with the overrides, composed as `ray-detect run` composes it (with Hydra's own
    settings under `hydra` when with_hydra); OverrideError if a key, an option or a value is wrong."""
    from app.config import compose_config

    try:
        return compose_config(overrides, with_hydra)
    except Exception as error:  # Hydra and OmegaConf raise many types; each names the bad override or key
        text = str(error).strip()
        raise OverrideError(text.splitlines()[0] if text else type(error).__name__) from error


def print_summary(summary: Summary) -> None:
    errors = ", ".join(f"{kind}={count}" for kind, count in summary.errors_by_kind.items()) or "none"
    print(
        f"ray-detect: {summary.inputs} images ({summary.ok} ok, {summary.errors} errors: {errors}), "
        f"{summary.detections} detections; {summary.processed} processed by this run in "
        f"{summary.wall_seconds:.1f} s ({summary.images_per_second:.2f} images/s)\n"
        f"ray-detect: results in {summary.output_path} (manifest: {summary.manifest_path or summary.output_path + '/_manifest.json'})"
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
    if summary.model_batches_line():
        print(f"ray-detect: {summary.model_batches_line()}")
    for line in (summary.cost_line(), summary.host_bound_line()):
        if line:
            print(f"ray-detect: {line}")
    for warning in summary.warnings:
        log.warning(warning)


def job(cfg: DictConfig) -> None:
    """The batch job on a composed config; each way it stops has its exit code."""
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


def run_parser() -> CommandParser:
    parser = CommandParser(prog=f"{PROG} run", add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="show the config groups and the composed config")
    parser.add_argument("-c", "--cfg", choices=("job", "hydra", "all"),
                        help="print the composed config (the app's, Hydra's own settings, or both) and stop")
    parser.add_argument("--resolve", action="store_true", help="with --cfg or --help: resolve interpolations")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: key=value, group=option, +key=value, ~key")
    return parser


def run(argv: list[str]) -> int:
    """`ray-detect run [--help | --cfg job|hydra|all [--resolve]] [overrides]`: compose the config, then run
    the job on it with Hydra's logging settings (hydra.job_logging). A bad override is one line and exit
    code 2, before Ray starts; so is an override holding credentials, before Hydra (whose errors may quote it)."""
    from app.credentials import override_with_credentials

    args = run_parser().parse_intermixed_args(argv)
    refusal = override_with_credentials(args.overrides)
    if refusal:
        fail(ExitCode.USAGE, f"ray-detect: config error: {refusal}")
    try:
        cfg = compose_overrides(args.overrides, with_hydra=True)
    except OverrideError as error:
        fail(ExitCode.USAGE, f"ray-detect: config error: {error}")
    if args.help:
        print(config_help(cfg, args.resolve))
        return ExitCode.OK
    if args.cfg:
        print(OmegaConf.to_yaml(config_part(cfg, args.cfg), resolve=args.resolve), end="")
        return ExitCode.OK
    logging.config.dictConfig(OmegaConf.to_container(cfg.hydra.job_logging, resolve=True))
    job(job_config(cfg))
    return ExitCode.OK


def job_config(cfg: DictConfig) -> DictConfig:
    """A copy of the app's config without Hydra's own settings, as Hydra's compose returns it by default."""
    job_only = copy.deepcopy(cfg)
    with read_write(job_only), open_dict(job_only):
        del job_only["hydra"]
    return job_only


def config_part(cfg: DictConfig, part: str) -> DictConfig:
    """What `--cfg part` prints of a config composed with Hydra's settings: job (the app's config), hydra
    (Hydra's settings) or all (both)."""
    if part == "job":
        return job_config(cfg)
    return OmegaConf.masked_copy(cfg, "hydra") if part == "hydra" else cfg


def config_help(cfg: DictConfig, resolve: bool) -> str:
    """`ray-detect run --help`: Hydra's help template (hydra.help) filled with the app's config groups
    and its options, and the composed config."""
    from app.config import config_groups

    groups = "".join(f"{group}: {', '.join(options)}\n" for group, options in config_groups().items())
    return string.Template(cfg.hydra.help.template).safe_substitute(
        APP_CONFIG_GROUPS=groups, CONFIG=OmegaConf.to_yaml(job_config(cfg), resolve=resolve))


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
