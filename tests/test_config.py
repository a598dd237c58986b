"""Every config option and experiment composes; mistakes fail at composition or in check_config,
naming the key, before Ray starts."""

import math
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from app.config import SAMPLES_DIR, ConfigError, check_config
from app.credentials import credential_in
from app.plan import (
    MAX_INPUT_BLOCKS,
    ClusterLimits,
    Resources,
    files_per_block,
    model_batch_size,
    plan_resources,
    rows_per_call,
)
from app.config import compose_config
from tests.support.credential_forms import CREDENTIAL_FORMS, FORM_IDS, SECRET, WITHOUT_CREDENTIALS, refusal

CONF = Path(__file__).parent.parent / "app" / "conf"
GROUPS = ["data", "model", "inference", "tiling", "output"]


def options(group):
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def flat(tree: dict, prefix: str = "") -> dict:
    """Every leaf of a nested dict by its dotted key."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(flat(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def composed(overrides=()) -> dict:
    """The composed config's leaves, resolved (data.path's ${samples_dir:} too)."""
    return flat(OmegaConf.to_container(compose_config(overrides), resolve=True))


HEAVY_SIZES = {"model.min_size": 800, "model.max_size": 1333}
LIGHT = {"model.name": "fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size": 320, "model.max_size": 640}
VOC_ANIMALS_PATH = "s3://anonymous@air-example-data/AnimalDetection/JPEGImages"
# What each option sets: the values of its keys, and every key in which it differs from the default config.
OPTIONS = {
    "data=sample": {"data.path": str(SAMPLES_DIR)},
    "data=voc_animals": {"data.path": VOC_ANIMALS_PATH},
    "model=fasterrcnn_resnet50_fpn_v2": {"model.name": "fasterrcnn_resnet50_fpn_v2", **HEAVY_SIZES},
    "model=fasterrcnn_resnet50_fpn": {"model.name": "fasterrcnn_resnet50_fpn", **HEAVY_SIZES},
    "model=fasterrcnn_mobilenet_v3_large_fpn": {"model.name": "fasterrcnn_mobilenet_v3_large_fpn", **HEAVY_SIZES},
    "model=fasterrcnn_mobilenet_v3_large_320_fpn": LIGHT,
    "inference=auto": {"inference.num_gpus": "auto", "inference.num_actors": "auto"},
    "inference=cpu": {"inference.num_gpus": "0"},
    "inference=gpu": {"inference.num_gpus": "1", "inference.num_cpus_per_actor": "1"},
    "tiling=none": {"tiling.enabled": False},
    "tiling=tiles": {
        "tiling.enabled": True, "tiling.tile_size": 800, "tiling.overlap": 0.2, "tiling.full_image": True, "tiling.merge": "nmm",
        "tiling.match_metric": "ios", "tiling.match_threshold": 0.5, "tiling.class_aware": True,
        "data.max_image_pixels": 250_000_000, "data.max_file_bytes": 256 * 2**20,
    },
    "output=parquet": {"output.path": "results", "output.format": "parquet"},
    "output=delta": {"output.path": "results-delta", "output.format": "delta"},
    "output=iceberg": {"output.path": "results-iceberg", "output.format": "iceberg", "output.catalog": "local",
                       "output.table": "ray_detect.detections"},
    "experiment=local_cpu": {**LIGHT, "inference.num_gpus": "0"},
    "experiment=voc_animals": {
        "data.path": VOC_ANIMALS_PATH, "inference.num_gpus": "1", "inference.num_cpus_per_actor": "1",
        "inference.num_actors": "4", "model.score_threshold": 0.9, "output.path": "results/voc_animals",
    },
}


def test_every_option_and_experiment_is_in_the_table():
    assert sorted(OPTIONS) == sorted(f"{g}={o}" for g in [*GROUPS, "experiment"] for o in options(g))


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_group_option_and_experiment_composes_to_its_values(option):
    check_config(compose_config([option]))
    default, values = composed(), composed([option])
    assert {key: values[key] for key in OPTIONS[option]} == OPTIONS[option]
    changed = {key for key in values if values[key] != default[key]}
    assert changed == {key for key, value in OPTIONS[option].items() if value != default[key]}


def test_defaults_are_the_embedded_demo():
    cfg = compose_config()
    assert cfg.data.path == str(SAMPLES_DIR)
    assert cfg.model.name == "fasterrcnn_resnet50_fpn_v2"
    assert cfg.model.weights == "DEFAULT"
    assert cfg.inference.num_gpus == "auto"
    assert cfg.output.path == "results"


def test_voc_animals_experiment_is_the_tutorial_setup():
    cfg = compose_config(["experiment=voc_animals"])
    assert cfg.data.path == "s3://anonymous@air-example-data/AnimalDetection/JPEGImages"
    assert cfg.inference.num_actors == "4"
    assert cfg.inference.num_gpus == "1"
    assert cfg.inference.batch_size is None
    assert cfg.model.score_threshold == 0.9


def test_public_keys_take_overrides():
    cfg = compose_config(
        [
            "data.path=s3://bucket/images",
            "output.path=/tmp/out",
            "model=fasterrcnn_resnet50_fpn",
            "model.weights=/ckpt/model.pt",
            "model.score_threshold=0.25",
            "inference.batch_size=16",
            "inference.num_gpus=0.5",
            "inference.num_actors=3",
        ]
    )
    assert (cfg.data.path, cfg.output.path, cfg.model.name) == ("s3://bucket/images", "/tmp/out", "fasterrcnn_resnet50_fpn")
    assert (cfg.model.weights, cfg.model.score_threshold) == ("/ckpt/model.pt", 0.25)
    assert (cfg.inference.batch_size, cfg.inference.num_gpus, cfg.inference.num_actors) == (16, "0.5", "3")


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(["inference.batch_sise=4"])
    assert str(caught.value) == "Could not override 'inference.batch_sise'.\nTo append to your config use +inference.batch_sise=4"
    assert str(caught.value.__cause__).splitlines()[:2] == [
        "Key 'batch_sise' not in 'InferenceConfig'", "    full_key: inference.batch_sise"]


def test_ill_typed_value_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(["inference.batch_size=four"])
    assert str(caught.value) == "Error merging override inference.batch_size=four"
    cause = caught.value.__cause__
    assert isinstance(cause, ValidationError)
    assert str(cause).splitlines()[:2] == [
        "Value 'four' of type 'str' could not be converted to Integer", "    full_key: inference.batch_size"]


def test_unknown_model_option_fails():
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(["model=yolo"])
    # Hydra's message goes on with its config search path; its first paragraphs are the news.
    assert str(caught.value).split("\nConfig search path:")[0] == (
        "In 'config': Could not find 'model/yolo'\n\nAvailable options in 'model':\n"
        "\tfasterrcnn_mobilenet_v3_large_320_fpn\n\tfasterrcnn_mobilenet_v3_large_fpn\n"
        "\tfasterrcnn_resnet50_fpn\n\tfasterrcnn_resnet50_fpn_v2"
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("inference.batch_size=0", "inference.batch_size=0 must be at least 1"),
        ("inference.batch_size=-2", "inference.batch_size=-2 must be at least 1"),
        ("model.name=maskrcnn", "model.name='maskrcnn' is not one of fasterrcnn_resnet50_fpn_v2, fasterrcnn_resnet50_fpn, "
                                "fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn"),
        ("inference.num_gpus=some", "inference.num_gpus='some' must be 'auto' or a number"),
        ("inference.num_actors=0", "inference.num_actors='0' must be at least 1"),
        ("model.max_detections=0", "model.max_detections=0 must be at least 1"),
        ("inference.max_actors=0", "inference.max_actors=0 must be at least 1"),
        ("model.score_threshold=1.5", "model.score_threshold=1.5 must be between 0 and 1"),
        ("data.max_error_fraction=2", "data.max_error_fraction=2.0 must be between 0 and 1"),
        ("output.rows_per_file=0", "output.rows_per_file=0 must be at least 1"),
    ],
)
def test_bad_values_fail_in_one_line(override, message):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config([override]))
    assert str(caught.value) == message


@pytest.mark.parametrize("uri, form", CREDENTIAL_FORMS, ids=FORM_IDS)
def test_each_form_of_credentials_in_a_uri_is_refused_without_repeating_it(uri, form):
    """pyarrow would take s3://KEY:SECRET@bucket/...; a run would then record the secret in its settings,
    manifest and log, as it would a presigned URL's signature. Quoted, as a value holding ? and & is."""
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(["data.path=in", "output.path=out", f"model.weights='{uri}'"]))
    assert str(caught.value) == refusal("model.weights", form)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("key", ["data.path", "data.manifest", "output.path", "model.weights", "ray.address", "metrics.run"])
def test_every_setting_is_checked_for_credentials(key):
    """Every string the config holds, not a list of keys: a setting added later is checked too, and the
    refusal comes before any other check that might quote the value."""
    overrides = {"data.path": "in", "output.path": "out", key: CREDENTIAL_FORMS[1][0]}
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config([f"{name}={value}" for name, value in overrides.items()]))
    assert str(caught.value) == refusal(key, "user:password@ in its URI")


def test_a_credential_reaching_the_config_through_an_interpolation_is_refused(monkeypatch):
    """What the run stores is the resolved value (the settings hold data.path resolved)."""
    monkeypatch.setenv("RAY_DETECT_TEST_INPUT", CREDENTIAL_FORMS[0][0])
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(["data.path=${oc.env:RAY_DETECT_TEST_INPUT}", "output.path=out"]))
    assert str(caught.value) == refusal("data.path", "user:password@ in its URI")


@pytest.mark.parametrize("uri", WITHOUT_CREDENTIALS)
def test_uris_without_credentials_pass(uri):
    check_config(compose_config(["data.path=in", "output.path=out", f"model.weights='{uri}'"]))
    assert credential_in(uri) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.path=http://images.example.com/a"], "data.path has the scheme 'http', which is not in data.allowed_schemes "
         "(file, s3, gs, gcs, hdfs, abfs, abfss, az); add it there to read from it"),
        (["data.manifest=HTTPS://lists.example.com/a.csv"], "data.manifest has the scheme 'https', which is not in "
         "data.allowed_schemes (file, s3, gs, gcs, hdfs, abfs, abfss, az); add it there to read from it"),
        (["data.path=/data/images", "data.allowed_schemes=[s3]"], "data.path has the scheme 'file', which is not in "
         "data.allowed_schemes (s3); add it there to read from it"),
    ],
)
def test_an_input_of_a_scheme_not_allowed_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(["output.path=out", *overrides]))
    assert str(caught.value) == message


def test_inputs_of_allowed_schemes_pass():
    assert compose_config().data.allowed_schemes == ["file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az"]
    check_config(compose_config(["data.path=S3://bucket/images", "output.path=out"]))
    check_config(compose_config(["data.path=http://images.example.com/a", "data.allowed_schemes=[file,HTTP]"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.extensions=[jpg,heic]"], "data.extensions: 'heic' is the extension of no image format that Pillow opens"),
        (["data.extensions=[pdf]"], "data.extensions: 'pdf' is the extension of no image format that Pillow opens"),
        (["model.weights=/models/w.pt", "model.checkpoint_sha256=abc"],
         "model.checkpoint_sha256='abc' must be a SHA-256: 64 hexadecimal digits"),
        ([f"model.checkpoint_sha256={'0' * 64}"], "model.checkpoint_sha256 is set but model.weights='DEFAULT' is not a "
         "checkpoint: set model.weights to the checkpoint's path or URI, or unset the digest"),
    ],
    ids=["unknown-extension", "write-only-format", "digest-not-hex", "digest-without-checkpoint"],
)
def test_extensions_and_checkpoint_digest_are_checked(overrides, message):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(overrides))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "overrides,cluster,expected",
    [
        # On CPU a node runs two or more actors with half its CPUs each, at most 4, which take every CPU;
        # decode tasks reserve none then and run one per actor at a time.
        ({}, {"CPU": 1.0}, Resources(0.0, 1, 1.0, decode_cpus=0.0, decode_tasks=1)),
        ({}, {"CPU": 2.0}, Resources(0.0, 2, 1.0, decode_cpus=0.0, decode_tasks=2)),
        ({}, {"CPU": 6.0}, Resources(0.0, 2, 3.0, decode_cpus=0.0, decode_tasks=2)),
        ({}, {"CPU": 16.0}, Resources(0.0, 4, 4.0, decode_cpus=0.0, decode_tasks=4)),
        ({}, {"CPU": 32.0, "GPU": 4.0}, Resources(1.0, 4, 1.0, decode_tasks=28)),
        ({"num_gpus": "0.5"}, {"CPU": 32.0, "GPU": 2.0}, Resources(0.5, 4, 1.0, decode_tasks=28)),
        # A CPU left over on a 9-CPU node: decode tasks reserve it.
        ({"num_gpus": "0"}, {"CPU": 9.0, "GPU": 2.0}, Resources(num_gpus=0.0, num_actors=2, num_cpus_per_actor=4.0)),
        # A given number of actors shares the CPUs.
        ({"num_actors": "1"}, {"CPU": 2.0}, Resources(0.0, 1, 2.0, decode_cpus=0.0, decode_tasks=1)),
        ({"num_actors": "2"}, {"CPU": 9.0}, Resources(num_gpus=0.0, num_actors=2, num_cpus_per_actor=4.0)),
        ({"num_actors": "2"}, {"CPU": 2.0}, Resources(0.0, 2, 1.0, decode_cpus=0.0, decode_tasks=2)),
        ({"num_cpus_per_actor": "3"}, {"CPU": 32.0, "GPU": 1.0}, Resources(1.0, 1, 3.0, decode_tasks=29)),
        ({"num_cpus_per_actor": "4", "num_gpus": "0"}, {"CPU": 10.0}, Resources(num_gpus=0.0, num_actors=2, num_cpus_per_actor=4.0)),
        # A GPU node with one CPU and no other node: the actor takes it, decode tasks must not wait for it.
        ({}, {"CPU": 1.0, "GPU": 1.0}, Resources(1.0, 1, 1.0, decode_cpus=0.0, decode_tasks=1)),
    ],
)
def test_plan_resources_resolves_auto_on_one_node(overrides, cluster, expected):
    cfg = compose_config([f"inference.{key}={value}" for key, value in overrides.items()])
    assert plan_resources(cfg.inference, [cluster]) == expected


def test_plan_resources_fits_cpu_actors_on_nodes():
    cfg = compose_config()
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert plan_resources(cfg.inference, nodes) == Resources(0.0, 6, 1.0, decode_cpus=0.0, decode_tasks=6)
    # A head without CPUs for work (KubeRay's rayStartParams num-cpus: 0) and unequal workers: actors sized
    # by the largest node, as many as fit on each.
    nodes = [{"CPU": 0.0}, {"CPU": 8.0}, {"CPU": 8.0}, {"CPU": 6.0}]
    assert plan_resources(cfg.inference, nodes) == Resources(num_gpus=0.0, num_actors=5, num_cpus_per_actor=4.0)
    # GPU actors take a CPU each; decode tasks may take the CPUs they leave, and no more.
    nodes = [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert plan_resources(cfg.inference, nodes) == Resources(1.0, 4, 1.0, decode_tasks=32)
    # The placement test's cluster: decode tasks keep a CPU each, which only the CPU node has left.
    nodes = [{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert plan_resources(cfg.inference, nodes) == Resources(1.0, 1, 1.0, decode_tasks=2)


def test_plan_resources_leaves_the_input_stage_its_cpu():
    """Streamed inputs are cut into blocks by a task that takes a CPU: CPU actors leave one, GPU actors
    leave the CPUs they leave anyway."""
    cfg = compose_config()
    # Decode tasks then still reserve no CPU, one per actor, so that they never wait for the input stage.
    assert plan_resources(cfg.inference, [{"CPU": 2.0}], input_cpus=1.0) == Resources(0.0, 1, 1.0, decode_cpus=0.0, decode_tasks=1)
    assert plan_resources(cfg.inference, [{"CPU": 8.0}, {"CPU": 8.0}], input_cpus=1.0) == Resources(0.0, 3, 4.0)
    nodes = [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert plan_resources(cfg.inference, nodes) == Resources(1.0, 2, 1.0, decode_tasks=18)
    assert plan_resources(cfg.inference, nodes, input_cpus=1.0) == Resources(1.0, 2, 1.0, decode_tasks=17)


@pytest.mark.parametrize(
    "overrides,nodes,limits,expected",
    [
        # Two actors share each of 2 GPUs: 4 actors of half a GPU and a CPU each; decode tasks take the rest.
        (["inference.actors_per_gpu=2"], [{"CPU": 32.0, "GPU": 2.0}], ClusterLimits(), Resources(0.5, 4, 1.0, decode_tasks=28)),
        # The GPU preset (num_gpus=1) shares its GPU the same way.
        (["inference=gpu", "inference.actors_per_gpu=2"], [{"CPU": 8.0, "GPU": 1.0}], ClusterLimits(),
         Resources(0.5, 2, 1.0, decode_tasks=6)),
        # A third of a GPU: 3 actors per GPU, although 2 // (1/3) is 5.0 in floating point.
        (["inference.actors_per_gpu=3"], [{"CPU": 16.0, "GPU": 2.0}], ClusterLimits(), Resources(1 / 3, 6, 1.0, decode_tasks=10)),
        # An autoscaling cluster with no GPU up yet that may grow to 4: 8 actors wait, asking for 4 GPUs.
        (["inference.actors_per_gpu=2"], [{"CPU": 4.0}], ClusterLimits(max_gpus=4, max_cpus=68),
         Resources(0.5, 8, 1.0, decode_tasks=60)),
        # Without GPUs the setting does nothing.
        (["inference.actors_per_gpu=2"], [{"CPU": 2.0}], ClusterLimits(), Resources(0.0, 2, 1.0, decode_cpus=0.0, decode_tasks=2)),
    ],
    ids=["two-gpus", "gpu-preset", "thirds", "autoscaling", "no-gpu"],
)
def test_actors_per_gpu_share_each_gpu(overrides, nodes, limits, expected):
    cfg = compose_config(overrides)
    check_config(cfg)
    assert plan_resources(cfg.inference, nodes, local=limits == ClusterLimits(), limits=limits) == expected


def test_actors_per_gpu_with_a_share_of_a_gpu_already_set_or_below_one_is_refused():
    cfg = compose_config(["inference.actors_per_gpu=2", "inference.num_gpus=0.5"])
    with pytest.raises(ConfigError) as caught:
        plan_resources(cfg.inference, [{"CPU": 8.0, "GPU": 1.0}])
    assert str(caught.value) == "inference.actors_per_gpu=2 shares whole GPUs: it needs inference.num_gpus=auto or 1, not 0.5"
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(["inference.actors_per_gpu=0"]))
    assert str(caught.value) == "inference.actors_per_gpu=0 must be at least 1"


def test_precision_is_checked_at_composition():
    assert compose_config().inference.precision.value == "fp32"
    assert compose_config(["inference.precision=bf16"]).inference.precision.value == "bf16"
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(["inference.precision=fp8"])
    assert str(caught.value) == "Error merging override inference.precision=fp8"
    assert str(caught.value.__cause__).splitlines()[:2] == [
        "Invalid value 'fp8', expected one of [fp32, fp16, bf16]", "    full_key: inference.precision"]


def test_gpus_requested_on_a_local_ray_without_gpus_fail():
    cfg = compose_config(["inference=gpu"])
    with pytest.raises(ConfigError, match="^inference.num_gpus=1 but the Ray cluster has no GPUs$"):
        plan_resources(cfg.inference, [{"CPU": 8.0}], local=True)


def test_gpus_requested_on_an_attached_cluster_wait_for_its_autoscaler(monkeypatch):
    warnings = []
    monkeypatch.setattr("app.plan.log.warning", lambda message, *args: warnings.append(message % args))
    cfg = compose_config(["inference=gpu"])
    resources = plan_resources(cfg.inference, [{"CPU": 8.0}], local=False)
    assert resources == Resources(1.0, 1, 1.0, decode_tasks=7)
    assert warnings == ["inference.num_gpus=1 but the Ray cluster has no GPUs yet; waiting for its autoscaler to add GPU nodes"]


@pytest.mark.parametrize(
    "files,actors,batch_size,expected",
    [
        (9, 2, 4, 4),  # few images: blocks of a batch, so that both actors get some
        (40, 1, 4, 10),  # four blocks per actor
        (1000, 2, 4, 16),  # many: blocks of FILES_PER_DECODE_BATCH
        (100_000, 8, 4, 200),  # very many: MAX_INPUT_BLOCKS blocks, decoded 16 at a time
        (3, 4, 1, 1),
    ],
)
def test_files_per_block(files, actors, batch_size, expected):
    assert files_per_block(files, actors, batch_size) == expected
    assert math.ceil(files / expected) <= MAX_INPUT_BLOCKS


@pytest.mark.parametrize(
    "overrides,num_gpus,expected",
    [
        ([], 0.0, 1),  # the heavy default model gains nothing from batches on a CPU
        ([], 1.0, 8),
        (["model=fasterrcnn_mobilenet_v3_large_320_fpn"], 0.0, 4),
        (["model=fasterrcnn_mobilenet_v3_large_320_fpn"], 0.5, 32),
        (["model=fasterrcnn_mobilenet_v3_large_fpn"], 1.0, 16),
        (["inference.batch_size=3"], 1.0, 3),  # a given batch size wins
    ],
)
def test_batch_size_defaults_per_model_and_device(overrides, num_gpus, expected):
    cfg = compose_config(overrides)
    assert model_batch_size(cfg.inference, cfg.model, Resources(num_gpus, 1, 1.0)) == expected


@pytest.mark.parametrize(
    "block_rows,batch,listed_files,actors,expected",
    [
        (16, 1, None, 1, 4),  # a one-image batch is full whatever its shape: small calls
        (16, 8, None, 1, 192),  # 6 model batches of each of 4 shapes, in whole blocks
        (16, 8, 1500, 1, 192),
        (16, 8, 240, 1, 48),  # a listed input still gives each actor 4 calls
        (16, 8, 1500, 4, 80),
        (2, 4, 9, 2, 4),  # never less than one model batch
        (5, 4, 40, 2, 5),
        (1024, 8, None, 1, 192),  # streamed blocks are cut into calls
        (200, 32, 100_000, 8, 800),
    ],
)
def test_rows_per_call(block_rows, batch, listed_files, actors, expected):
    assert rows_per_call(block_rows, batch, listed_files, actors) == expected
    assert rows_per_call(block_rows, batch, listed_files, actors, image_bytes=1) == expected  # far under CALL_BYTES
    assert expected % block_rows == 0 or block_rows >= expected


@pytest.mark.parametrize(
    "image_bytes,expected",
    [
        (800 * 1333 * 3, 176),  # 167 images of 3.2 MB in CALL_BYTES, in whole blocks of 16
        (12_000_000 * 3, 14),  # 14 photos of 12 MP, not resized on the CPU: the block is cut into calls
        (200_000_000, 8),  # never less than a model batch
    ],
)
def test_a_call_holds_about_call_bytes_of_decoded_images(image_bytes, expected):
    assert rows_per_call(16, 8, None, 1, image_bytes) == expected


def test_cluster_limits_come_from_the_deployment():
    assert ClusterLimits.from_environment({}) == ClusterLimits(None, None)
    assert ClusterLimits.from_environment({"RAY_DETECT_MAX_GPUS": "8", "RAY_DETECT_MAX_CPUS": " 130 "}) == ClusterLimits(8.0, 130.0)
    for text in ("eight", "-1", "nan"):
        with pytest.raises(ConfigError, match=f"^RAY_DETECT_MAX_GPUS='{text}' \\(set by the deployment\\) must be a number, at least 0$"):
            ClusterLimits.from_environment({"RAY_DETECT_MAX_GPUS": text})


@pytest.mark.parametrize(
    "overrides,limits,expected",
    [
        # No GPU up yet, but the cluster may grow to 4: one GPU actor per GPU it may have, from the start.
        ([], ClusterLimits(max_gpus=4, max_cpus=66), Resources(1.0, 4, 1.0, decode_tasks=62)),
        (["inference=gpu"], ClusterLimits(max_gpus=2), Resources(1.0, 2, 1.0, decode_cpus=0.0, decode_tasks=2)),
        # Without the hint: auto stays on the CPUs that are up; inference=gpu gets one GPU actor.
        ([], ClusterLimits(), Resources(0.0, 2, 1.0, decode_cpus=0.0, decode_tasks=2)),
        (["inference=gpu"], ClusterLimits(), Resources(1.0, 1, 1.0, decode_tasks=1)),
        # A maximum caps what the cluster may grow to; a fixed pool size wins over both.
        (["inference.max_actors=3"], ClusterLimits(max_gpus=8, max_cpus=100), Resources(1.0, 3, 1.0, decode_tasks=97)),
        (["inference.max_actors=3", "inference.num_actors=5"], ClusterLimits(max_gpus=8), Resources(1.0, 5, 1.0, decode_cpus=0.0, decode_tasks=5)),
        (["inference.num_actors=3"], ClusterLimits(max_gpus=8, max_cpus=100), Resources(1.0, 3, 1.0, decode_tasks=97)),
        # A CPU run sizes its actors by the CPUs the cluster may grow to.
        (["inference=cpu"], ClusterLimits(max_gpus=8, max_cpus=10), Resources(0.0, 10, 1.0, decode_cpus=0.0, decode_tasks=10)),
    ],
)
def test_plan_on_an_autoscaling_cluster_counts_what_it_may_grow_to(overrides, limits, expected):
    nodes = [{"CPU": 2.0}]  # the head, nothing else up yet
    assert plan_resources(compose_config(overrides).inference, nodes, local=False, limits=limits) == expected


def test_a_local_ray_ignores_the_hint():
    cfg = compose_config()
    assert plan_resources(cfg.inference, [{"CPU": 2.0}], local=True, limits=ClusterLimits(max_gpus=4)) == Resources(
        0.0, 2, 1.0, decode_cpus=0.0, decode_tasks=2)
