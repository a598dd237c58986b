"""The benchmark's inputs suite (`ray-detect bench inputs`): the input stage at scale, a tree of a million
files, manifests of 1 and 10 million paths, and a resume of 10 million committed rows; time to the first
block and the driver's memory."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from app import pipeline
from app.bench.harness import in_fresh_process, model_overrides, peak_rss, reset_peak_rss
from app.config import compose_config
from app.inputs import open_inputs, streamed_todo
from app.output import dataset, resume
from app.output.dataset import SETTINGS_NAME, write_json
from app.plan import STREAMED_BLOCK_FILES
from app.result_schema import RESULT_SCHEMA


def run(args, base: Path) -> dict:
    """The input stage alone, as the app runs it for inputs too large for the driver to list (a tree of
    --tree-files files, manifests of --manifest-paths paths, and a resume where a manifest's every path
    already has its row): time to the first block of inputs to decode, time to the last, and the
    driver's peak RSS above its size at the case's start. The cases run in turn in one fresh process,
    on one Ray. Paths in the manifests name files that do not exist: nothing is decoded. Then the app
    itself on the largest manifest, to its first result, attached to that Ray as a RayJob's driver is to
    its cluster."""
    tree = base / "tree"
    for start in range(0, args.tree_files, 1000):
        folder = tree / f"d{start // 1000:05d}"
        folder.mkdir(parents=True)
        for i in range(start, min(start + 1000, args.tree_files)):
            (folder / f"f{i:08d}.jpg").touch()
    named = {f"tree of {args.tree_files} files": [f"data.path={tree}", f"output.path={base / 'out-tree'}"]}
    for count in args.manifest_paths:
        manifest = write_manifest(base / f"manifest-{count}", count)
        named[f"manifest of {count} paths"] = [f"data.manifest={manifest}", f"output.path={base / f'out-{count}'}"]
    count = max(args.manifest_paths)
    resume = [f"data.manifest={base / f'manifest-{count}'}", f"output.path={base / 'out-resume'}"]
    write_committed(base / "out-resume", base / f"manifest-{count}", compose_config([*model_overrides(args.memory_model, args), *resume]))
    named[f"resume: {count} paths, every one committed"] = resume
    first = [*model_overrides(args.memory_model, args), f"data.manifest={base / f'manifest-{count}'}", f"output.path={base / 'out-first'}"]
    cases = in_fresh_process(measure_input_stages, named, first)
    shutil.rmtree(tree, ignore_errors=True)
    cases[f"manifest of {count} paths"]["first_result_s"] = cases.pop("first_result_s")
    return cases


MANIFEST_FILE_PATHS = 1_000_000


def write_manifest(folder: Path, count: int) -> Path:
    """A folder of Parquet files listing `count` paths of 1,000 files a folder, as an inventory would."""
    folder.mkdir(parents=True)
    for start in range(0, count, MANIFEST_FILE_PATHS):
        numbers = range(start, min(start + MANIFEST_FILE_PATHS, count))
        paths = [f"/data/images/{i // 1000:06d}/{i:09d}.jpg" for i in numbers]
        pq.write_table(pa.table({"path": paths, "size": np.full(len(paths), 150_000)}), folder / f"part-{start:010d}.parquet")
    return folder


def write_committed(output: Path, manifest: Path, cfg) -> None:
    """An output whose committed rows cover every path of the manifest (error rows, no detections)."""
    output.mkdir(parents=True)
    spec = pipeline.model_spec(cfg)
    write_json(pa.fs.LocalFileSystem(), str(output / SETTINGS_NAME), dataset.settings(cfg, spec.weights, spec.weights_sha256))
    for number, file in enumerate(sorted(manifest.glob("*.parquet"))):
        paths = pq.read_table(file, columns=["path"]).column("path").combine_chunks()
        n = len(paths)
        empty = {name: pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], field.type.value_type))
                 for name, field in zip(RESULT_SCHEMA.names, RESULT_SCHEMA) if pa.types.is_list(field.type)}
        columns = {name: empty.get(name, pa.nulls(n, field.type)) for name, field in zip(RESULT_SCHEMA.names, RESULT_SCHEMA)}
        columns.update(path=paths, num_detections=pa.array(np.zeros(n, np.int32)), error_kind=pa.array(["unreadable"] * n))
        pq.write_table(pa.table(columns, schema=RESULT_SCHEMA), output / f"part-bench-{number:06d}.parquet")


def measure_input_stages(cases: dict[str, list[str]], first: list[str]) -> dict:
    """measure_input_stage for each case's overrides, in turn, on one Ray; then first_result of the app
    with the overrides `first`, attached to that Ray."""
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        measured = {name: measure_input_stage(overrides) for name, overrides in cases.items()}
        return measured | {"first_result_s": first_result([*first, f"ray.address={ray.get_runtime_context().gcs_address}"])}
    finally:
        ray.shutdown()


def measure_input_stage(overrides: list[str]) -> dict:
    """One case of the inputs suite; its peak RSS counts from its start (the peak reset first)."""
    import psutil

    reset_peak_rss()
    idle = psutil.Process().memory_info().rss
    cfg = compose_config(overrides)
    started = time.monotonic()
    inputs = open_inputs(cfg.data)
    assert inputs.table is None, "the inputs are small enough for the driver: no input stage to measure"
    output = dataset.locate(cfg.output)
    output.filesystem.create_dir(output.path, recursive=True)
    _, index = resume.scan_output(output, in_ray=True)
    todo, _, tally = streamed_todo(cfg.data, inputs, index, tasks=max(1, (os.cpu_count() or 2) - 1))
    todo = todo.repartition(target_num_rows_per_block=STREAMED_BLOCK_FILES)  # as the run's stages cut it
    first, rows = None, 0
    for batch in todo.iter_batches(batch_format="pyarrow", batch_size=None):
        first = first or time.monotonic() - started
        rows += batch.num_rows
    seconds = time.monotonic() - started
    inputs_seen = ray.get(tally.total.remote())
    return {
        "inputs": inputs_seen, "todo": rows, "first_block_s": round(first or seconds, 2), "seconds": round(seconds, 2),
        "driver_peak_above_idle_mb": round((peak_rss() - idle) / 1e6, 1), "driver_peak_mb": round(peak_rss() / 1e6, 1),
    }


def first_result(overrides: list[str]) -> float:
    """Seconds from starting `python -m app` to its first committed file of result rows (committed at
    once: output.commit_interval_s=0); the run is then stopped. The driver attaches to the Ray of
    ray.address in `overrides`, as a RayJob's driver does, so the time is the app's, not Ray's start."""
    output = Path(next(o for o in overrides if o.startswith("output.path=")).partition("=")[2])
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "app", *overrides, "output.commit_interval_s=0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not any(output.glob("part-*.parquet")):
            if process.poll() is not None:
                raise RuntimeError(f"python -m app stopped with exit code {process.returncode} before its first result")
            time.sleep(0.2)
        return round(time.monotonic() - started, 1)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def lines(cases: dict) -> list[str]:
    return [case_line(name, case) for name, case in cases.items()]


def case_line(name: str, case: dict) -> str:
    first = f"; the app's first result after {case['first_result_s']:.1f} s" if "first_result_s" in case else ""
    return (f"input stage, {name}: first block after {case['first_block_s']:.1f} s, all {case['inputs']} in "
            f"{case['seconds']:.1f} s ({case['todo']} to do), driver peak RSS +{case['driver_peak_above_idle_mb']:.0f} MB "
            f"(peak {case['driver_peak_mb']:.0f} MB){first}")
