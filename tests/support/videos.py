"""Videos the tests make with PyAV: constant or variable frame rate, a key frame every `gop` frames, in
the codec and container asked for. Each frame shows a bright box that moves across a background whose
colour changes with the frame, so that frames differ and a detector finds something."""

from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np


def frame_pixels(number: int, width: int, height: int) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0] = (number * 7) % 256
    pixels[:, :, 2] = 60
    size = max(8, min(width, height) // 3)
    left = (number * 3) % max(1, width - size)
    pixels[height // 4 : height // 4 + size, left : left + size] = (250, 250, 40)
    return pixels


def write_video(path: Path, frames: int = 60, rate: int = 30, gop: int = 10, codec: str = "libx264",
                width: int = 160, height: int = 120, durations_ms: Optional[list[int]] = None) -> list[float]:
    """Write a video; returns its frames' times in seconds, in presentation order. `durations_ms`, cycled
    through, gives a variable frame rate (a millisecond time base) instead of `rate` frames a second."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0", "bf": "2"}
        time_base = Fraction(1, 1000) if durations_ms else Fraction(1, rate)
        stream.codec_context.time_base = time_base
        pts, times = 0, []
        for number in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(number, width, height), format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            times.append(float(pts * time_base))
            pts += durations_ms[number % len(durations_ms)] if durations_ms else 1
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return times


def write_audio_only(path: Path, seconds: float = 1.0) -> None:
    """A file with an audio stream and no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        for start in range(0, samples, 1024):
            count = min(1024, samples - start)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, count), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def reference_frames(path: Path) -> list[tuple[float, np.ndarray]]:
    """Every frame of the first video stream, decoded from the start: (time in seconds, RGB pixels)."""
    import av

    with av.open(str(path)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
