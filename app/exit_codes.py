"""How every command ends: the exit codes (the "Exit codes" table of docs/cli.md), a mistake stopped
with one line, and the argument parser that reports a usage mistake that way. Commands import this
rather than app.cli, so that report, export and evaluate load without Hydra."""

import argparse
import sys
from enum import IntEnum
from typing import NoReturn


class ExitCode(IntEnum):
    """The exit codes of every command."""

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
