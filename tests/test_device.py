"""The detector's choice of device (app.device): a GPU torch's build has no kernels for, or one on which a
first convolution fails, is a DeviceError naming the GPU, its capability and what the build supports,
or the CPU with inference.cpu_fallback; and the CUDA allocator's default for detector actors.

No GPU exists on the machines these tests are built on, so a GPU is stood in for: Ray's GPU assignment,
torch's view of CUDA (is_available, the device's name and capability, the build's architectures) and the
test convolution are replaced by stand-ins. The Ray path of a DeviceError to exit code 4 runs for real in
test_placement (a node with a GPU resource and no CUDA behind it)."""

import logging
import os

import pytest
import torch

from app import device
from app.detector import Detector
from app.device import DeviceError, build_supports, choose_device, configure_cuda_allocator, supported_capabilities
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


def test_detector_actors_get_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    Detector(SPEC, num_threads=1)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")  # the newer name counts too
    configure_cuda_allocator()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
