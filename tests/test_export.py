"""COCO and Pascal VOC export: pycocotools loads the COCO file and gives the rows back; VOC XML holds
each image's boxes in VOC's pixel convention; error rows are left out and counted."""

import json
import xml.etree.ElementTree as ET

import pytest
from pycocotools.coco import COCO

from app import export
from app.evaluate import parse_voc
from tests.support.results import error_row, ok_row, write_results

CAT = [40.25, 30.5, 160.0, 120.75]


@pytest.fixture
def rows(tmp_path):
    return [
        ok_row(tmp_path / "in" / "a.jpg", [(17, "cat", 0.875, CAT), (1, "person", 0.5, [0, 0, 10, 20])]),
        ok_row(tmp_path / "in" / "sub" / "b.png", [(18, "dog", 0.625, [5, 6, 7, 8])], width=640, height=480),
        ok_row(tmp_path / "in" / "empty.jpg"),
        error_row(tmp_path / "in" / "broken.png", "not_an_image", "not a recognised image format"),
    ]


def test_coco_export_loads_in_pycocotools_and_round_trips(tmp_path, rows, capsys):
    results = write_results(tmp_path / "results", rows)
    export.main([results, "--format", "coco", "--out", str(tmp_path / "out" / "detections.json")])
    captured = capsys.readouterr()
    assert captured.err == "ray-detect export: left out 1 image that could not be read\n"
    assert captured.out == f"ray-detect export: 3 images, 3 detections → {tmp_path / 'out' / 'detections.json'} (coco)\n"

    coco = COCO(str(tmp_path / "out" / "detections.json"))
    images = coco.loadImgs(coco.getImgIds())
    assert [(i["file_name"], i["width"], i["height"]) for i in images] == [
        ("a.jpg", 200, 150), ("empty.jpg", 200, 150), ("sub/b.png", 640, 480)
    ]
    assert [i["path"] for i in images] == [str(tmp_path / "in" / name) for name in ("a.jpg", "empty.jpg", "sub/b.png")]
    # Categories: the model's 80 COCO categories with their COCO ids.
    assert len(coco.getCatIds()) == 80
    assert coco.loadCats([1, 17, 18, 90]) == [
        {"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}
    ]
    # Back from [x, y, w, h] to the rows' [x1, y1, x2, y2], with scores and labels.
    by_file = {image["file_name"]: image["id"] for image in images}
    for file_name, row in [("a.jpg", rows[0]), ("sub/b.png", rows[1]), ("empty.jpg", rows[2])]:
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[by_file[file_name]]))
        assert [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)] == row["boxes"]
        assert [a["score"] for a in annotations] == row["scores"]
        assert [a["category_id"] for a in annotations] == row["labels"]
    cat = coco.loadAnns(coco.getAnnIds(catIds=[17]))[0]
    assert cat["area"] == pytest.approx((160.0 - 40.25) * (120.75 - 30.5))
    # The annotations are also valid COCO detection results for COCOeval.
    detections = coco.loadRes(coco.dataset["annotations"])
    assert len(detections.getAnnIds()) == 3


def test_categories_of_a_checkpoint_come_from_the_rows(tmp_path):
    rows = [ok_row(tmp_path / "a.jpg", [(2, "scratch", 0.9, [0, 0, 5, 5]), (1, "dent", 0.8, [1, 1, 4, 4])]),
            ok_row(tmp_path / "b.jpg", [(2, "scratch", 0.7, [0, 0, 5, 5])])]
    results = write_results(tmp_path / "results", rows, weights="s3://models/cars.pt")
    export.main([results, "--format", "coco", "--out", str(tmp_path / "d.json")])
    document = json.loads((tmp_path / "d.json").read_text())
    assert document["categories"] == [{"id": 1, "name": "dent"}, {"id": 2, "name": "scratch"}]
    assert document["info"]["weights"] == "s3://models/cars.pt"


def test_voc_export_writes_one_xml_per_image(tmp_path, rows, capsys):
    results = write_results(tmp_path / "results", rows)
    export.main([results, "--format", "voc", "--out", str(tmp_path / "voc")])
    assert capsys.readouterr().err == "ray-detect export: left out 1 image that could not be read\n"
    assert sorted(p.name for p in (tmp_path / "voc").iterdir()) == ["a.xml", "b.xml", "empty.xml"]

    root = ET.parse(tmp_path / "voc" / "a.xml").getroot()
    assert root.findtext("filename") == "a.jpg" and root.findtext("path") == str(tmp_path / "in" / "a.jpg")
    assert [root.findtext(f"size/{key}") for key in ("width", "height", "depth")] == ["200", "150", "3"]
    objects = root.findall("object")
    assert [o.findtext("name") for o in objects] == ["cat", "person"]
    assert [o.findtext("score") for o in objects] == ["0.8750", "0.5000"]
    # 1-based inclusive corners: xmin = round(x1) + 1, xmax = round(x2).
    assert [objects[0].findtext(f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")] == ["41", "31", "160", "121"]
    assert ET.parse(tmp_path / "voc" / "empty.xml").getroot().findall("object") == []
    # Read back as ground truth, the boxes are the rows' boxes rounded to whole pixels.
    parsed = parse_voc((tmp_path / "voc" / "a.xml").read_bytes(), "a.xml")
    assert (parsed.stem, parsed.width, parsed.height) == ("a", 200, 150)
    assert [(o.name, o.box) for o in parsed.objects] == [("cat", [40, 30, 160, 121]), ("person", [0, 0, 10, 20])]


def test_voc_names_stay_unique_when_stems_collide(tmp_path):
    rows = [ok_row(tmp_path / "in" / "x" / "a.jpg"), ok_row(tmp_path / "in" / "y" / "a.png"), ok_row(tmp_path / "in" / "c.jpg")]
    results = write_results(tmp_path / "results", rows)
    export.main([results, "--format", "voc", "--out", str(tmp_path / "voc")])
    assert sorted(p.name for p in (tmp_path / "voc").iterdir()) == ["c.xml", "x__a.xml", "y__a.xml"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "yolo", "--out", "x"], "argument --format: invalid choice: 'yolo' (choose from 'coco', 'voc')"),
        (["--out", "x"], "the following arguments are required: --format"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, rows, capsys, args, message):
    results = write_results(tmp_path / "results", rows)
    with pytest.raises(SystemExit) as exit:
        export.main([results, *args])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"ray-detect export: error: {message}\n"


def test_directory_without_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit:
        export.main([str(tmp_path / "empty"), "--format", "voc", "--out", str(tmp_path / "voc")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"ray-detect export: error: {tmp_path / 'empty'} has no _manifest.json: "
        "not the output of a finished `python -m app` run\n"
    )


def test_output_inside_the_results_directory_is_refused(tmp_path, rows, capsys):
    results = write_results(tmp_path / "results", rows)
    with pytest.raises(SystemExit) as exit:
        export.main([results, "--format", "voc", "--out", str(tmp_path / "results" / "voc")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"ray-detect export: error: --out {tmp_path / 'results' / 'voc'} is inside the results directory "
        f"{tmp_path / 'results'}; choose another place\n"
    )
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["_manifest.json", "_settings.json", "_staging", "part-test-0.parquet", "part-test-1.parquet"]
