"""The job run as a RayJob's user runs it (`python -m app` in a subprocess) and its log read as they read it."""

import os
import re
import subprocess
import sys

from tests.support.models import FAST_MODEL

# Images of a clean run: enough for progress lines while it goes (every progress.interval_s=0.2).
IMAGES = 30
# A progress line while the run goes: count, percent, the last interval's rate, the time left, errors.
MID_RUN = re.compile(
    rf"^progress: \d+ of {IMAGES} images \(\d+\.\d%\), \d+\.\d\d images/s, (\d+ s|\d+ min \d\d s) left, errors: 0$"
)
# Anything at warning or error level: Python's warnings and logging, Ray's C++ log lines ("[... E 123 123]").
ALARM = re.compile(r"Warning\b|\bWARNING\b|\bERROR\b|^\[[^\]]* [WE] \d+ \d+\]|Traceback")


def run_job(cwd, *overrides, address=None, env=None):
    """The command in a subprocess, attached to `address` through RAY_ADDRESS (else on a local Ray it starts),
    with `env` added to this process's environment."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    if address:
        env["RAY_ADDRESS"] = address
    command = [sys.executable, "-m", "app", *FAST_MODEL, "inference.num_actors=auto", "data.path=in", "output.path=out", "progress.interval_s=0.2", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def check_clean_log(result, ray_lines):
    """Only the app's own lines on stdout; on stderr only Ray's start-up lines (`ray_lines`)."""
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("progress: ")]
    assert any(MID_RUN.match(line) for line in progress), progress
    assert progress[-1].startswith(f"progress: {IMAGES} of {IMAGES} images (100.0%), ")
    assert progress[-1].endswith(" images/s, done, errors: 0")
    assert f"ray-detect: {IMAGES} images ({IMAGES} ok, 0 errors: none), " in result.stdout
    # The model's images take more work per actor than decoding them per task slot.
    assert "ray-detect: slowest stage: DetectorStage (work per worker: DetectorStage " in result.stdout
    own = ("progress: ", "ray-detect: ", f"{IMAGES} of {IMAGES} images to process from ", "detector stage: ")
    assert [line for line in lines if not line.startswith(own)] == []
    assert [line for line in result.stderr.splitlines() if not any(ray_line in line for ray_line in ray_lines)] == [], result.stderr[-3000:]
    assert [line for line in lines + result.stderr.splitlines() if ALARM.search(line)] == []
