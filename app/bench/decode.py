"""The benchmark's decode suite (`ray-detect bench decode`): images/s one core decodes to the 800-px model
size, on VOC-sized JPEGs and on 12 MP photos (the app's reduced-scale decoding), and the same images
decoded whole before the resize."""

import logging
import time
from pathlib import Path

import pyarrow as pa
from PIL import Image

from app.bench.harness import model_overrides, write_jpegs
from app.config import compose_config
from app.decode import DecodeOptions, decode_images, model_input_size
from app.listing import input_rows

log = logging.getLogger(__name__)


DECODE_CASES = {"500x375": [(500, 375)], "12 MP": [(4000, 3000)]}


def run(args, base: Path) -> dict:
    """Images/s one core decodes for the 800-px models (read, decode, resize: the app's decode stage),
    on VOC-sized JPEGs and on 12 MP photos; and the same images decoded whole before the resize."""
    cfg = compose_config(model_overrides("fasterrcnn_resnet50_fpn_v2", args))
    options = DecodeOptions(cfg.data.max_file_bytes, cfg.data.max_image_pixels, cfg.model.min_size, cfg.model.max_size)
    filesystem = pa.fs.LocalFileSystem()
    results = {}
    for name, sizes in DECODE_CASES.items():
        count = 40 if sizes[0][0] < 1000 else 8
        paths = write_jpegs(base / f"decode-{name.replace(' ', '')}", count, sizes, seed=args.seed)
        table = input_rows([str(p) for p in paths], [p.stat().st_size for p in paths])
        decode_images(table, filesystem=filesystem, uri_prefix="", options=options)  # warm the page cache
        started = time.perf_counter()
        decode_images(table, filesystem=filesystem, uri_prefix="", options=options)
        rates = {"reduced": round(count / (time.perf_counter() - started), 1)}
        started = time.perf_counter()
        for path in paths:  # the same, decoded whole before the resize
            with Image.open(path) as image:
                size = model_input_size(*image.size, cfg.model.min_size, cfg.model.max_size)
                image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        rates["full"] = round(count / (time.perf_counter() - started), 1)
        results[name] = rates
        log.info("decode %s: %s images/s per core", name, rates)
    return results


def lines(results: dict) -> list[str]:
    return [f"decode {name} JPEGs to 800 px, one core: {rates['reduced']:.1f} images/s "
            f"({rates['full']:.1f} decoding them at full size)" for name, rates in results.items()]
