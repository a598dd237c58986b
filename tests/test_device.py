"""The detector's choice of device (app.device): a GPU torch's build has no kernels for, or one on which a
first convolution fails, is a DeviceError naming the GPU, its capability and what the build supports,
or the CPU with inference.cpu_fallback; and the CUDA allocator's default for detector actors.

No GPU exists on the machines these tests are built on, so a GPU is stood in for: Ray's GPU assignment,
torch's view of CUDA (is_available, the device's name and capability, the build's architectures) and the
test convolution are replaced by stand-ins. The Ray path of a DeviceError to exit code 4 runs for real in
test_placement (a node with a GPU resource and no CUDA behind it)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from app import device
from app.detector import Detector
from app.device import (FLOAT32_MATH, DeviceError, build_supports, check_cuda_allocator, choose_device,
                        configure_cuda_allocator, precision_problem, set_float32_math, supported_capabilities)
from app.model import ModelSpec

# torch.cuda.get_arch_list() of PyPI's torch 2.14.1 (CUDA 13.0), the image's torch.
TORCH_2_14_CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
SPEC = ModelSpec(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none", score_threshold=0.0, min_size=320, max_size=640)


@pytest.mark.parametrize("capability,supported", [
    ((6, 1), False),  # Pascal
    ((7, 0), False),  # Volta (V100): the CUDA 13 builds dropped it
    ((7, 5), True),  # Turing (T4)
    ((8, 0), True),  # A100
    ((8, 6), True),  # A10, RTX 30xx
    ((8, 9), True),  # L4, L40S: sm_86 kernels run on later minors of 8
    ((9, 0), True),  # H100, H200
    ((10, 0), True),  # B200
    ((10, 3), True),  # B300
    ((11, 0), False),  # no sm_11x kernels and no PTX in this build
    ((12, 0), True),  # RTX 50xx
])
def test_the_images_torch_supports_turing_and_newer(capability, supported):
    assert build_supports(capability, TORCH_2_14_CU130) is supported


def test_ptx_runs_on_newer_gpus_and_arch_specific_kernels_on_their_own():
    assert [build_supports(cc, ["sm_80", "compute_90"]) for cc in [(7, 5), (8, 9), (9, 0), (12, 0)]] == [False, True, True, True]
    assert [build_supports(cc, ["sm_90a"]) for cc in [(9, 0), (9, 1), (10, 0)]] == [True, False, False]
    assert build_supports((9, 0), []) is False


def test_what_a_build_supports_in_words():
    assert supported_capabilities(TORCH_2_14_CU130) == "compute capability 7.5 and newer (sm_75 sm_80 sm_86 sm_90 sm_100 sm_120)"
    assert supported_capabilities(["sm_100a", "sm_90", "compute_120"]) == "compute capability 9.0 and newer (sm_100a sm_90 compute_120)"
    assert supported_capabilities([]) == "no GPU (a build without CUDA kernels)"


@pytest.fixture
def stand_in_gpu(monkeypatch, tmp_path):
    """Ray gave this worker GPU 0, a Tesla V100 to torch (capability 7.0, settable), with torch 2.14.1's
    architectures, on a node whose NVIDIA driver is 580.65.06. Returns the calls of the test convolution
    and a setter for its failure."""
    state = {"capability": (7, 0), "kernel_error": None, "kernel_runs": 0}

    def run_test_kernel():
        state["kernel_runs"] += 1
        if state["kernel_error"]:
            raise state["kernel_error"]

    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    monkeypatch.setattr(device, "NVIDIA_DRIVER_VERSION_FILE", str(driver))
    monkeypatch.setattr(device, "assigned_gpu_ids", lambda: [0])
    monkeypatch.setattr(device, "run_test_kernel", run_test_kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: TORCH_2_14_CU130)
    return state


def expected_message(problem: str) -> str:
    return (
        f"ray-detect device error: the detector actor on node this machine holds GPU(s) 0 but torch "
        f"{torch.__version__} (built for CUDA {torch.version.cuda}) cannot use them: {problem}; NVIDIA driver "
        f"580.65.06. Run an image whose torch build supports the node's GPU and driver (this project's image "
        f"needs compute capability 7.5 or newer (Turing and newer GPUs) and NVIDIA driver R580 or newer), or set "
        f"inference.cpu_fallback=true to run the detector on the CPU deliberately"
    )


V100_PROBLEM = ("Tesla V100-SXM2-16GB has compute capability 7.0, and this build has kernels for compute capability "
                "7.5 and newer (sm_75 sm_80 sm_86 sm_90 sm_100 sm_120)")


def test_a_gpu_too_old_for_the_build_is_a_device_error_before_any_kernel(stand_in_gpu):
    """torch.cuda.is_available() is true on a V100 under a CUDA 13 build; the capability check stops it."""
    with pytest.raises(DeviceError) as caught:
        choose_device()
    assert str(caught.value) == expected_message(V100_PROBLEM)
    assert stand_in_gpu["kernel_runs"] == 0


def test_a_gpu_whose_first_convolution_fails_is_a_device_error(stand_in_gpu):
    stand_in_gpu["capability"] = (8, 0)
    stand_in_gpu["kernel_error"] = RuntimeError(
        "CUDA error: no kernel image is available for execution on the device\n"
        "CUDA kernel errors might be asynchronously reported at some other API call")
    with pytest.raises(DeviceError) as caught:
        choose_device()
    assert str(caught.value) == expected_message(
        "a test convolution failed on Tesla V100-SXM2-16GB: CUDA error: no kernel image is available for execution on the device")
    assert stand_in_gpu["kernel_runs"] == 1


def test_a_supported_gpu_whose_convolution_runs_is_chosen(stand_in_gpu):
    stand_in_gpu["capability"] = (9, 0)
    assert choose_device() == torch.device("cuda")
    assert stand_in_gpu["kernel_runs"] == 1


def test_the_fallback_runs_an_unsupported_gpus_actor_on_the_cpu_with_one_warning(stand_in_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="app.device"):
        assert choose_device(cpu_fallback=True) == torch.device("cpu")
    message = expected_message(V100_PROBLEM).removeprefix("ray-detect device error: ")
    assert [record.getMessage() for record in caplog.records] == [f"{message}; running on the CPU (inference.cpu_fallback=true)"]


def test_a_detector_on_an_unsupported_gpu_stops_before_loading_its_model(stand_in_gpu, monkeypatch):
    loaded = []
    monkeypatch.setattr(Detector, "load_model", lambda self, spec: loaded.append(spec))
    with pytest.raises(DeviceError, match="^ray-detect device error: .* Tesla V100-SXM2-16GB has compute capability 7.0, "):
        Detector(SPEC, num_threads=1)
    assert loaded == []


def test_detector_actors_get_expandable_segments_through_the_current_variable_unless_the_user_configured_the_allocator(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    Detector(SPEC, num_threads=1)
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # the deprecated name, which torch warns of

    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128")
    assert configure_cuda_allocator() == "max_split_size_mb:128"
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:128"

    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")  # the deprecated name counts too
    assert configure_cuda_allocator() == "backend:cudaMallocAsync"
    assert "PYTORCH_ALLOC_CONF" not in os.environ


def test_torch_reads_the_allocator_setting_made_after_its_import_but_before_its_first_use():
    """In a fresh process without either variable, as a detector actor starts: torch imported (app.detector
    imports it), then configure_cuda_allocator, then the allocator's settings as torch holds them."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    script = ("import torch; from app.device import configure_cuda_allocator, check_cuda_allocator; "
              "expected = configure_cuda_allocator(); "
              "print(repr(torch._C._accelerator_getAllocatorSettings()), check_cuda_allocator(expected))")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout == "'expandable_segments:True' True\n"


@pytest.mark.parametrize("held,expected,took_effect", [
    ("expandable_segments:True", "expandable_segments:True", True),
    ("max_split_size_mb:128, expandable_segments:True", "expandable_segments:True", True),
    ("", "expandable_segments:True", False),
    ("expandable_segments:False", "expandable_segments:True", False),
])
def test_an_allocator_that_read_its_settings_before_the_detector_set_them_is_a_warning(monkeypatch, caplog, held, expected, took_effect):
    """torch's view of its allocator settings is stood in: on the CPU they are whatever this test process
    read first."""
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: held)
    with caplog.at_level(logging.WARNING, logger="app.device"):
        assert check_cuda_allocator(expected) is took_effect
    warnings = [] if took_effect else [
        f"the CUDA allocator holds the settings {held!r}, not {expected!r}: it read them before the detector set "
        f"PYTORCH_ALLOC_CONF (this process used CUDA earlier); the many batch shapes may fragment device memory"]
    assert [record.getMessage() for record in caplog.records] == warnings


BF16_ON_T4 = ("ray-detect device error: inference.precision=bf16 needs a GPU of compute capability 8.0 or newer "
              "(Ampere and newer), where bfloat16 has tensor-core kernels; Tesla T4 has 7.5 and would emulate it, slowly. "
              "Set inference.precision=fp16 (or fp32) for this GPU")


@pytest.mark.parametrize("precision,capability,refused", [
    ("bf16", (7, 5), True), ("bf16", (7, 0), True), ("bf16", (8, 0), False), ("bf16", (9, 0), False),
    ("fp16", (7, 5), False), ("fp32", (7, 5), False),
])
def test_bf16_is_refused_below_compute_capability_8(precision, capability, refused):
    problem = precision_problem(precision, "Tesla T4", capability)
    assert problem == (BF16_ON_T4.replace("has 7.5", f"has {capability[0]}.{capability[1]}") if refused else None)


def test_a_bf16_detector_on_a_t4_stops_with_the_reason_before_loading_its_model(stand_in_gpu, monkeypatch):
    stand_in_gpu["capability"] = (7, 5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(device, "check_cuda_allocator", lambda expected: True)
    loaded = []
    monkeypatch.setattr(Detector, "load_model", lambda self, spec: loaded.append(spec))
    with pytest.raises(DeviceError) as caught:
        Detector(SPEC, num_threads=1, precision="bf16")
    assert (str(caught.value), loaded) == (BF16_ON_T4, [])


@pytest.fixture
def tf32_flags():
    """torch's TF32 flags, put back after the test (they are process-wide)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp32_on_a_gpu_is_ieee_float32_without_tf32(tf32_flags):
    """The flags are settable without a GPU; CUDA's default for cuDNN's convolutions is TF32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_float32_math(torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    set_float32_math(torch.device("cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert (torch.get_float32_matmul_precision(), FLOAT32_MATH) == ("highest", "ieee")


class ModelLoaded(Exception):
    """Stops a detector on a stand-in GPU where it would load its model (nothing can run there)."""


@pytest.mark.parametrize("share, capped", [(0.5, [0.5]), (1 / 3, [1 / 3]), (1.0, [])])
def test_an_actor_sharing_its_gpu_caps_its_gpu_memory_at_its_share_before_loading_its_model(stand_in_gpu, monkeypatch,
                                                                                             share, capped):
    """inference.actors_per_gpu=N: the pipeline passes each actor 1/N as device_share; the cap is torch's
    per-process memory fraction, set before the model takes any memory."""
    stand_in_gpu["capability"] = (9, 0)
    monkeypatch.setattr(device, "check_cuda_allocator", lambda expected: True)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, where: calls.append((fraction, where)))

    def load_model(self, spec):
        calls.append("model")
        raise ModelLoaded

    monkeypatch.setattr(Detector, "load_model", load_model)
    with pytest.raises(ModelLoaded):
        Detector(SPEC, num_threads=1, device_share=share)
    assert calls == [*((fraction, torch.device("cuda")) for fraction in capped), "model"]


def test_a_cpu_actor_caps_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *args: calls.append(args))
    device.cap_device_memory(torch.device("cpu"), 0.5)
    assert calls == []
