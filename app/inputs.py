"""The run's inputs: listed by the driver (small trees), or streamed by Ray tasks (large trees and
manifests, app.listing and app.inventory); and those of them that have no committed row yet."""

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray

from app import inventory, listing, storage, video
from app.config import ConfigError, DataConfig
from app.output import dataset, resume
from app.output.verdicts import storage_refusal
from app.plan import MAX_LISTING_BLOCKS, on_driver_node


@dataclass
class Inputs:
    """The run's inputs: where the images are (`source`), and either their rows, listed by the driver
    before any work (small inputs), or how Ray tasks produce them as the run goes (large trees and
    manifests)."""

    source: storage.Location
    listed: Optional[listing.Listing] = None
    manifest: Optional[inventory.Manifest] = None
    has_videos: bool = False  # the driver listed videos among them

    @property
    def table(self) -> Optional[pa.Table]:
        """The input rows, when the driver listed them all and none is a video: a video's frames are known
        once Ray tasks probe it (app.video), so videos are streamed."""
        complete = self.listed is not None and self.listed.complete and not self.has_videos
        return self.listed.found if complete else None

    def stream(self, data: DataConfig, tasks: int) -> ray.data.Dataset:
        """The input rows as a Ray Dataset, produced by up to `tasks` tasks at a time (needs Ray). Like
        decoding, listing takes no CPU of Ray's accounting, so that it runs beside detector actors that
        hold every CPU."""
        if self.manifest is not None:
            suffixes = listing.image_suffixes(input_extensions(data))
            return self.manifest.dataset(tasks).map_batches(
                inventory.manifest_rows, batch_format="pyarrow", num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=tasks), fn_kwargs=dict(manifest=self.manifest, suffixes=suffixes))
        parts = self.listed.parts
        if not parts:
            return ray.data.from_arrow(self.listed.found)
        listed = ray.data.from_items([{"part": part} for part in parts], override_num_blocks=min(len(parts), MAX_LISTING_BLOCKS))
        listed = listed.map_batches(listing.list_part, batch_format="pyarrow", batch_size=1, num_cpus=0,
                                    compute=ray.data.TaskPoolStrategy(size=tasks), fn_kwargs=dict(tree=self.listed.tree))
        if self.listed.found.num_rows:
            listed = ray.data.from_arrow(self.listed.found).union(listed)
        return listed


def open_inputs(data: DataConfig) -> Inputs:
    """Read data.manifest's head, or list data.path as far as the driver lists (app.listing)."""
    try:
        if data.manifest:
            manifest = inventory.open_manifest(data.manifest, list(data.allowed_schemes))
            return Inputs(manifest.images, manifest=manifest)
        listed = listing.list_inputs(data.path, input_extensions(data))
    except (storage.StorageError, OSError) as error:
        refusal = storage_refusal(error) if not isinstance(error, FileNotFoundError) else None
        raise refusal or ConfigError(str(error)) from None
    if listed.complete and not listed.found.num_rows:
        raise no_images(data)
    videos = listing.named(listed.found, listing.image_suffixes(data.video.extensions)) if data.video.extensions else None
    return Inputs(listed.tree.location, listed=listed, has_videos=bool(videos is not None and pc.any(videos).as_py()))


def input_extensions(data: DataConfig) -> list[str]:
    """The extensions of the files a run reads: images', then videos'."""
    return list(data.extensions) + list(data.video.extensions)


@dataclass(frozen=True)
class StreamedVideos:
    """What probing the videos takes (app.video.expand_videos): the options, the versions of the videos
    output.path has frames of (an object reference), the run's retry budget."""

    options: video.VideoOptions
    versions: Optional[ray.ObjectRef] = None
    budget: Optional[ray.actor.ActorHandle] = None


def streamed_todo(data: DataConfig, inputs: Inputs, index: ray.ObjectRef, tasks: int,
                  videos: Optional[StreamedVideos] = None) -> tuple[ray.data.Dataset, Optional[ray.data.Dataset], ray.actor.ActorHandle]:
    """The inputs without a committed row, streamed: listed (or read from the manifest) by tasks, those
    with a row in `index` (app.output.resume.scan_output's) dropped by tasks too. The images, and with
    `videos` the segments of the videos with frames left (app.video), each an input stream of its own:
    a long video's segments are decoded in parallel, not in blocks of images. Also the tally of every
    input seen (a frame is one)."""
    tally = resume.InputTally.options(scheduling_strategy=on_driver_node()).remote()
    drop = dict(index=index, uri_prefix=inputs.source.uri_prefix, tally=tally)
    stream = inputs.stream(data, tasks)
    video_suffixes = listing.image_suffixes(data.video.extensions)

    def of_kind(is_video: bool) -> ray.data.Dataset:
        return stream.map_batches(listing.of_kind, batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=tasks),
                                  fn_kwargs=dict(suffixes=video_suffixes, is_video=is_video))

    images = of_kind(False) if video_suffixes else stream
    images = images.map_batches(resume.drop_done, batch_format="pyarrow", num_cpus=0,
                                compute=ray.data.TaskPoolStrategy(size=tasks), fn_kwargs=drop)
    if not video_suffixes or videos is None:
        return images, None, tally
    segments = of_kind(True).map_batches(
        video.expand_videos, batch_format="pyarrow", batch_size=1, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs=dict(filesystem=inputs.source.filesystem, uri_prefix=inputs.source.uri_prefix, options=videos.options,
                       index=index, versions=videos.versions, budget=videos.budget),
    ).map_batches(resume.drop_done, batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=tasks), fn_kwargs=drop)
    return images, segments, tally


def streamed_all_done(data: DataConfig, inputs: Inputs, index: ray.ObjectRef, tasks: int,
                      videos: Optional[StreamedVideos] = None) -> Optional[ray.actor.ActorHandle]:
    """Whether every streamed input has a committed row in `index`, found before any detector actor (and
    its GPU) is asked for: the inputs are streamed as streamed_todo streams them until the first one
    without a row, and None is returned then (the run streams them again, through its stages). When the
    stream ends without one, returns its tally (every input seen, and the paths listed twice). Videos are
    probed for it: a rerun reads each video with frames left to find out."""
    images, segments, tally = streamed_todo(data, inputs, index, tasks, videos)
    todo = images.union(segments) if segments is not None else images
    for block in todo.iter_batches(batch_size=None, batch_format="pyarrow"):
        if block.num_rows:
            return None
    return tally


def listed_todo(inputs: Inputs, output: storage.Location) -> tuple[pa.Table, resume.OutputScan]:
    """The listed inputs without a committed row, on the driver; and the counts of the rows committed
    before (the listed inputs that have one, and the error rows output.path holds), read in one pass."""
    committed = dataset.read_committed(output, ["path", "error_kind"])
    table = inputs.table
    paths = pc.binary_join_element_wise(inputs.source.uri_prefix, table["path"], "")
    todo = table.filter(pc.invert(pc.is_in(paths, committed["path"])))
    errors = Counter(committed["error_kind"].drop_null().to_pylist())
    return todo, resume.OutputScan(rows=table.num_rows - todo.num_rows, errors_by_kind=errors)


def no_images(data: DataConfig) -> ConfigError:
    extensions = ", ".join(data.extensions)
    where = f"data.manifest {data.manifest} lists" if data.manifest else f"data.path {data.path} holds"
    return ConfigError(f"{where} no image files (extensions: {extensions})")
