"""mAP against ground truth on synthetic cases with known answers, for VOC XML and COCO JSON."""

import json

import pytest
from torchvision.models import get_model_weights

from app import evaluate, export
from tests.support.results import MODEL, error_row, ok_row, write_results

CAT, DOG, TABLE = (17, "cat"), (18, "dog"), (67, "dining table")
# A dog box shifted right by 20 px on a 100 px box: IoU = 80·100 / (2·100·100 − 80·100) = 2/3, so it
# matches at the IoU thresholds .50, .55, .60, .65 and misses at .70 ... .95: AP = 4/10.
SHIFTED_AP = 0.4


def voc_xml(filename, objects, width=200, height=150):
    """objects: (name, [xmin, ymin, xmax, ymax] in VOC's 1-based inclusive pixels, difficult)."""
    parts = [f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc_truth(tmp_path):
    """Two images: a cat and a dog at [0, 0, 100, 100]; a dining table, an unknown class, a difficult cat."""
    folder = tmp_path / "truth" / "Annotations"
    folder.mkdir(parents=True)
    (folder / "one.xml").write_text(voc_xml("one.jpg", [("cat", (1, 1, 100, 100), False), ("diningtable", (101, 51, 180, 140), False)]))
    (folder / "two.xml").write_text(voc_xml("two.jpg", [("dog", (1, 1, 100, 100), False), ("unicorn", (5, 5, 9, 9), False),
                                                        ("cat", (151, 101, 190, 140), True)]))
    (folder / "other.xml").write_text(voc_xml("not-in-results.jpg", [("dog", (1, 1, 50, 50), False)]))
    return str(tmp_path / "truth")


def results_with(tmp_path, dog_box, extra_rows=()):
    rows = [
        ok_row(tmp_path / "in" / "one.jpg", [(*CAT, 0.9, [0, 0, 100, 100]), (*TABLE, 0.8, [100, 50, 180, 140])]),
        ok_row(tmp_path / "in" / "two.jpg", [(*DOG, 0.7, dog_box)]),
        *extra_rows,
    ]
    return write_results(tmp_path / "results", rows)


def test_perfect_predictions_score_one(tmp_path, voc_truth, capsys):
    results = results_with(tmp_path, [0, 0, 100, 100], [ok_row(tmp_path / "in" / "extra.jpg")])
    evaluate.main([results, "--ground-truth", voc_truth, "--json", str(tmp_path / "metrics.json")])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "ray-detect evaluate: 1 image of the ground truth not in the results; left out",
        "ray-detect evaluate: 1 image of the results not in the ground truth; left out",
        "ray-detect evaluate: ground-truth classes the model does not know, left out: unicorn (1)",
    ]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == 2
    assert metrics["map"] == 1.0 and metrics["map_50"] == 1.0
    assert metrics["per_class"] == {
        "cat": {"ap": 1.0, "ap_50": 1.0, "ground_truth": 1, "detections": 1},
        "dining table": {"ap": 1.0, "ap_50": 1.0, "ground_truth": 1, "detections": 1},
        "dog": {"ap": 1.0, "ap_50": 1.0, "ground_truth": 1, "detections": 1},
    }
    assert metrics["unmapped_classes"] == {"unicorn": 1}
    assert captured.out.splitlines() == [
        "ray-detect evaluate: 2 images",
        "class            GT  detections  AP@[.5:.95]   AP@.5",
        "cat               1           1        1.000   1.000",
        "dining table      1           1        1.000   1.000",
        "dog               1           1        1.000   1.000",
        "mAP               3           3        1.000   1.000",
    ]


def test_shifted_box_lowers_ap_as_its_iou_says(tmp_path, voc_truth):
    results = results_with(tmp_path, [20, 0, 120, 100])
    metrics = evaluate.evaluate(results, voc_truth)
    assert metrics["per_class"]["dog"]["ap"] == SHIFTED_AP
    assert metrics["per_class"]["dog"]["ap_50"] == 1.0
    assert metrics["per_class"]["cat"]["ap"] == 1.0
    assert metrics["map"] == pytest.approx((1.0 + 1.0 + SHIFTED_AP) / 3, abs=1e-6)
    assert metrics["map_50"] == 1.0


def test_missed_and_false_detections(tmp_path, voc_truth):
    # The dog is missed (its box is elsewhere): dog AP 0, and the unreadable row's objects count as missed.
    truth = tmp_path / "truth" / "Annotations"
    (truth / "three.xml").write_text(voc_xml("three.png", [("cat", (1, 1, 100, 100), False)]))
    results = results_with(tmp_path, [150, 100, 190, 140], [error_row(tmp_path / "in" / "three.png", "corrupt_image", "x")])
    metrics = evaluate.evaluate(results, voc_truth)
    assert metrics["images"] == 3
    # cat: 2 objects, 1 found with the highest score → precision 1 up to recall 0.5, then nothing: AP ≈ 0.5
    # (COCO's 101-point interpolation counts recall 0.00 ... 0.50: 51 of 101 points).
    assert metrics["per_class"]["cat"] == {"ap": pytest.approx(51 / 101), "ap_50": pytest.approx(51 / 101), "ground_truth": 2, "detections": 1}
    assert metrics["per_class"]["dog"] == {"ap": 0.0, "ap_50": 0.0, "ground_truth": 1, "detections": 1}


@pytest.mark.parametrize(
    "voc_name, coco_name",
    [("aeroplane", "airplane"), ("motorbike", "motorcycle"), ("pottedplant", "potted plant"), ("sofa", "couch"),
     ("tvmonitor", "tv"), ("DiningTable", "dining table")],
)
def test_voc_names_that_coco_spells_differently_are_mapped(tmp_path, capsys, voc_name, coco_name):
    """One VOC object of the class, found exactly by a detection of COCO's class of that name (its id
    in torchvision's COCO categories): a perfect score for that class, nothing left out."""
    label = get_model_weights(MODEL).DEFAULT.meta["categories"].index(coco_name)
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "one.xml").write_text(voc_xml("one.jpg", [(voc_name, (1, 1, 100, 100), False)]))
    results = write_results(tmp_path / "results", [ok_row(tmp_path / "one.jpg", [(label, coco_name, 0.9, [0, 0, 100, 100])])])
    metrics = evaluate.evaluate(results, str(truth))
    assert metrics["per_class"] == {coco_name: {"ap": 1.0, "ap_50": 1.0, "ground_truth": 1, "detections": 1}}
    assert (metrics["map"], metrics["unmapped_classes"]) == (1.0, {})
    assert capsys.readouterr().err == ""


def test_coco_ground_truth_and_export_round_trip(tmp_path):
    # The results, exported as COCO, are perfect ground truth for themselves.
    rows = [ok_row(tmp_path / "in" / "one.jpg", [(*CAT, 0.9, [0, 0, 100, 100]), (*DOG, 0.6, [50, 20, 190, 140])]),
            ok_row(tmp_path / "in" / "two.jpg", [(*DOG, 0.7, [10, 10, 60, 80])])]
    results = write_results(tmp_path / "results", rows)
    export.main([results, "--format", "coco", "--out", str(tmp_path / "truth.json")])
    metrics = evaluate.evaluate(results, str(tmp_path / "truth.json"))
    assert (metrics["images"], metrics["map"], metrics["map_50"]) == (2, 1.0, 1.0)
    assert metrics["per_class"]["dog"]["ground_truth"] == 2

    # Hand-written COCO ground truth with its own ids, matched by file stem and by category name.
    truth = {
        "images": [{"id": 7, "file_name": "train/one.jpg", "width": 200, "height": 150},
                   {"id": 9, "file_name": "train/two.jpg", "width": 200, "height": 150}],
        "categories": [{"id": 1, "name": "Cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 0, "area": 10000},
            {"id": 2, "image_id": 9, "category_id": 2, "bbox": [30, 10, 50, 70], "iscrowd": 0, "area": 3500},
        ],
    }
    (tmp_path / "hand.json").write_text(json.dumps(truth))
    metrics = evaluate.evaluate(results, str(tmp_path / "hand.json"))
    # dog: the 0.7 box [10, 10, 60, 80] vs [30, 10, 80, 80]: IoU = 30·70 / (2·50·70 − 30·70) = 3/7 < .5,
    # and the 0.6 box on image one is a false positive: AP 0.
    assert metrics["per_class"] == {
        "cat": {"ap": 1.0, "ap_50": 1.0, "ground_truth": 1, "detections": 1},
        "dog": {"ap": 0.0, "ap_50": 0.0, "ground_truth": 1, "detections": 2},
    }
    assert metrics["map"] == 0.5


@pytest.mark.parametrize(
    "truth,message",
    [
        ("missing", "ground truth {tmp}/missing does not exist"),
        ("empty", "ground truth folder {tmp}/empty holds no .xml files"),
        ("other", "no image of {tmp}/results matches one in {tmp}/other by file name (stem)"),
    ],
)
def test_bad_ground_truth_is_one_line(tmp_path, capsys, truth, message):
    results = results_with(tmp_path, [0, 0, 100, 100])
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.xml").write_text(voc_xml("x.jpg", [("cat", (1, 1, 5, 5), False)]))
    with pytest.raises(SystemExit) as exit:
        evaluate.main([results, "--ground-truth", str(tmp_path / truth)])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"ray-detect evaluate: error: {message.format(tmp=tmp_path)}\n"


def test_ground_truth_is_required(tmp_path, capsys):
    results = results_with(tmp_path, [0, 0, 100, 100])
    with pytest.raises(SystemExit) as exit:
        evaluate.main([results])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "ray-detect evaluate: error: the following arguments are required: --ground-truth\n"
