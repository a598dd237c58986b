"""Videos through the whole job on a local Ray: one row per chosen frame beside one per image, each with
what the model gives on that frame's pixels; a rerun that has nothing to do; a video changed since its
frames were detected; a driver killed in the middle of a video and run again."""

import os
import signal
import subprocess
import sys
from fractions import Fraction

import pyarrow.dataset as pads
import pytest
from PIL import Image

from app.config import ConfigError, compose_config
from app.output.dataset import MANIFEST_NAME, read_committed
from app.pipeline import run
from app.result_schema import RESULT_SCHEMA, frame_key, row_keys
from app.storage import resolve
from tests.support.images import write_images
from tests.support.models import FAST_MODEL, VIDEOS, assert_detections, model_detections
from tests.support.videos import write_audio_only, write_video


def reference(path) -> list[tuple[Fraction, Image.Image]]:
    """Every frame of the video decoded from its start: its exact time, its pixels."""
    import av

    with av.open(str(path)) as container:
        return [(Fraction(frame.pts) * frame.time_base, frame.to_image()) for frame in container.decode(video=0)]


def chosen(frames, fps: float) -> list[int]:
    """The frames data.video.sample=fps chooses: the first of each 1/fps second."""
    buckets = [int((time - frames[0][0]) * Fraction(str(fps))) for time, _ in frames]
    return [i for i, bucket in enumerate(buckets) if i == 0 or bucket != buckets[i - 1]]


def expected_frames(tmp_path, videos: list, fps: float) -> dict[str, tuple[float, str]]:
    """The chosen frames' keys, with their times and their pixels written to PNG files (lossless: the
    model's reference decodes them to the job's pixels)."""
    want = {}
    for path in videos:
        frames = reference(path)
        for index in chosen(frames, fps):
            png = tmp_path / "frames" / f"{path.name}-{index}.png"
            png.parent.mkdir(exist_ok=True)
            frames[index][1].save(png)
            want[frame_key(str(path), index)] = (float(frames[index][0]), str(png))
    return want


def test_images_and_videos_give_a_row_per_image_and_per_chosen_frame_and_a_changed_video_stops_the_rerun(local_ray, tmp_path):
    folder = tmp_path / "in"
    images = write_images(folder, 2)
    videos = [folder / "cfr.mp4", folder / "vfr.mkv", folder / "clips" / "vp9.webm"]
    write_video(videos[0], frames=90, rate=30, gop=10)  # 3 s, H.264
    write_video(videos[1], frames=60, gop=7, durations_ms=[20, 50, 33])  # variable frame rate
    write_video(videos[2], frames=45, rate=30, gop=12, codec="libvpx-vp9")
    write_audio_only(folder / "voice.mkv")
    (folder / "notes.mp4").write_text("not a video\n" * 50)
    cfg = compose_config([*FAST_MODEL, *VIDEOS, f"data.path={folder}", f"output.path={tmp_path / 'out'}", "data.video.fps=4",
                          "data.video.segment_s=1", "inference.batch_size=4"])
    summary = run(cfg)

    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert table.schema == RESULT_SCHEMA
    rows = dict(zip(row_keys(table), table.to_pylist()))
    assert len(rows) == table.num_rows
    want = expected_frames(tmp_path, videos, fps=4)
    assert len(want) == 12 + 9 + 6
    errors = {str(folder / "voice.mkv"): "no_video_stream", str(folder / "notes.mp4"): "not_a_video"}
    assert sorted(rows) == sorted([*want, *map(str, images), *errors])
    assert {key: rows[key]["error_kind"] for key in errors} == errors
    for key, (seconds, _) in want.items():
        row = rows[key]
        assert (row["frame_time_s"], row["width"], row["height"], row["error_kind"]) == (seconds, 160, 120, None), key
        assert row["video_version"] == f"{os.path.getsize(row['path'])} bytes, " + row["video_version"].split(", ")[1]
    assert all(rows[str(path)]["frame_index"] is None for path in images)
    found = model_detections(cfg, [png for _, png in want.values()])
    assert_detections({key: rows[key] for key in want}, {key: found[png] for key, (_, png) in want.items()})
    assert (summary.inputs, summary.processed, summary.errors, summary.errors_by_kind) == (
        len(rows), len(rows), 2, {"no_video_stream": 1, "not_a_video": 1})
    assert (tmp_path / "out" / MANIFEST_NAME).exists()

    again = run(cfg)  # every frame has its row: the videos are probed again, no detector actor starts
    assert (again.inputs, again.processed, again.detector_actors) == (len(rows), 0, 0)

    write_video(videos[1], frames=61, gop=7, durations_ms=[20, 50, 33])  # another version of the file
    with pytest.raises(ConfigError, match=f"^{videos[1]} changed since output.path's rows of its frames were made "
                                          r"\(\d+ bytes, modified .*; now \d+ bytes, modified .*\): use a new output.path, "
                                          r"or output.overwrite=true$"):
        run(cfg)
    assert pads.dataset(str(tmp_path / "out"), format="parquet").to_table().num_rows == len(rows)


# A driver that SIGKILLs itself once its writer has taken argv[1] rows: killed in the middle of a run at a
# point the test chooses, where a kill from outside would race a run this short.
KILLED_DRIVER = """
import os, signal, sys
from app.config import compose_config
from app.pipeline import run

taken = 0

def rows_taken(rows):
    global taken
    taken += rows.num_rows
    if taken >= int(sys.argv[1]):
        os.killpg(os.getpid(), signal.SIGKILL)

run(compose_config(sys.argv[2:]), on_rows=rows_taken)
"""


@pytest.mark.slow
def test_a_driver_killed_in_the_middle_of_a_video_and_run_again_leaves_one_row_per_chosen_frame(local_ray, tmp_path):
    """A 6-second video at 10 frames a second of it, in segments of 1 s: the driver (its own process,
    attached to the tests' Ray as a RayJob's driver is to its cluster) is SIGKILLed once its writer has
    taken 20 rows; what it committed holds each frame once. The rerun commits exactly the frames without
    a row; the rows are those of an undisturbed run."""
    path = tmp_path / "in" / "long.mp4"
    write_video(path, frames=180, rate=30, gop=25)
    overrides = [*FAST_MODEL, *VIDEOS, f"data.path={path.parent}", f"output.path={tmp_path / 'out'}", "data.video.fps=10",
                 "data.video.segment_s=1", "output.rows_per_file=4", "output.commit_interval_s=0", "inference.batch_size=2"]
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    killed = subprocess.run([sys.executable, "-c", KILLED_DRIVER, "20", *overrides], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    before = row_keys(read_committed(resolve(str(tmp_path / "out")), ["path", "frame_index"]))
    assert 4 <= len(before) < 60 and len(set(before)) == len(before)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()

    cfg = compose_config([*overrides, "output.lease_wait_s=0"])
    summary = run(cfg)
    want = expected_frames(tmp_path, [path], fps=10)
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    keys = row_keys(table)
    assert sorted(keys) == sorted(want) and len(want) == 60
    assert (summary.inputs, summary.ok, summary.processed) == (60, 60, 60 - len(before))
    found = model_detections(cfg, [png for _, png in want.values()])
    assert_detections(dict(zip(keys, table.to_pylist())), {key: found[png] for key, (_, png) in want.items()})
