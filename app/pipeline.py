"""The batch job: prepare (check the config, find the inputs, take output.path) → plan (fit the stages to
the cluster, app.plan) → execute (list/read → decode in CPU tasks → detect in an actor pool → commit
Parquet on the driver, app.commit) → summarise (count the committed rows, write the manifest)."""

import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from app import console, storage
from app.calibration import DEFAULT_CACHE, CalibrationOptions
from app.commit import Executed, InputsLeft, commit, marked_error_in, stop_on_sigterm
from app.config import SAMPLES_DIR, AppConfig, ConfigError, VideoSampling, check_config, image_formats
from app.decode import DecodeOptions, decode_images
from app.detector_stage import DetectorStage
from app.inputs import Inputs, StreamedVideos, listed_todo, no_images, open_inputs, streamed_all_done, streamed_todo
from app.metrics import RunMetrics
from app.model import ModelSpec, WeightsError, resolve_weights
from app.output import dataset, resume, rewrite
from app.output.lease import OutputLease
from app.output.verdicts import StorageRefused, Verdicts, read_transient
from app.output.writer import ResultWriter, TableWriter, writer_for
from app.plan import ClusterLimits, Plan, on_driver_node, plan_run
from app.progress import Progress
from app.retry import RetryBudget
from app.summary import Summary
from app.tiling import TilingOptions
from app.video import VIDEO_CHANGED_MARKER, VideoOptions, decode_segments

log = logging.getLogger(__name__)


class TooManyErrors(Exception):
    """More than data.max_error_fraction of the images failed; raised after every row is written."""

    def __init__(self, summary: "Summary", max_fraction: float):
        super().__init__(
            f"{summary.errors} of {summary.inputs} images failed, over data.max_error_fraction={max_fraction}"
        )
        self.summary = summary


def model_spec(cfg: AppConfig) -> ModelSpec:
    spec = ModelSpec(
        name=cfg.model.name,
        weights=str(cfg.model.weights),
        score_threshold=cfg.model.score_threshold,
        max_detections=cfg.model.max_detections,
        min_size=cfg.model.min_size,
        max_size=cfg.model.max_size,
        num_classes=cfg.model.num_classes,
        class_names=tuple(cfg.model.class_names) if cfg.model.class_names else None,
        weights_sha256=cfg.model.checkpoint_sha256.lower() if cfg.model.checkpoint_sha256 else None,
    )
    # Only the embedded demo (the bundled samples) may run without the weights it asked for.
    is_demo = not cfg.data.manifest and storage.resolve(cfg.data.path).path == str(SAMPLES_DIR)
    try:
        return resolve_weights(spec, allow_random_fallback=is_demo)
    except (WeightsError, storage.StorageError) as error:
        raise ConfigError(str(error)) from None


def connect_ray(cfg: AppConfig) -> bool:
    """Attach to the cluster in ray.address or RAY_ADDRESS (as in a RayJob), else start Ray locally.

    Returns whether Ray runs locally (in this process's machine, without an autoscaler). ray.init's own
    SIGTERM handler (exit at once) is replaced by the one the run had (stop_on_sigterm)."""
    if ray.is_initialized():
        return not (cfg.ray.address or os.environ.get("RAY_ADDRESS")) and len(ray.nodes()) == 1
    handler = signal.getsignal(signal.SIGTERM)
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        # The actors' and tasks' logs reach the driver's output: in a RayJob, the one log a user reads.
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        console.quiet_local_ray_start()
        # "local": a new instance even where `ray start` (or a killed test cluster) left its address in
        # /tmp/ray/ray_current_cluster, which ray.init would otherwise attach to and refuse num_cpus for.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def run(cfg: AppConfig, detector: Optional[type] = None, on_rows: Optional[Callable[[pa.Table], None]] = None) -> Summary:
    """Run the batch job described by cfg, or resume it on an output.path that holds part of its results.
    `detector` is the detector that each actor of the detector stage builds (app.detector.Detector when
    None, imported in the actors alone; the benchmark passes one with a stand-in model);
    `on_rows` is called with each batch of result rows once the writer has it.

    Raises ConfigError before any work when cfg is wrong; InputsLeft when storage kept failing for some
    inputs (after every other row is written), and TooManyErrors after everything is written when more
    than data.max_error_fraction of the images failed.
    """
    started = time.monotonic()
    check_config(cfg)
    inputs = open_inputs(cfg.data)
    spec = model_spec(cfg)
    output = dataset.locate(cfg.output)
    dataset.check_ours(cfg.output, output)
    lease = OutputLease(output, uuid.uuid4().hex[:12], cfg.output.lease_timeout_s, cfg.output.lease_heartbeat_s,
                        cfg.output.lease_wait_s)
    with stop_on_sigterm(), lease:
        # The table first: with output.overwrite its rows go before the new settings are written.
        wanted = dataset.settings(cfg, spec.weights, spec.weights_sha256)
        output = prepared_table(cfg, output, wanted)
        dataset.prepare(cfg.output, output, wanted)
        writer = writer_for(output, lease.generation, lease.owner, cfg.output.rows_per_file, cfg.output.commit_interval_s,
                            lease.verify)
        if cfg.data.retry_errors:
            remove_errors_to_retry(cfg, output, writer)
        executed = Executed()
        index = None  # the committed rows' paths, for the stages to drop those of streamed inputs
        if inputs.table is not None:
            todo, before = listed_todo(inputs, output)
            log.info("%d of %d images to process from %s", todo.num_rows, inputs.table.num_rows, cfg.data.path)
            work_left = todo.num_rows > 0
        else:
            todo = None
            plan = cluster_plan(cfg, None)
            log.info("listing %s in Ray tasks as the run goes", cfg.data.manifest or cfg.data.path)
            before, index = resume.scan_output(output, in_ray=True)
            # Before the detector stage asks for its GPUs: an incremental run that finds nothing new must not
            # make the autoscaler add a GPU node. A first run on inputs the driver saw has work for sure.
            if before.rows or inputs.listed is None or not inputs.listed.found.num_rows:
                videos = StreamedVideos(video_options(cfg), ray.put(before.video_versions))
                try:
                    executed.tally = streamed_all_done(cfg.data, inputs, index, plan.input_tasks, videos)
                except Exception as error:
                    raise video_changed(error) or error
            work_left = executed.tally is None
        if not work_left and executed.tally is not None:
            executed.duplicates = ray.get(executed.tally.duplicates.remote())
        if not work_left and dataset.read_manifest(output) is not None:
            log.info("every input already has its row in %s: nothing to do", cfg.output.path)
            total = inputs.table.num_rows if inputs.table is not None else executed.inputs_seen()
            return check_errors(cfg, summarize(output, total, executed, started, spec, writer, cfg.inference.gpu_hour_price))
        if work_left:
            if todo is not None:
                plan = cluster_plan(cfg, todo.num_rows)
            left_before = read_transient(output)
            executed = execute(cfg, spec, inputs, todo, before, index, plan, lease, writer, detector, on_rows, left_before)
        total = inputs.table.num_rows if inputs.table is not None else executed.inputs_seen()
        if not total:
            raise no_images(cfg.data)
        summary = summarize(output, total, executed, started, spec, writer, cfg.inference.gpu_hour_price)
        if summary.transient:
            raise InputsLeft(
                f"{summary.transient} of {summary.inputs} inputs were not read: storage kept failing for reasons that "
                f"may pass, after {cfg.data.read_attempts} attempts each (listed in "
                f"{output.uri(output.join(dataset.TRANSIENT_NAME))}); rerun to read them", summary)
        dataset.write_manifest(cfg, spec, summary, output)
        return check_errors(cfg, summary)


def prepared_table(cfg: AppConfig, output: storage.Location, wanted: dict) -> storage.Location:
    """dataset.prepare_table, its table library's own failures (a catalog that does not answer, a database
    that refuses the connection) stopping the run in one line, as storage refusing it does."""
    try:
        return dataset.prepare_table(cfg.output, output, wanted)
    except (ConfigError, OSError):  # one-line errors already, or storage's (app.cli tells them apart)
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StorageRefused(f"{dataset.output_name(output)} cannot be opened or created: {reason}") from error


def video_options(cfg: AppConfig) -> VideoOptions:
    video = cfg.data.video
    return VideoOptions(sample=VideoSampling(video.sample).value, fps=video.fps, segment_s=video.segment_s,
                        max_duration_s=video.max_duration_s, read_attempts=cfg.data.read_attempts)


def video_changed(error: BaseException) -> Optional[ConfigError]:
    """The ConfigError a task's VideoChanged (app.video) is on the driver, if `error` is one."""
    reason = marked_error_in(error, VIDEO_CHANGED_MARKER) if isinstance(error, Exception) else None
    return ConfigError(reason) if reason is not None else None


def cluster_plan(cfg: AppConfig, listed_files: Optional[int]) -> Plan:
    """The run's plan (app.plan) for the cluster it connects to (or starts); `listed_files` as plan_run takes it."""
    local = connect_ray(cfg)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return plan_run(cfg, nodes, local, ClusterLimits.from_environment(), listed_files)


def remove_errors_to_retry(cfg: AppConfig, output: storage.Location, writer: ResultWriter) -> None:
    """data.retry_errors: the committed rows of those error kinds removed (app.output.rewrite), so that
    their images are processed again. The manifest goes first: the dataset is not complete meanwhile."""
    connect_ray(cfg)  # the committed files are read in Ray tasks
    manifest = output.join(dataset.MANIFEST_NAME)
    if output.filesystem.get_file_info(manifest).type != pafs.FileType.NotFound:
        output.filesystem.delete_file(manifest)
    if isinstance(writer, TableWriter):
        removed = writer.delete_rows(list(cfg.data.retry_errors))
    else:
        removed = rewrite.remove_rows_of_kinds(output, writer, list(cfg.data.retry_errors))
    log.info("data.retry_errors: %d committed rows of kinds %s removed; their images are read again", removed,
             ", ".join(cfg.data.retry_errors))


def execute(cfg: AppConfig, spec: ModelSpec, inputs: Inputs, todo: Optional[pa.Table], before: resume.OutputScan,
            index: Optional[ray.ObjectRef], plan: Plan, lease: OutputLease, writer: ResultWriter,
            detector: Optional[type], on_rows: Optional[Callable[[pa.Table], None]], left_before: pa.Table) -> Executed:
    """Run the stages on the cluster and commit their rows through `writer`, reporting progress as they
    come. `todo` is the listed inputs to process (None when the inputs are streamed: the stages drop those
    with a row in `index`), `before` the counts of rows committed before; `left_before` the inputs earlier
    runs left unread (app.output.verdicts)."""
    console.tame_ray_data(cfg.progress.ray_data)
    log.info("detector stage: %s, batch size %d", plan.resources, plan.batch_size)
    warn_random_weights(spec)
    # Restarted when it dies (its count then starts again: RunMetrics.totals adds up), and its calls retried meanwhile.
    budget = RetryBudget.options(name=f"ray-detect-retry-budget-{lease.owner}", scheduling_strategy=on_driver_node(),
                                 max_restarts=-1, max_task_retries=-1).remote(cfg.data.read_retry_budget)
    metric_tags = {"run": cfg.metrics.run, "model": spec.name}
    detected, tally = stages(cfg, spec, inputs, todo, index, plan, detector, budget, metric_tags, before.video_versions)
    progress = Progress(
        cfg.progress.interval_s, total=inputs.table.num_rows if inputs.table is not None else None,
        done_before=before.rows, errors_before=sum(before.errors_by_kind.values()),
        listed_so_far=lambda: ray.get(tally.total.remote()) if tally else 0,
        max_error_fraction=cfg.data.max_error_fraction,
    )

    def run_state() -> dict[str, float]:
        inputs_so_far, done, failed = progress.counts()
        return {"inputs": inputs_so_far, "done": done, "failed": failed, "max_error_fraction": cfg.data.max_error_fraction,
                "read_retries": ray.get(budget.retries.remote()), "lease_heartbeats": lease.heartbeats,
                "last_commit": writer.last_commit_time()}

    metrics = RunMetrics(metric_tags, run_state)
    verdicts = Verdicts(writer, inputs.source, left_before, cfg.data.transient_runs)
    try:
        with console.without_stderr_lines(console.RAY_DATA_ACTOR_ARGUMENTS_LINE), progress, metrics:
            executed = commit(detected, verdicts, lease, plan, progress, on_rows, metrics)
        executed.read_retries = metrics.totals["read_retries"]
    finally:
        ray.kill(budget)  # named: gone with the run however it ends, not with the driver (which may make several)
    executed.tally = tally
    if tally is not None:
        executed.duplicates += ray.get(tally.duplicates.remote())
    executed.peak_actors = dict(sorted(progress.peak_actors().items()))
    executed.stage_seconds = stage_seconds(detected, plan, ray.cluster_resources().get("CPU", 1.0))
    return executed


def warn_random_weights(spec: ModelSpec) -> None:
    if spec.fallback_reason:
        log.warning("!" * 80)
        log.warning("DEMO RUNS WITH RANDOM WEIGHTS: its detections are meaningless. %s", spec.fallback_reason)
        log.warning("!" * 80)


def stages(cfg: AppConfig, spec: ModelSpec, inputs: Inputs, todo: Optional[pa.Table], index: Optional[ray.ObjectRef],
           plan: Plan, detector: Optional[type], budget: ray.actor.ActorHandle,
           metric_tags: Optional[dict[str, str]] = None,
           video_versions: Optional[dict[str, str]] = None) -> tuple[ray.data.Dataset, Optional[ray.actor.ActorHandle]]:
    """The Dataset of result rows: the inputs to process (`todo` when listed, else streamed without those
    that have a row in `index`, with a tally of every input seen) → read and decode (CPU tasks, retrying
    reads under the run's retry `budget`; a video's segments a task each, app.video) → detect (actor pool,
    its actors alive in the metrics with `metric_tags`). Also the tally. `video_versions` are those of the
    videos output.path has frames of."""
    tally, segments = None, None
    if todo is not None:
        # from_blocks takes each block's size from the table here; from_arrow would run a task per block for it.
        images = ray.data.from_blocks([todo.slice(i, plan.block_rows) for i in range(0, todo.num_rows, plan.block_rows)])
    else:
        videos = StreamedVideos(video_options(cfg), ray.put(video_versions or {}), budget)
        images, segments, tally = streamed_todo(cfg.data, inputs, index, plan.input_tasks, videos)
        # Cut into blocks by Ray Data's streaming repartition, which takes a CPU (app.plan left one).
        images = images.repartition(target_num_rows_per_block=plan.block_rows)
    resize = cfg.inference.resize_on_cpu
    tiling = TilingOptions.from_config(cfg.tiling)
    options = DecodeOptions(
        max_file_bytes=cfg.data.max_file_bytes,
        max_image_pixels=cfg.data.max_image_pixels,
        min_size=cfg.model.min_size if resize else None,
        max_size=cfg.model.max_size if resize else None,
        read_attempts=cfg.data.read_attempts,
        tiling=tiling,
        formats=image_formats(cfg.data.extensions),
    )
    decode_stage = dict(num_cpus=plan.resources.decode_cpus, compute=ray.data.TaskPoolStrategy(size=plan.resources.decode_tasks),
                        memory=plan.decode_memory)
    decoded = images.map_batches(
        decode_images,
        batch_format="pyarrow",
        batch_size=plan.decode_batch,
        fn_kwargs=dict(filesystem=inputs.source.filesystem, uri_prefix=inputs.source.uri_prefix, options=options, budget=budget),
        **decode_stage,
    )
    if segments is not None:
        # A block, and so a decode task, per segment.
        frames = segments.repartition(target_num_rows_per_block=1).map_batches(
            decode_segments,
            batch_format="pyarrow",
            batch_size=1,
            fn_kwargs=dict(filesystem=inputs.source.filesystem, uri_prefix=inputs.source.uri_prefix, decode=options,
                           options=video_options(cfg), budget=budget),
            **decode_stage,
        )
        decoded = decoded.union(frames)
    detected = decoded.map_batches(
        DetectorStage,
        batch_format="pyarrow",
        batch_size=plan.rows_per_call,
        fn_constructor_kwargs=dict(
            detector=detector,
            spec=spec,
            num_threads=int(max(1, plan.resources.num_cpus_per_actor)),
            precision=cfg.inference.precision.value,
            batch_size=plan.batch_size,
            cpu_fallback=cfg.inference.cpu_fallback,
            device_share=min(1.0, plan.resources.num_gpus) or 1.0,
            calibration=CalibrationOptions(plan.batch_size, cfg.inference.calibration_cache or DEFAULT_CACHE)
            if cfg.inference.calibrate_batch_size else None,
            channels_last=cfg.inference.channels_last,
            cudnn_benchmark=cfg.inference.cudnn_benchmark,
            metric_tags=metric_tags,
            tiling=tiling,
        ),
        compute=ray.data.ActorPoolStrategy(size=plan.resources.num_actors, max_tasks_in_flight_per_actor=plan.calls_per_actor),
        num_gpus=plan.resources.num_gpus,
        num_cpus=plan.resources.num_cpus_per_actor,
    )
    return detected, tally


def stage_seconds(detected: ray.data.Dataset, plan: Plan, cluster_cpus: float) -> dict[str, float]:
    """Seconds of work per worker of each stage of an executed Dataset, from Ray Data's task statistics:
    the detector's over its actors, decoding's (images', videos') over the tasks it may run at once, the input stage's
    (listing, reading a manifest, dropping done inputs) over its tasks."""
    decode_slots = plan.resources.decode_tasks or max(1.0, cluster_cpus // max(plan.resources.decode_cpus, 1.0))
    slots = {decode_images.__name__: decode_slots, decode_segments.__name__: decode_slots, DetectorStage.__name__: plan.resources.num_actors}
    seconds = {}
    summaries = [detected._get_stats_summary()]  # Ray Data has no public accessor
    while summaries:  # the last operators' statistics, and their parents' before them
        summary = summaries.pop()
        summaries.extend(summary.parents)
        for operator in summary.operators_stats:
            if operator.wall_time and operator.wall_time.sum:
                name = operator.operator_name.removeprefix("MapBatches(").removesuffix(")")
                seconds[name] = round(operator.wall_time.sum / slots.get(name, plan.input_tasks), 3)
    return dict(sorted(seconds.items()))


def summarize(output: storage.Location, inputs: int, executed: Executed, started: float, spec: ModelSpec,
              writer: ResultWriter, gpu_hour_price: Optional[float] = None) -> Summary:
    """Count the committed rows, checking each input has exactly one, and what this run's detector
    actors were and, with `gpu_hour_price`, cost. Several rows of one path (written by an older version,
    or left by a rewrite that crashed midway) are repaired through `writer` first."""
    scan, _ = resume.scan_output(output, in_ray=ray.is_initialized())
    if scan.rows != scan.unique_keys and output.table is None:  # a table's rows are only ever this app's appends
        removed = rewrite.repair_duplicates(output, writer)
        writer.close()
        log.warning("%s held %d rows beyond one per path: removed", output.uri(output.path), removed)
        scan, _ = resume.scan_output(output, in_ray=ray.is_initialized())
    transient = executed.left.num_rows if executed.left is not None else 0
    if scan.rows != scan.unique_keys or scan.unique_keys + transient < inputs:
        raise RuntimeError(f"{dataset.output_name(output)} holds {scan.rows} rows for {scan.unique_keys} paths and "
                           f"{inputs} inputs ({transient} left unread)")
    kinds = scan.errors_by_kind
    errors = sum(kinds.values())
    wall = time.monotonic() - started
    processed, workers = executed.processed, executed.workers
    summary = Summary(
        output_path=dataset.output_name(output),
        manifest_path=output.uri(output.join(dataset.MANIFEST_NAME)),
        inputs=scan.rows + transient,
        processed=processed,
        ok=scan.rows - errors,
        errors=errors,
        detections=scan.detections,
        errors_by_kind=dict(sorted(kinds.items())),
        read_retries=executed.read_retries,
        transient=transient,
        duplicates=executed.duplicates,
        wall_seconds=round(wall, 3),
        images_per_second=round(processed / wall, 3) if wall > 0 else 0.0,
        weights=spec.weights,
        warnings=[f"random weights: {spec.fallback_reason}"] if spec.fallback_reason else [],
        detector_actors=len(workers),
        detector_nodes=len({worker.split("/", 2)[0] for worker in workers}),
        detector_gpus=len(workers) * executed.gpus_per_actor,
        detector_devices=dict(sorted(Counter(worker.split("/", 2)[2] for worker in workers).items())),
        peak_actors=executed.peak_actors,
        stage_seconds=executed.stage_seconds,
        batch_size=executed.batch_size,
        model_batches=dict(sorted(executed.model_batches.items())),
        model_seconds=round(executed.model_seconds, 3),
        device_busy_share=round(sum(executed.device_busy) / len(executed.device_busy), 3) if executed.device_busy else None,
    )
    gpu_seconds = summary.detector_gpus * wall
    if gpu_seconds and processed:
        summary.images_per_gpu_second = round(processed / gpu_seconds, 3)
        if gpu_hour_price is not None:
            summary.cost_per_million_images = round(gpu_hour_price * gpu_seconds / 3600 / processed * 1e6, 4)
    on_cpu = summary.detector_devices.get("cpu", 0)
    if executed.gpus_per_actor and on_cpu:
        summary.warnings.append(
            f"GPUs were requested, but {on_cpu} of {len(workers)} detector actors ran on the CPU (inference.cpu_fallback=true)"
        )
    return summary


def check_errors(cfg: AppConfig, summary: Summary) -> Summary:
    if summary.errors > cfg.data.max_error_fraction * summary.inputs:
        raise TooManyErrors(summary, cfg.data.max_error_fraction)
    return summary

