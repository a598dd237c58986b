"""The readers on frames of videos: `export` writes a COCO image (and a VOC file) per frame, named by its
video and time; `evaluate` matches ground truth named so; `report` previews a frame read back from its
video at its time, with its boxes."""

import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from app import evaluate, export, report
from tests.support.results import ok_row, write_results
from tests.support.videos import frame_pixels, reference_frames, write_video

DOG = 18


def frame_row(path, index, seconds, detections=()):
    return dict(ok_row(path, detections, width=160, height=120), frame_index=index, frame_time_s=seconds,
                video_version="1 bytes, modified 2026-12-07T00:00:00.000000Z")


def test_coco_export_has_an_image_per_frame_named_by_its_video_and_time(tmp_path):
    video = tmp_path / "in" / "clips" / "clip.mp4"
    rows = [frame_row(video, 15, 0.5, [(DOG, "dog", 0.9, [10, 20, 50, 60])]), frame_row(video, 30, 1.0),
            ok_row(tmp_path / "in" / "a.jpg")]
    results = write_results(tmp_path / "results", rows)
    export.main([results, "--format", "coco", "--out", str(tmp_path / "coco.json")])
    coco = COCO(str(tmp_path / "coco.json"))
    images = sorted(coco.loadImgs(coco.getImgIds()), key=lambda image: image["file_name"])
    assert [(image["file_name"], image.get("frame_index"), image.get("frame_time_s"), image["path"]) for image in images] == [
        ("a.jpg", None, None, str(tmp_path / "in" / "a.jpg")),
        ("clips/clip.mp4#t=0.500", 15, 0.5, str(video)),
        ("clips/clip.mp4#t=1.000", 30, 1.0, str(video)),
    ]
    frame = next(image for image in images if image.get("frame_index") == 15)
    assert [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[frame["id"]]))] == [[10, 20, 40, 40]]

    export.main([results, "--format", "voc", "--out", str(tmp_path / "voc")])
    assert sorted(path.name for path in (tmp_path / "voc").iterdir()) == ["a.xml", "clip#t=0.500.xml", "clip#t=1.000.xml"]
    assert "<filename>clip.mp4#t=0.500</filename>" in (tmp_path / "voc" / "clip#t=0.500.xml").read_text()


def test_evaluate_matches_frames_by_video_and_time(tmp_path, capsys):
    video = tmp_path / "in" / "clip.mp4"
    rows = [frame_row(video, 15, 0.5, [(DOG, "dog", 0.9, [10, 20, 50, 60])]), frame_row(video, 30, 1.0)]
    results = write_results(tmp_path / "results", rows)
    truth = {
        "images": [{"id": 1, "file_name": "clip.mp4#t=0.5", "width": 160, "height": 120},
                   {"id": 2, "file_name": "clip.mp4#t=2.000", "width": 160, "height": 120}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 40, 40], "area": 1600, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "dog"}],
    }
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    metrics = evaluate.evaluate(results, str(tmp_path / "truth.json"))
    assert metrics["images"] == 1 and metrics["map"] == 1.0
    assert capsys.readouterr().err.splitlines() == [
        "ray-detect evaluate: 1 image of the ground truth not in the results; left out",
        "ray-detect evaluate: 1 image of the results not in the ground truth; left out",
    ]


def test_report_previews_a_frame_read_from_its_video_at_its_time(tmp_path):
    video = tmp_path / "in" / "clip.mkv"
    write_video(video, frames=30, gop=10, codec="ffv1")  # lossless: the frame's own colours come back
    times = [float(seconds) for seconds, _ in reference_frames(video)]  # as Matroska keeps them: in milliseconds
    rows = [frame_row(video, 17, times[17], [(DOG, "dog", 0.9, [10, 10, 40, 40])])]
    results = write_results(tmp_path / "results", rows)
    report.main([results, "--out", str(tmp_path / "report")])
    page = (tmp_path / "report" / "index.html").read_text()
    assert f'title="{video}#t={times[17]:.3f}"' in page
    preview = np.asarray(Image.open(tmp_path / "report" / "previews" / f"0001_clip_t{times[17]:.3f}.jpg"))
    assert preview.shape == (120, 160, 3)
    want = frame_pixels(17, 160, 120)
    # Outside the box, the preview is frame 17 (JPEG-compressed), not a neighbour: frames differ by 7 in red.
    assert np.abs(preview[100, 150].astype(int) - want[100, 150]).max() <= 3
    assert close_to_box_color(preview[25, 11])


def close_to_box_color(pixel) -> bool:
    return np.abs(np.asarray(pixel, int) - report.label_color(DOG)).max() <= 40
