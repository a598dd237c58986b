"""Video inputs without Ray (app.video): the probe, the sampling, the segments and their decoding, on
videos made here with PyAV (FFmpeg): constant and variable frame rates, key frames every few frames, two
codecs, and broken files of each kind. Frame indexes, times and pixels are compared with a reference
decode of the whole stream from its start."""

import errno
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from app import video
from app.decode import DecodeOptions
from app.result_schema import CORRUPT_VIDEO, NO_VIDEO_STREAM, NOT_A_VIDEO, TOO_LONG, TRANSIENT, UNSUPPORTED_CODEC
from tests.support.videos import write_audio_only, write_video

LOCAL = pafs.LocalFileSystem()
# Pixels as they are, for comparing with the reference decode.
AS_DECODED = DecodeOptions(max_file_bytes=1 << 30, max_image_pixels=1 << 30)


def input_row(path) -> pa.Table:
    return pa.table({"path": [str(path)], "size": [path.stat().st_size if path.exists() else None],
                     "error_kind": pa.nulls(1, pa.string()), "error": pa.nulls(1, pa.string()),
                     "raw_path": pa.nulls(1, pa.binary())})


def frame_rows(path, options: video.VideoOptions, filesystem=LOCAL, decode=AS_DECODED) -> tuple[pa.Table, list[dict]]:
    """The segments of one video, and the decoded rows they give, as the pipeline's two stages make them."""
    segments = video.expand_videos(input_row(path), filesystem=filesystem, options=options)
    rows = []
    for table in video.decode_segments(segments, filesystem=filesystem, uri_prefix="", decode=decode, options=options):
        rows.extend(table.to_pylist())
    return segments, rows


def reference(path) -> list[dict]:
    """Every frame decoded from the start, in presentation order: exact time, key frame or not, pixels."""
    import av

    with av.open(str(path)) as container:
        return [dict(time=Fraction(frame.pts) * frame.time_base, key=frame.key_frame, pixels=frame.to_ndarray(format="rgb24"))
                for frame in container.decode(video=0)]


def expected_indexes(frames: list[dict], sample: str, fps: float = 1.0) -> list[int]:
    if sample == "all":
        return list(range(len(frames)))
    if sample == "keyframes":
        return [i for i, frame in enumerate(frames) if frame["key"]]
    buckets = [int((frame["time"] - frames[0]["time"]) * Fraction(str(fps))) for frame in frames]
    return [i for i, bucket in enumerate(buckets) if i == 0 or bucket != buckets[i - 1]]


VIDEOS = {
    # 3 s at 30 fps, H.264 with B-frames, a key frame every 10 frames.
    "cfr.mp4": dict(frames=90, rate=30, gop=10),
    # VP9 in WebM, a key frame every 12 frames.
    "cfr.webm": dict(frames=60, rate=30, gop=12, codec="libvpx-vp9"),
    # Variable frame rate: frames of 20, 50 and 33 ms in turn, a key frame every 7 frames.
    "vfr.mkv": dict(frames=80, gop=7, durations_ms=[20, 50, 33]),
}


@pytest.mark.parametrize("name", sorted(VIDEOS))
@pytest.mark.parametrize("sample, fps, segment_s", [("fps", 7.0, 0.45), ("fps", 2.0, 1.1), ("all", 1.0, 0.37), ("keyframes", 1.0, 0.5)])
def test_each_chosen_frame_is_decoded_once_with_its_exact_index_time_and_pixels(tmp_path, name, sample, fps, segment_s):
    """Segment boundaries that fall between key frames (0.37, 0.45, 0.5, 1.1 s against key frames every
    7 to 12 frames): every frame the sampling chooses over the whole stream comes out once, none twice,
    with its index in presentation order, its time from the stream's timestamps and the pixels a decode
    of the whole stream from its start gives it."""
    path = tmp_path / name
    write_video(path, **VIDEOS[name])
    frames = reference(path)
    segments, rows = frame_rows(path, video.VideoOptions(sample=sample, fps=fps, segment_s=segment_s))

    want = expected_indexes(frames, sample, fps)
    assert [row["frame_index"] for row in rows] == want
    assert all(row["error_kind"] is None for row in rows)
    assert [row["frame_time_s"] for row in rows] == [float(frames[i]["time"]) for i in want]
    for row in rows:
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)
        assert np.array_equal(pixels, frames[row["frame_index"]]["pixels"]), row["frame_index"]
    # Segments: consecutive, each within its segment_s window, each seeking to a key frame at or before its first frame.
    starts = segments.column("segment_start_s").to_pylist()
    assert starts == sorted(starts) and len(set(starts)) == len(starts) > 1
    for segment in segments.to_pylist():
        assert all(segment["segment_start_s"] <= t < segment["segment_end_s"] + 1e-9 for t in segment["frame_times"])
        assert segment["keyframe_pts"][0] <= segment["frame_pts"][0]
    assert video.VIDEO_CHANGED_MARKER not in str(rows)


def test_a_frame_at_model_size_is_resized_as_an_image_is(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, frames=10, gop=5, width=320, height=240)
    sized = DecodeOptions(max_file_bytes=1 << 30, max_image_pixels=1 << 30, min_size=100, max_size=200)
    _, rows = frame_rows(path, video.VideoOptions(sample="all"), decode=sized)
    assert [(row["width"], row["height"], row["pixel_width"], row["pixel_height"]) for row in rows] == [(320, 240, 133, 100)] * 10


def test_a_long_video_is_cut_into_segments_of_segment_s(tmp_path):
    path = tmp_path / "long.mp4"
    write_video(path, frames=300, rate=30, gop=25)  # 10 s
    segments, rows = frame_rows(path, video.VideoOptions(fps=2.0, segment_s=3.0))
    assert segments.column("segment_start_s").to_pylist() == [0.0, 3.0, 6.0, 9.0]
    assert [len(frames) for frames in segments.column("frame_indexes").to_pylist()] == [6, 6, 6, 2]
    # Each segment seeks to the last key frame at or before its first frame.
    frames = reference(path)
    time_base = Fraction(1, 15360)  # the MP4 muxer's for 30 fps
    for segment in segments.to_pylist():
        first = Fraction(segment["frame_pts"][0]) * time_base
        assert Fraction(segment["keyframe_pts"][0]) * time_base == max(f["time"] for f in frames if f["key"] and f["time"] <= first)
    assert len(rows) == 20


def test_a_file_without_a_video_stream_is_one_error_row(tmp_path):
    path = tmp_path / "voice.mkv"
    write_audio_only(path)
    segments, rows = frame_rows(path, video.VideoOptions())
    assert [(row["frame_index"], row["error_kind"], row["error"]) for row in rows] == [
        (None, NO_VIDEO_STREAM, "no video stream (streams: audio)")]


def test_a_file_that_is_no_video_is_one_error_row(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 100)
    _, rows = frame_rows(path, video.VideoOptions())
    assert len(rows) == 1 and rows[0]["error_kind"] == NOT_A_VIDEO and rows[0]["frame_index"] is None
    assert rows[0]["error"].startswith("FFmpeg cannot open it as a video (another kind of file, or a video cut short "
                                       "before its index): [Errno 1094995529] Invalid data found when processing input")


def test_a_codec_ffmpeg_cannot_decode_is_one_error_row(tmp_path):
    """An AVI whose stream names a codec (FourCC) FFmpeg has no decoder for: an MPEG-4 AVI with its FourCC
    rewritten."""
    path = tmp_path / "odd.avi"
    write_video(path, frames=10, codec="mpeg4")
    data = path.read_bytes()
    assert data.count(b"FMP4") == 2
    path.write_bytes(data.replace(b"FMP4", b"QQQQ"))
    _, rows = frame_rows(path, video.VideoOptions(sample="all"))
    assert [(row["frame_index"], row["error_kind"], row["error"]) for row in rows] == [
        (None, UNSUPPORTED_CODEC, "its video codec (unknown) has no decoder in this FFmpeg")]


def test_a_video_over_the_duration_limit_is_one_error_row(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, frames=90, rate=30)
    _, rows = frame_rows(path, video.VideoOptions(max_duration_s=2.5))
    assert [(row["frame_index"], row["error_kind"], row["error"]) for row in rows] == [
        (None, TOO_LONG, "3.0 s long, over data.video.max_duration_s=2.5")]


@pytest.mark.parametrize("name", ["cut.mkv", "cut.webm"])
def test_a_video_cut_short_keeps_the_rows_of_its_frames_before_the_cut_and_one_error_row_for_the_rest(tmp_path, name):
    whole = tmp_path / ("whole." + name.split(".")[1])
    write_video(whole, frames=90, gop=10, width=320, height=240, codec="libvpx-vp9" if name.endswith("webm") else "libx264")
    path = tmp_path / name
    path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    frames = reference(whole)
    _, rows = frame_rows(path, video.VideoOptions(sample="all", segment_s=1.0))
    good = [row for row in rows if row["error_kind"] is None]
    bad = [row for row in rows if row["error_kind"] is not None]
    assert 10 < len(good) < 90 and [row["frame_index"] for row in good] == list(range(len(good)))
    assert [row["frame_time_s"] for row in good] == [float(frame["time"]) for frame in frames[: len(good)]]
    assert [(row["frame_index"], row["frame_time_s"], row["error_kind"]) for row in bad] == [(len(good), None, CORRUPT_VIDEO)]
    assert bad[0]["error"] == (f"the stream is damaged (File ended prematurely): the {len(good)} frames read around the "
                               f"damage have their rows, the frames it hides have none")


def test_damage_inside_a_segment_keeps_the_frames_decoded_before_and_an_error_row_for_each_frame_after(tmp_path):
    """An MP4 with 3 KB of its middle overwritten: its index still lists 90 frames, but the decoder
    refuses packets from the segment at 1 s on, whose frames from there are error rows naming their segment;
    the demuxer's reports of the damage are one more error row."""
    path = tmp_path / "garbled.mp4"
    write_video(path, frames=90, gop=10, width=320, height=240)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    _, rows = frame_rows(path, video.VideoOptions(sample="all", segment_s=1.0))
    assert [row["frame_index"] for row in rows] == list(range(91))
    *frames, damage = rows
    assert damage["error_kind"] == CORRUPT_VIDEO and damage["frame_time_s"] is None
    assert damage["error"].startswith("the stream is damaged (Invalid NAL unit size") and "; and " in damage["error"]
    assert damage["error"].endswith("more): the 90 frames read around the damage have their rows, the frames it hides have none")
    bad = [row for row in frames if row["error_kind"] is not None]
    assert bad and {row["error_kind"] for row in bad} == {CORRUPT_VIDEO}
    for row in bad:
        start = int(row["frame_time_s"])
        assert row["error"].startswith(f"segment {start}.000-{start + 1}.000 s of the stream cannot be decoded from "
                                       f"{row['frame_time_s']:.3f} s: InvalidDataError")
    # The first segment decodes whole, and a segment's frames before its damage keep their detections.
    assert all(row["error_kind"] is None for row in frames if row["frame_time_s"] < 1.0)
    assert frames[bad[0]["frame_index"] - 1]["error_kind"] is None and bad[0]["frame_time_s"] > 1.0


class FlakyFiles:
    """Local files whose reads fail with a connection reset, `failures` times, from the `after`-th read on:
    a stand-in (the two calls app.video makes of a filesystem) for object storage that drops connections,
    since no S3 server here can be told to reset one in the middle of a read."""

    def __init__(self):
        self.failures, self.after, self.reads = 0, 0, 0

    def open_input_file(self, path):
        files = self

        class Flaky:
            def __init__(self):
                self.file = open(path, "rb")

            def read(self, size=-1):
                files.reads += 1
                if files.reads > files.after and files.failures:
                    files.failures -= 1
                    raise ConnectionResetError(errno.ECONNRESET, "connection reset by the test")
                return self.file.read(size)

            def seek(self, offset, whence=0):
                return self.file.seek(offset, whence)

            def tell(self):
                return self.file.tell()

            def close(self):
                self.file.close()

        return Flaky()

    def get_file_info(self, path):
        return LOCAL.get_file_info(path)


@pytest.mark.parametrize("attempts, kinds", [(3, {None: 30}), (1, {TRANSIENT: 30})])
def test_a_connection_reset_while_a_segment_decodes_is_retried_from_the_frame_it_stopped_at(tmp_path, attempts, kinds):
    """Once the probe has read the file, the next read fails: with 3 attempts the segment is decoded
    again from where it stopped, and every frame comes out once; with 1, each frame not decoded is a row
    of kind transient (never committed: a rerun reads it again)."""
    path = tmp_path / "clip.mkv"
    write_video(path, frames=30, gop=10, width=320, height=240)
    filesystem = FlakyFiles()
    options = video.VideoOptions(sample="all", segment_s=10.0, read_attempts=attempts)
    segments = video.expand_videos(input_row(path), filesystem=filesystem, options=options)
    filesystem.after, filesystem.failures = filesystem.reads + 1, 1  # the decode's second read fails
    rows = [row for table in video.decode_segments(segments, filesystem=filesystem, uri_prefix="", decode=AS_DECODED, options=options)
            for row in table.to_pylist()]
    assert sorted(row["frame_index"] for row in rows) == list(range(30))
    counted = {}
    for row in rows:
        counted[row["error_kind"]] = counted.get(row["error_kind"], 0) + 1
    if attempts == 1:
        assert counted[TRANSIENT] + counted.get(None, 0) == 30 and counted[TRANSIENT] >= 1
        assert {row["error"] for row in rows if row["error_kind"]} == {
            "still failing after 1 attempts: [Errno 104] connection reset by the test"}
    else:
        assert counted == kinds
