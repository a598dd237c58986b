"""Video inputs: which frames of a video are detected, and how a long video is spread over the cluster.

A video file is probed first, by one CPU task: PyAV (FFmpeg) reads its first video stream's packets
without decoding them, which gives every frame's presentation timestamp and which frames are key frames.
A frame's index is its place in presentation order and its time is its timestamp in the stream's time
base, in seconds: both exact, never counted from a frame rate. The frames to detect are chosen from that
list (data.video.sample: `fps`, the first frame of each 1/fps second; `all`; or `keyframes`), and cut
into segments of data.video.segment_s seconds of the stream. Each segment is one row of the stream that
follows, and one decode task: it seeks to the last key frame at or before the first of its frames still
to detect and decodes from there to its last one. The choice is made once, over the whole stream, so a
frame is never chosen twice or skipped at a boundary between segments, however those fall between key
frames or however the frame rate varies.

Each chosen frame becomes one result row, keyed by its video's path and its index (app.result_schema.
row_keys), so that resume, the tally and the verdicts hold one row per frame as they hold one per image.
A video that cannot be a row per frame (no video stream, a codec FFmpeg cannot decode, not a video at
all, longer than data.video.max_duration_s) is one error row keyed by its path. Damage is kept where it
is: where FFmpeg's demuxer reports damage (a file cut short, a broken element it skips), the frames it
read keep their rows and one more error row, indexed after them, quotes its reports; a segment whose
decoding fails keeps the frames decoded before, and each of its frames not decoded gets an error row of
kind corrupt_video naming the segment.
"""

import bisect
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from app import storage
from app.decode import DECODED_SCHEMA, DecodeOptions, ImageError, fill_pixels
from app.output.resume import contains, digests
from app.result_schema import (
    CORRUPT_VIDEO,
    NO_VIDEO_STREAM,
    NOT_A_VIDEO,
    REFUSED,
    TOO_LONG,
    TRANSIENT,
    UNREADABLE,
    UNSUPPORTED_CODEC,
)
from app.retry import RetryBudgetSpent, backoff_s, is_refused, is_transient, take_retry, with_retries

# A video's segment: the input row the decode stage gets for it. The video's own columns
# (app.listing.INPUT_SCHEMA's), then the frames to detect in it, in presentation order (their index, their
# timestamp in the stream's time base, their time in seconds), and the key frames' timestamps a decode
# may seek to. An error row of the whole video has no frames; the row standing for the frames after
# damage in the stream has the index of the first of them alone.
SEGMENT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("raw_path", pa.binary()),
        ("video_version", pa.string()),
        ("segment_start_s", pa.float64()),
        ("segment_end_s", pa.float64()),
        ("frame_indexes", pa.list_(pa.int64())),
        ("frame_pts", pa.list_(pa.int64())),
        ("frame_times", pa.list_(pa.float64())),
        ("keyframe_pts", pa.list_(pa.int64())),
    ]
)

# Bytes FFmpeg asks storage for at a time: on S3 each read is a ranged GET.
READ_BUFFER_BYTES = 4 * 1024 * 1024
# The demuxer's reports of damage quoted in its error row, at most.
DAMAGE_MESSAGES = 3
# Decoded frames a decode task hands on at a time.
FRAMES_PER_OUTPUT = 8


@dataclass(frozen=True)
class VideoOptions:
    """Which frames of a video are detected, how its decoding is cut, and its limits (data.video)."""

    sample: str = "fps"  # fps | all | keyframes
    fps: float = 1.0
    segment_s: float = 60.0
    max_duration_s: float = 4 * 3600.0
    read_attempts: int = 1


@dataclass
class StreamIndex:
    """A video stream's frames from its packets: timestamps in presentation order, which are key frames,
    the time base; and, when the packets stopped being readable, why."""

    pts: np.ndarray
    keyframe: np.ndarray
    time_base: Fraction
    damage: Optional[str] = None

    def seconds(self, pts: np.ndarray) -> np.ndarray:
        return np.array([float(Fraction(int(value)) * self.time_base) for value in pts], dtype=np.float64)


def open_container(filesystem: pafs.FileSystem, path: str, raw_path: Optional[bytes] = None):
    """The video at `path` opened by PyAV, with the file it reads (to close after the container)."""
    import av

    if raw_path is not None:  # a local name that is not valid UTF-8
        file = open(raw_path, "rb")
    elif isinstance(filesystem, pafs.LocalFileSystem):
        file = open(path, "rb")
    else:
        file = filesystem.open_input_file(path)
    try:
        return av.open(file, buffer_size=READ_BUFFER_BYTES), file
    except BaseException:
        file.close()
        raise


def video_stream(container):
    """The container's first video stream, or an ImageError saying why it has none FFmpeg decodes."""
    import av

    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["none"]
        raise ImageError(NO_VIDEO_STREAM, f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    name = stream.codec_context.name if stream.codec_context is not None else None
    try:
        if name is None:
            raise ValueError("no codec")
        av.codec.Codec(name, "r")
    except (ValueError, av.error.FFmpegError):
        raise ImageError(UNSUPPORTED_CODEC, f"its video codec ({name or 'unknown'}) has no decoder in this FFmpeg") from None
    return stream


def index_stream(container, options: VideoOptions) -> StreamIndex:
    """Read the first video stream's packets (not decoding them): each frame's timestamp and whether it
    is a key frame. Damage is what stops the packets (an error) or what FFmpeg's demuxer reports at its
    error level while it reads them (a file cut short, a broken element it skips): the frames it hides
    are not in the index. Raises ImageError when the video is longer than options.max_duration_s."""
    import av
    import av.logging

    stream = video_stream(container)
    if container.duration is not None and container.duration / 1e6 > options.max_duration_s:
        raise too_long(container.duration / 1e6, options)
    pts, keyframe, damage = [], [], None
    level, skip_repeated = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # the same damage in the next file is reported again
    try:
        with av.logging.Capture() as reports:
            try:
                for packet in container.demux(stream):
                    stamp = packet.pts if packet.pts is not None else packet.dts
                    if packet.size == 0 or stamp is None:
                        continue
                    pts.append(stamp)
                    keyframe.append(packet.is_keyframe)
            except av.error.FFmpegError as error:
                damage = f"{type(error).__name__}: {error}"
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip_repeated)
    if reports and damage is None:
        messages = list(dict.fromkeys(message.strip() for _, _, message in reports))
        more = f"; and {len(messages) - DAMAGE_MESSAGES} more" if len(messages) > DAMAGE_MESSAGES else ""
        damage = "; ".join(messages[:DAMAGE_MESSAGES]) + more
    order = np.argsort(np.array(pts, dtype=np.int64), kind="stable")
    index = StreamIndex(np.array(pts, dtype=np.int64)[order], np.array(keyframe, dtype=bool)[order],
                        Fraction(stream.time_base), damage)
    if not len(index.pts) and damage is None:
        raise ImageError(CORRUPT_VIDEO, "its video stream holds no frames")
    if len(index.pts):
        duration = float((int(index.pts[-1]) - int(index.pts[0])) * index.time_base)
        if duration > options.max_duration_s:
            raise too_long(duration, options)
    return index


def too_long(seconds: float, options: VideoOptions) -> ImageError:
    return ImageError(TOO_LONG, f"{seconds:.1f} s long, over data.video.max_duration_s={options.max_duration_s:g}")


def sampled(index: StreamIndex, options: VideoOptions) -> np.ndarray:
    """The positions (frame indexes) of the frames to detect, in presentation order."""
    if options.sample == "all":
        return np.arange(len(index.pts))
    if options.sample == "keyframes":
        return np.flatnonzero(index.keyframe)
    # The first frame of each 1/fps-second interval from the first frame, in exact rational arithmetic.
    step = index.time_base * Fraction(str(options.fps))
    buckets = np.array([(int(value) - int(index.pts[0])) * step.numerator // step.denominator for value in index.pts])
    return np.flatnonzero(np.diff(buckets, prepend=-1) != 0)


def segments(index: StreamIndex, chosen: np.ndarray, options: VideoOptions) -> list[np.ndarray]:
    """The chosen frames cut by data.video.segment_s seconds of the stream from its first frame."""
    if not len(chosen):
        return []
    length = Fraction(str(options.segment_s)) / index.time_base  # in timestamps
    first = int(index.pts[0])
    number = np.array([math.floor((int(index.pts[i]) - first) / length) for i in chosen])
    cuts = np.flatnonzero(np.diff(number)) + 1
    return np.split(chosen, cuts)


def video_version(filesystem: pafs.FileSystem, path: str, raw_path: Optional[bytes]) -> str:
    """What a video was when its frames were read: its size and modification time. A rerun that finds
    another stops (VideoChanged), so that no output mixes frames of two versions of a file."""
    if raw_path is not None:
        info = os.stat(raw_path)
        size, modified = info.st_size, datetime.fromtimestamp(info.st_mtime_ns / 1e9, timezone.utc)
    else:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{path} not found")
        size, modified = info.size, info.mtime
    return f"{size} bytes, modified {modified.strftime('%Y-%m-%dT%H:%M:%S.%fZ') if modified else 'unknown'}"


def probe(filesystem: pafs.FileSystem, path: str, raw_path: Optional[bytes],
          options: VideoOptions, budget: Optional[ray.actor.ActorHandle] = None) -> tuple[str, StreamIndex]:
    """The video's version and stream index, read with retries of faults that may pass; every failure
    is an ImageError of the video's kind (app.decode.read_file's kinds for storage's faults)."""
    import av

    def read() -> tuple[str, StreamIndex]:
        version = video_version(filesystem, path, raw_path)
        container, file = open_container(filesystem, path, raw_path)
        try:
            return version, index_stream(container, options)
        finally:
            container.close()
            file.close()

    try:
        return with_retries(read, options.read_attempts, budget, path=path)
    except (ImageError, RetryBudgetSpent):
        raise
    except av.error.FFmpegError as error:
        raise ImageError(NOT_A_VIDEO, f"FFmpeg cannot open it as a video (another kind of file, or a video cut short "
                                      f"before its index): {error}") from error
    except OSError as error:
        raise storage_error(error, path, options) from error


def storage_error(error: OSError, path: str, options: VideoOptions) -> ImageError:
    if is_transient(error, path):
        return ImageError(TRANSIENT, f"still failing after {options.read_attempts} attempts: {error}")
    if is_refused(error, path):
        return ImageError(REFUSED, str(error))
    return ImageError(UNREADABLE, str(error))


def segment_rows(row: dict, version: str, index: StreamIndex, options: VideoOptions) -> list[dict]:
    """A probed video's SEGMENT_SCHEMA rows: one per segment; and after damage in its packets, one row
    for the frames it hides."""
    keyframes = index.pts[index.keyframe]
    offset = float(index.pts[0] * index.time_base) if len(index.pts) else 0.0
    rows = []
    for frames in segments(index, sampled(index, options), options):
        first, last = int(index.pts[frames[0]]), int(index.pts[frames[-1]])
        # The key frames from the one at or before the segment's first frame to its last frame.
        start = max(0, int(np.searchsorted(keyframes, first, side="right")) - 1)
        stop = int(np.searchsorted(keyframes, last, side="right"))
        number = math.floor((float((first - int(index.pts[0])) * index.time_base)) / options.segment_s)
        rows.append(dict(row, video_version=version,
                         segment_start_s=offset + number * options.segment_s,
                         segment_end_s=offset + (number + 1) * options.segment_s,
                         frame_indexes=frames.tolist(), frame_pts=index.pts[frames].tolist(),
                         frame_times=index.seconds(index.pts[frames]).tolist(),
                         keyframe_pts=keyframes[start:stop].tolist() or [int(index.pts[0])]))
    if index.damage is not None:
        rows.append(dict(row, video_version=version, error_kind=CORRUPT_VIDEO, frame_indexes=[len(index.pts)],
                         frame_times=[None],
                         error=f"the stream is damaged ({index.damage}): the {len(index.pts)} frames read around "
                               f"the damage have their rows, the frames it hides have none"))
    return rows


def expand_videos(batch: pa.Table, *, filesystem: pafs.FileSystem, options: VideoOptions, uri_prefix: str = "",
                  index: Optional[ray.ObjectRef] = None, versions: Optional[ray.ObjectRef] = None,
                  budget: Optional[ray.actor.ActorHandle] = None) -> pa.Table:
    """Ray Data UDF: video files (app.listing.INPUT_SCHEMA rows) in, their segments (SEGMENT_SCHEMA) out.
    A file that cannot be probed is one error row; one the listing found unusable, or whose own error
    row is in the committed keys' `index` (app.output.resume), passes as it is. `versions` holds the
    versions of the videos output.path has frames of, by path: a video found changed stops the run
    (VideoChanged)."""
    filesystem = storage.for_image_reads(filesystem)
    known = ray.get(versions) if versions is not None else {}
    committed = ray.get(index) if index is not None else None
    rows = []
    for row in batch.to_pylist():
        row = {name: row.get(name) for name in SEGMENT_SCHEMA.names}
        done = committed is not None and contains(committed, digests([uri_prefix + row["path"]]))[0]
        if row["error_kind"] is not None or done:
            rows.append(row)
            continue
        try:
            version, stream = probe(filesystem, row["path"], row["raw_path"], options, budget)
        except ImageError as error:
            rows.append(dict(row, error_kind=error.kind, error=str(error)))
            continue
        before = known.get(uri_prefix + row["path"])
        if before is not None and before != version:
            raise VideoChanged(f"{VIDEO_CHANGED_MARKER} {uri_prefix + row['path']} changed since output.path's rows of its frames "
                               f"were made ({before}; now {version}): use a new output.path, or output.overwrite=true")
        rows.extend(segment_rows(row, version, stream, options))
    return pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)


# Begins VideoChanged's message, so that the driver finds it inside Ray's wrapping of a task's error.
VIDEO_CHANGED_MARKER = "ray-detect video changed:"


class VideoChanged(Exception):
    """A video output.path holds frames of has another size or modification time now."""


def decode_segments(batch: pa.Table, *, filesystem: pafs.FileSystem, uri_prefix: str, decode: DecodeOptions,
                    options: VideoOptions, budget: Optional[ray.actor.ActorHandle] = None) -> Iterator[pa.Table]:
    """Ray Data UDF: segments (SEGMENT_SCHEMA) in, one decoded row (app.decode.DECODED_SCHEMA) per frame
    out, a few frames at a time; error rows for the frames that cannot be decoded, and one for an error
    row of a whole video."""
    filesystem = storage.for_image_reads(filesystem)
    for segment in batch.to_pylist():
        out = []
        for row in segment_frames(filesystem, segment, decode, options, budget):
            row["path"] = uri_prefix + segment["path"]
            row["video_version"] = segment["video_version"]
            out.append(row)
            if len(out) == FRAMES_PER_OUTPUT:
                yield decoded_table(out)
                out = []
        if out:
            yield decoded_table(out)


def decoded_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in DECODED_SCHEMA.names} for row in rows], schema=DECODED_SCHEMA)


def segment_frames(filesystem: pafs.FileSystem, segment: dict, decode: DecodeOptions, options: VideoOptions,
                   budget: Optional[ray.actor.ActorHandle]) -> Iterator[dict]:
    """The decoded rows of a segment's frames, in presentation order; error rows for those it cannot give.
    A read that fails for a reason that may pass is retried (data.read_attempts, under the run's retry
    budget) from the first frame not decoded yet."""
    import av

    indexes, times = segment["frame_indexes"], segment["frame_times"]
    if segment["error_kind"] is not None:
        for index, seconds in zip(indexes or [None], times or [None]):
            yield dict(frame_index=index, frame_time_s=seconds, error_kind=segment["error_kind"], error=segment["error"])
        return
    wanted = dict(zip(segment["frame_pts"], zip(indexes, times)))
    left = sorted(wanted)
    failure = None
    for attempt in range(options.read_attempts):
        try:
            started = time.perf_counter()
            for pts, frame in decoded_frames(filesystem, segment, list(left), segment["keyframe_pts"]):
                index, seconds = wanted[pts]
                row = dict(frame_index=index, frame_time_s=seconds, width=frame.width, height=frame.height)
                fill_pixels(row, frame.to_image(), decode)
                row["decode_seconds"] = time.perf_counter() - started
                left.remove(pts)
                yield row
                started = time.perf_counter()
            break
        except OSError as error:
            if is_transient(error, segment["path"]) and attempt + 1 < options.read_attempts:
                take_retry(budget, error)
                time.sleep(backoff_s(attempt))
                continue
            failure = storage_error(error, segment["path"], options)
            break
        except (av.error.FFmpegError, ValueError) as error:
            failure = ImageError(CORRUPT_VIDEO, f"{type(error).__name__}: {error}")
            break
    if left and failure is None:
        failure = ImageError(CORRUPT_VIDEO, "no frame of its timestamp came out of the decoder")
    where = f"segment {segment['segment_start_s']:.3f}-{segment['segment_end_s']:.3f} s of the stream"
    for pts in left:
        index, seconds = wanted[pts]
        message = f"{where} cannot be decoded from {seconds:.3f} s: {failure}" if failure.kind == CORRUPT_VIDEO else str(failure)
        yield dict(frame_index=index, frame_time_s=seconds, error_kind=failure.kind, error=message)


def decoded_frames(filesystem: pafs.FileSystem, segment: dict, wanted: list[int], keyframes: list[int]) -> Iterator:
    """(timestamp, frame) of the wanted frames (their timestamps, sorted), decoded from the last key
    frame at or before each run of them: a frame is decoded at most once, and a stretch holding none of
    them from one key frame to the next is skipped by a seek. Ends early where the stream does."""
    container, file = open_container(filesystem, segment["path"], segment["raw_path"])
    try:
        stream = container.streams.video[0]
        decoded = None  # the timestamp of the last frame decoded
        while wanted:
            seek = key_frame_before(keyframes, wanted[0])
            if decoded is None or seek > decoded:
                container.seek(seek, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is None or frame.pts < wanted[0]:
                    decoded = frame.pts if frame.pts is not None else decoded
                    continue
                decoded = frame.pts
                if frame.pts > wanted[0]:
                    return  # the wanted frame did not come out where its packet placed it: damage
                wanted.pop(0)
                yield frame.pts, frame
                if not wanted or key_frame_before(keyframes, wanted[0]) > decoded:
                    break
            else:
                return
    finally:
        container.close()
        file.close()


def key_frame_before(keyframes: list[int], pts: int) -> int:
    """The last key frame's timestamp at or before pts (the first key frame when none is)."""
    return keyframes[max(0, bisect.bisect_right(keyframes, pts) - 1)]


def read_frame(filesystem: pafs.FileSystem, path: str, frame_time_s: float):
    """The frame of the video at `path` whose time is frame_time_s (as a row holds it), as an RGB image;
    ImageError when the video has no such frame now."""
    import av

    container, file = open_container(filesystem, path)
    try:
        stream = container.streams.video[0]
        target = Fraction(frame_time_s) / Fraction(stream.time_base)
        container.seek(int(target), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            seconds = float(Fraction(frame.pts) * Fraction(stream.time_base))
            if seconds == frame_time_s:
                return frame.to_image()
            if seconds > frame_time_s:
                break
    except (av.error.FFmpegError, IndexError) as error:
        raise ImageError(CORRUPT_VIDEO, f"its frame at {frame_time_s:.3f} s cannot be decoded: {error}") from error
    finally:
        container.close()
        file.close()
    raise ImageError(CORRUPT_VIDEO, f"the video has no frame at {frame_time_s:.3f} s now")
