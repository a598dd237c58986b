"""Batch-size calibration (app.calibration): the choice among measured batch sizes with fake probes (timings
on this machine's CPU say nothing of a GPU), the cache that keeps it, and the detector's own probe run on
the CPU with a real (random-init) model. A whole calibrating run: tests/test_batches.py."""

import json
import logging
import math
from typing import Optional

import numpy as np
import pytest
import torch

from app.calibration import (CalibrationCache, CalibrationOptions, Trial, calibrated_batch_size, candidates,
                             choose_batch_size, trials_line)
from app.detector import Detector
from app.model import ModelSpec

GIB = 1024**3


def probe(seconds: dict[int, float], peaks: Optional[dict[int, int]] = None, tried: Optional[list] = None):
    """A fake probe: the seconds per image and peak bytes given for each batch size (inf: out of memory)."""

    def measure(batch_size: int) -> Trial:
        if tried is not None:
            tried.append(batch_size)
        return Trial(batch_size, seconds[batch_size], (peaks or {}).get(batch_size))

    return measure


def test_candidates_are_powers_of_two_up_to_the_ceiling():
    assert candidates(1) == [1]
    assert candidates(8) == [1, 2, 4, 8]
    assert candidates(12) == [1, 2, 4, 8, 12]
    assert candidates(32) == [1, 2, 4, 8, 16, 32]


def test_the_smallest_batch_size_within_five_percent_of_the_best_time_per_image_is_chosen():
    tried = []
    seconds = {1: 0.040, 2: 0.025, 4: 0.0160, 8: 0.0125, 16: 0.0121, 32: 0.0120}
    chosen, trials = choose_batch_size(probe(seconds, tried=tried), 32)
    assert chosen == 8  # 12.5 ms is within 5% of 12.0 ms; 16.0 ms is not
    assert tried == [1, 2, 4, 8, 16, 32]
    assert [trial.batch_size for trial in trials] == tried
    # A best that only the ceiling reaches is chosen.
    assert choose_batch_size(probe({1: 0.04, 2: 0.02, 4: 0.01}), 4)[0] == 4


def test_a_batch_size_slower_per_image_than_a_smaller_one_ends_the_probe():
    """Past the device's saturation (as on a CPU), larger batches are not tried."""
    tried = []
    chosen, _ = choose_batch_size(probe({1: 0.143, 2: 0.140, 4: 0.154, 8: 0.168, 16: 0.225}, tried=tried), 16)
    assert (chosen, tried) == (1, [1, 2, 4])  # 1 is within 5% of 2's time per image


def test_running_out_of_memory_stops_the_probe_and_the_largest_that_ran_is_the_limit():
    tried = []
    seconds = {1: 0.040, 2: 0.025, 4: 0.016, 8: 0.0125, 16: math.inf, 32: 0.001}
    chosen, trials = choose_batch_size(probe(seconds, tried=tried), 32)
    assert (chosen, tried) == (8, [1, 2, 4, 8, 16])
    assert trials_line(trials) == ("1: 40.0 ms/image, 2: 25.0 ms/image, 4: 16.0 ms/image, 8: 12.5 ms/image, "
                                   "16: out of memory")
    # Nothing fits: one image a call (the out-of-memory splitter guards it).
    assert choose_batch_size(probe({1: math.inf}), 8) == (1, [Trial(1, math.inf)])


def test_a_batch_size_whose_peak_memory_leaves_less_than_fifteen_percent_of_the_share_free_does_not_fit():
    seconds = {1: 0.040, 2: 0.025, 4: 0.016, 8: 0.010}
    peaks = {1: 2 * GIB, 2: 4 * GIB, 4: 8 * GIB, 8: 9 * GIB}
    tried = []
    # 10 GiB for the actor: 8.5 GiB may be used, so 8 images (9 GiB) do not fit and end the probe.
    assert choose_batch_size(probe(seconds, peaks, tried), 16, memory_limit=10 * GIB)[0] == 4
    assert tried == [1, 2, 4, 8]
    assert choose_batch_size(probe(seconds, peaks), 8, memory_limit=11 * GIB)[0] == 8
    assert choose_batch_size(probe(seconds, peaks), 8, memory_limit=None)[0] == 8


def test_a_calibration_is_cached_by_its_key_and_reused_without_measuring(tmp_path, caplog):
    cache = tmp_path / "cache" / "batch-sizes.json"
    options = CalibrationOptions(ceiling=8, cache=str(cache))
    tried = []
    measure = probe({1: 0.04, 2: 0.02, 4: 0.0101, 8: 0.01}, tried=tried)
    with caplog.at_level(logging.INFO, logger="app.calibration"):
        assert calibrated_batch_size(measure, options, "cuda:H100, model, fp16", None) == 4
        assert tried == [1, 2, 4, 8]
        assert calibrated_batch_size(measure, options, "cuda:H100, model, fp16", None) == 4
        assert tried == [1, 2, 4, 8]  # not measured again
        assert calibrated_batch_size(measure, options, "cuda:H100, model, bf16", None) == 4
        assert tried == [1, 2, 4, 8] * 2  # another key is measured
    assert caplog.messages[:2] == [
        "batch size 4, calibrated for cuda:H100, model, fp16: 1: 40.0 ms/image, 2: 20.0 ms/image, 4: 10.1 ms/image, "
        "8: 10.0 ms/image",
        f"batch size 4, as calibrated before for cuda:H100, model, fp16 (cache {cache})",
    ]
    entries = json.loads(cache.read_text())
    assert sorted(entries) == ["cuda:H100, model, bf16", "cuda:H100, model, fp16"]
    assert entries["cuda:H100, model, fp16"]["trials"][0] == {"batch_size": 1, "seconds_per_image": 0.04, "peak_bytes": None}


def test_an_unreadable_cache_is_measured_again_and_one_that_cannot_be_written_only_warns(tmp_path, caplog):
    garbled = tmp_path / "garbled.json"
    garbled.write_text("{not json")
    measure = probe({1: 0.02, 2: 0.01})
    with caplog.at_level(logging.WARNING, logger="app.calibration"):
        assert calibrated_batch_size(measure, CalibrationOptions(2, str(garbled)), "key", None) == 2
    assert caplog.messages[0].startswith(f"the batch-size calibration cache {garbled} cannot be read (")
    assert json.loads(garbled.read_text())["key"]["batch_size"] == 2  # rewritten whole
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.calibration"):
        assert calibrated_batch_size(measure, CalibrationOptions(2, str(blocked / "cache.json")), "key", None) == 2
    assert caplog.messages[-1].startswith(f"the batch-size calibration cache {blocked / 'cache.json'} cannot be written (")
    assert CalibrationCache(str(blocked / "cache.json")).get("key") is None


SMALL = ModelSpec(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none", score_threshold=0.0, min_size=64, max_size=96)


def test_the_detectors_probe_times_real_model_calls_on_the_largest_padded_input():
    """The probe on the CPU with a real model: each of its calls gets batch_size images of the model's
    largest input (96 x 64 px), and its time is per image; no device memory to report on the CPU."""
    detector = Detector(SMALL, num_threads=1)
    shapes = []
    model = detector.model
    detector.model = lambda images: shapes.append([tuple(image.shape) for image in images]) or model(images)
    trial = detector.time_batch(3)
    assert shapes == [[(3, 64, 96)] * 3] * 4  # one warm-up call and three timed ones
    assert trial.batch_size == 3 and 0 < trial.seconds_per_image < math.inf and trial.peak_bytes is None


def test_the_detectors_probe_reports_running_out_of_device_memory_as_a_trial_that_does_not_fit():
    """torch's out-of-memory error, raised by a stand-in for the model (no GPU here), is the trial's result."""
    detector = Detector(SMALL, num_threads=1)

    def out_of_memory(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    detector.model = out_of_memory
    assert detector.time_batch(16) == Trial(16, math.inf)
    detector.model = lambda images: 1 / 0
    with pytest.raises(ZeroDivisionError):
        detector.time_batch(1)


def test_a_detector_given_calibration_options_runs_at_the_chosen_batch_size_and_the_next_one_reads_the_cache(tmp_path):
    cache = tmp_path / "batch-sizes.json"
    tried = []

    class ProbedDetector(Detector):
        def time_batch(self, batch_size):
            tried.append(batch_size)
            return Trial(batch_size, {1: 0.03, 2: 0.02, 4: 0.02}[batch_size])

    first = ProbedDetector(SMALL, num_threads=1, batch_size=4, calibration=CalibrationOptions(4, str(cache)))
    assert (first.batch_size, tried) == (2, [1, 2, 4])
    assert "calibration" in first.startup_seconds
    (key,) = json.loads(cache.read_text())
    assert key == (f"cpu, fasterrcnn_mobilenet_v3_large_320_fpn at 64-96 px, fp32, torch {torch.__version__}, "
                   "1 of the device, batch sizes up to 4")
    second = ProbedDetector(SMALL, num_threads=1, batch_size=4, calibration=CalibrationOptions(4, str(cache)))
    assert (second.batch_size, tried) == (2, [1, 2, 4])
    found, ran = second.detect_batches([np.zeros((64, 96, 3), np.uint8)] * 5)
    assert [len(batch.indices) for batch in ran] == [2, 2, 1]
