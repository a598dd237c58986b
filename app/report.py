"""`ray-detect report RESULTS_DIR --out DIR`: a static HTML report of a results directory.

`DIR/index.html` holds the run's counts (images, errors, detections by label), a histogram of detection
scores, a table of the images that could not be read, and a grid of previews: the original images with
their boxes, label names and scores drawn by torchvision, written to `DIR/previews/`. The counts cover
the whole results directory; the options choose which images get a preview and which boxes are drawn.
Results, images and DIR may each be local or behind a URI (`s3://...`).
"""

import functools
import html
import io
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageFont

from app import storage
from app.decode import DecodeOptions
from app.exit_codes import CommandParser
from app.output import reader

PROG = "ray-detect report"
HISTOGRAM_BINS = 10
PREVIEW_DIR = "previews"
# Box colours by label id: distinct, and readable under white label text.
PALETTE = [
    (230, 25, 75), (60, 140, 60), (0, 90, 200), (245, 130, 48), (145, 30, 180),
    (0, 130, 130), (200, 40, 200), (128, 96, 0), (90, 90, 90), (0, 0, 128),
]


# TrueType fonts tried for box labels, by file name (Pillow searches the system's font folders); without
# one, torchvision falls back to Pillow's small built-in font.
LABEL_FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "Helvetica.ttc")


def label_color(label: int) -> tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


@functools.lru_cache(maxsize=1)
def label_font() -> Optional[str]:
    for name in LABEL_FONTS:
        try:
            ImageFont.truetype(name, 12)
        except OSError:
            continue
        return name
    return None


@dataclass(frozen=True)
class Selection:
    """Which images get a preview and which of their boxes are drawn."""

    labels: frozenset = frozenset()  # label names; empty = any
    min_score: float = 0.0
    errors_only: bool = False
    sample: int = 48  # at most this many previews, chosen at random; 0 = all
    seed: int = 0

    @property
    def filters_detections(self) -> bool:
        return bool(self.labels) or self.min_score > 0

    def kept(self, row: dict) -> list[int]:
        """Indices of the row's detections that pass the label and score filters."""
        return [
            i
            for i, (name, score) in enumerate(zip(row["label_names"], row["scores"]))
            if score >= self.min_score and (not self.labels or name in self.labels)
        ]

    def describe(self) -> str:
        if self.errors_only:
            chosen = "images that could not be read"
        elif self.filters_detections:
            what = " or ".join(sorted(self.labels)) if self.labels else "any label"
            chosen = f"images with a detection of {what} scoring at least {self.min_score:g}"
        else:
            chosen = "all images read"
        sample = f"a random sample of at most {self.sample} (seed {self.seed})" if self.sample else "every one"
        return f"{chosen}; {sample}"

    def choose(self, rows: list[dict]) -> list[dict]:
        if self.errors_only:
            chosen = [row for row in rows if row["error_kind"] is not None]
        else:
            chosen = [row for row in rows if row["error_kind"] is None]
            if self.filters_detections:
                chosen = [row for row in chosen if self.kept(row)]
        if self.sample and len(chosen) > self.sample:
            picked = sorted(random.Random(self.seed).sample(range(len(chosen)), self.sample))
            chosen = [chosen[i] for i in picked]
        return chosen


@dataclass
class Preview:
    row: dict
    file: Optional[str] = None  # relative to the report directory; None when there is no image
    boxes: int = 0
    problem: Optional[str] = None


@dataclass
class Stats:
    images: int = 0
    ok: int = 0
    errors: int = 0
    detections: int = 0
    by_label: Counter = field(default_factory=Counter)
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    error_rows: list[dict] = field(default_factory=list)


def compute_stats(rows: list[dict]) -> Stats:
    stats = Stats(images=len(rows))
    for row in rows:
        if row["error_kind"] is not None:
            stats.errors += 1
            stats.error_rows.append(row)
            continue
        stats.ok += 1
        stats.detections += len(row["scores"])
        stats.by_label.update(row["label_names"])
        for score in row["scores"]:
            stats.histogram[min(int(score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return stats


def draw_preview(row: dict, selection: Selection, max_side: int, limits: DecodeOptions) -> tuple[bytes, int]:
    """The row's image, shrunk to max_side, with its kept boxes drawn; JPEG bytes and the box count. The
    image is read under the job's `limits`: it may have changed since.

    The image is shrunk before drawing so that lines and text keep their size on large photos."""
    import torch  # imported here, so that argument errors are reported without loading torch
    from torchvision.utils import draw_bounding_boxes

    image = reader.read_image(row["path"], limits, row.get("frame_time_s"))
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    kept = selection.kept(row)
    font = label_font()
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    if kept:
        boxes = torch.tensor([row["boxes"][i] for i in kept], dtype=torch.float32) * scale
        pixels = draw_bounding_boxes(
            pixels,
            boxes,
            labels=[f"{row['label_names'][i]} {row['scores'][i]:.2f}" for i in kept],
            colors=[label_color(row["labels"][i]) for i in kept],
            width=3,
            font=font,
            font_size=max(14, max(image.size) // 30) if font else None,
            label_colors="white",
            fill_labels=True,
        )
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), len(kept)


def write_previews(
    rows: list[dict], selection: Selection, out: storage.Location, max_side: int, limits: DecodeOptions
) -> list[Preview]:
    folder = out.join(PREVIEW_DIR)
    if out.filesystem.get_file_info(folder).type == pafs.FileType.Directory:
        out.filesystem.delete_dir_contents(folder)  # previews of an earlier report
    out.filesystem.create_dir(folder, recursive=True)
    previews = []
    for number, row in enumerate(rows, start=1):
        preview = Preview(row)
        if row["error_kind"] is not None:
            preview.problem = f"{row['error_kind']}: {row['error']}"
        else:
            name = f"{number:04d}_{reader.file_stem(reader.frame_name(row)).replace(reader.FRAME_TIME, '_t')}.jpg"
            try:
                data, preview.boxes = draw_preview(row, selection, max_side, limits)
            except Exception as error:  # a moved or changed image must not stop the report
                preview.problem = f"no preview: {type(error).__name__}: {error}"
                print(f"{PROG}: {row['path']}: {preview.problem}", file=sys.stderr)
            else:
                reader.write_bytes(out, f"{folder}/{name}", data)
                preview.file = f"{PREVIEW_DIR}/{name}"
        previews.append(preview)
    return previews


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
.meta { color: #555; } .columns { display: flex; gap: 48px; flex-wrap: wrap; }
dl.counts { display: grid; grid-template-columns: auto auto; gap: 2px 16px; margin: 0; }
dl.counts dt { color: #555; } dl.counts dd { margin: 0; font-weight: 600; text-align: right; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; vertical-align: middle; }
th { border-bottom: 1px solid #ccc; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 12px; background: #4a78c2; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #ddd; padding: 6px; background: #fafafa; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.problem { color: #a00; font-size: 12px; overflow-wrap: anywhere; }
"""


def bar(count: int, largest: int, width: int = 200) -> str:
    pixels = round(width * count / largest) if largest else 0
    return f'<span class="bar" style="width:{pixels}px"></span>'


def last_run_items(manifest: dict) -> list[tuple[str, str, str]]:
    """The last run's figures the manifest holds, as (id, term, value) of the report's Last run list: its
    pace, its detector actors, its model batches, and what its devices did and cost (outputs.md's manifest
    keys). Figures the manifest lacks (an older run's, or null on CPUs) are left out."""
    detector = manifest.get("detector_by_last_run") or {}
    batches = manifest.get("model_batches_by_last_run") or {}
    cost = manifest.get("cost_by_last_run") or {}
    figures = [
        ("wall-seconds", "wall time", manifest.get("wall_seconds"), "{:.1f} s"),
        ("images-per-second", "images/s", manifest.get("images_per_second"), "{:.2f}"),
        ("actors", "detector actors", detector.get("actors"), "{}"),
        ("gpus", "GPUs held", detector.get("gpus"), "{:g}"),
        ("mean-batch", "images per model batch", batches.get("mean_images") if batches.get("batches") else None,
         "{:.2f} of " + str(batches.get("batch_size"))),
        ("model-busy", "actors' time in model calls", cost.get("model_busy_share"), "{:.0%}"),
        ("device-busy", "GPUs busy in model calls", cost.get("device_busy_share"), "{:.0%}"),
        ("images-per-gpu-second", "images/s per GPU", cost.get("images_per_gpu_second"), "{:.2f}"),
        ("cost-per-million", "cost per million images", cost.get("per_million_images"), "{:.2f}"),
    ]
    return [(key, term, form.format(value)) for key, term, value, form in figures if value is not None]


def render_html(results: reader.Results, stats: Stats, previews: list[Preview], selection: Selection) -> str:
    e = html.escape
    model = results.manifest.get("model", {})
    lines = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ray-detect report: {e(results.uri)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>ray-detect report</h1>",
        f'<p class="meta">{e(results.uri)} · model {e(str(model.get("name", "?")))} '
        f'(weights {e(str(model.get("weights", "?")))})</p>',
        '<div class="columns"><section><h2>Counts</h2><dl class="counts">',
        f'<dt>images</dt><dd id="images">{stats.images}</dd>',
        f'<dt>read</dt><dd id="ok">{stats.ok}</dd>',
        f'<dt>errors</dt><dd id="errors">{stats.errors}</dd>',
        f'<dt>detections</dt><dd id="detections">{stats.detections}</dd>',
        "</dl></section>",
        '<section><h2>Detections by label</h2><table id="labels"><tr><th>label</th><th>count</th><th></th></tr>',
    ]
    largest = max(stats.by_label.values(), default=0)
    for name, count in sorted(stats.by_label.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f'<tr><td>{e(name)}</td><td class="n">{count}</td><td>{bar(count, largest)}</td></tr>')
    lines.append("</table></section>")
    lines.append('<section><h2>Scores</h2><table id="scores"><tr><th>score</th><th>count</th><th></th></tr>')
    largest = max(stats.histogram)
    for index, count in enumerate(stats.histogram):
        low, high = index / HISTOGRAM_BINS, (index + 1) / HISTOGRAM_BINS
        lines.append(f'<tr><td>{low:.1f}–{high:.1f}</td><td class="n">{count}</td><td>{bar(count, largest)}</td></tr>')
    lines.append("</table></section>")
    last_run = last_run_items(results.manifest)
    if last_run:
        lines.append('<section><h2>Last run</h2><dl class="counts" id="last-run">')
        lines += [f'<dt>{e(term)}</dt><dd id="{key}">{e(value)}</dd>' for key, term, value in last_run]
        lines.append("</dl></section>")
    lines.append("</div>")
    lines.append(f"<h2>Errors ({stats.errors})</h2>")
    if stats.error_rows:
        lines.append('<table id="errors-table"><tr><th>image</th><th>kind</th><th>message</th></tr>')
        for row in stats.error_rows:
            lines.append(f"<tr><td>{e(row['path'])}</td><td>{e(row['error_kind'])}</td><td>{e(row['error'] or '')}</td></tr>")
        lines.append("</table>")
    else:
        lines.append("<p>Every image was read.</p>")
    lines.append(f"<h2>Previews ({len(previews)})</h2><p class=\"meta\">{e(selection.describe())}</p>")
    lines.append('<div class="grid">')
    for preview in previews:
        path = reader.frame_name(preview.row)
        caption = f'<figcaption title="{e(path)}">{e(path.rsplit("/", 1)[-1])}'
        if preview.file:
            caption += f" · {preview.boxes} box{'es' if preview.boxes != 1 else ''}"
            lines.append(
                f'<figure><a href="{e(preview.file)}"><img src="{e(preview.file)}" loading="lazy" alt="{e(path)}"></a>'
                f"{caption}</figcaption></figure>"
            )
        else:
            lines.append(f'<figure>{caption}</figcaption><div class="problem">{e(preview.problem or "")}</div></figure>')
    lines.append("</div></body></html>")
    return "\n".join(lines) + "\n"


def make_report(results_uri: str, out_uri: str, selection: Selection, max_side: int = 800) -> tuple[str, int]:
    """Write DIR/index.html and DIR/previews/; returns the index's URI and the number of previews."""
    results = reader.open_results(results_uri)
    rows = results.rows()
    out = reader.output_location(results, out_uri)
    try:
        out.filesystem.create_dir(out.path, recursive=True)
    except OSError as error:
        raise reader.ResultsError(f"cannot write to --out {out_uri}: {error}") from None
    previews = write_previews(selection.choose(rows), selection, out, max_side, results.image_limits())
    page = render_html(results, compute_stats(rows), previews, selection)
    index = out.join("index.html")
    reader.write_bytes(out, index, page.encode())
    return out.uri(index), len(previews)


def parse_args(argv=None):
    parser = CommandParser(prog=PROG, description="A static HTML report of a results directory, with previews.")
    parser.add_argument("results", metavar="RESULTS_DIR", help="output.path of a `python -m app` run")
    parser.add_argument("--out", required=True, metavar="DIR", help="where index.html and previews/ go")
    parser.add_argument("--label", action="append", default=[], metavar="NAME",
                        help="preview only images with this label, and draw only its boxes (repeatable)")
    parser.add_argument("--min-score", type=float, default=0.0, metavar="S",
                        help="preview only images with a box scoring at least S, and draw only those boxes")
    parser.add_argument("--errors-only", action="store_true", help="list only the images that could not be read")
    parser.add_argument("--sample", type=int, default=48, metavar="N",
                        help="at most N previews, picked at random (default 48; 0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sample (default 0)")
    parser.add_argument("--max-size", type=int, default=800, metavar="PX",
                        help="longer side of a preview in pixels (default 800)")
    args = parser.parse_args(argv)
    if not 0 <= args.min_score <= 1:
        parser.error(f"--min-score {args.min_score:g} must be between 0 and 1")
    if args.sample < 0:
        parser.error(f"--sample {args.sample} must be 0 (all) or more")
    if args.max_size < 16:
        parser.error(f"--max-size {args.max_size} must be at least 16")
    if args.errors_only and (args.label or args.min_score):
        parser.error("--errors-only cannot be combined with --label or --min-score")
    return parser, args


def main(argv=None) -> None:
    parser, args = parse_args(argv)
    selection = Selection(frozenset(args.label), args.min_score, args.errors_only, args.sample, args.seed)
    try:
        index, count = make_report(args.results, args.out, selection, args.max_size)
    except reader.ResultsError as error:
        parser.error(str(error))
    print(f"{PROG}: {count} previews; open {index}")


if __name__ == "__main__":
    from app import cli

    sys.exit(cli.main(["report", *sys.argv[1:]]))
