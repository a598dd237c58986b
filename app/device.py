"""The device a detector actor runs on: the GPU Ray gave it when torch can drive that GPU, else a
DeviceError with one line that says why and what to do (or the CPU, when inference.cpu_fallback allows).

"Can drive" is checked three ways before any image: torch sees CUDA (a driver new enough for torch's
CUDA, a device plugin that exposes the GPU), torch's build has kernels for the GPU's compute capability
(torch.cuda.is_available() is true on a GPU that is too old, which then fails at its first convolution
with "no kernel image is available"), and one small convolution runs there.

The driver imports this module for DEVICE_ERROR_MARKER, so torch is imported by the functions that use it:
only the detector actors load it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import ray

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Begins the message of a DeviceError, so that the driver (app.commit) finds it inside Ray's wrapping of the
# actor's error.
DEVICE_ERROR_MARKER = "ray-detect device error:"
NVIDIA_DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"
# What this project's image needs of a GPU node (the Dockerfile: CUDA 13.0, torch from PyPI).
IMAGE_REQUIREMENTS = "compute capability 7.5 or newer (Turing and newer GPUs) and NVIDIA driver R580 or newer"
# The detector's batches come in many shapes, which fragment the CUDA caching allocator's fixed-size
# segments; expandable segments grow in place instead. Set for detector actors, through the variable torch
# reads now (PYTORCH_CUDA_ALLOC_CONF is its deprecated name), unless the user set either.
CUDA_ALLOCATOR_VARIABLE = "PYTORCH_ALLOC_CONF"
DEPRECATED_ALLOCATOR_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
CUDA_ALLOCATOR_DEFAULT = "expandable_segments:True"
# bfloat16 has tensor-core kernels from Ampere (compute capability 8.0) on; older GPUs emulate it, slowly.
BF16_MIN_CAPABILITY = (8, 0)
# What "fp32" means on a GPU: IEEE float32 matrix products and convolutions. CUDA's default for cuDNN
# convolutions is TF32 (10 significant bits), which would make the float32 reference of the precision
# bounds (tests/test_precision.py) a reduced-precision run. Recorded in the output manifest.
FLOAT32_MATH = "ieee"


class DeviceError(Exception):
    """A detector actor holds a GPU that torch cannot use."""


def device_name(device: torch.device) -> str:
    """The device as the summary and the manifest name it: cuda:<GPU model>, or cpu."""
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def nvidia_driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version on this node, when one is loaded."""
    try:
        with open(NVIDIA_DRIVER_VERSION_FILE) as file:
            words = file.readline().split()
    except OSError:
        return None
    return next((word for word in words if word[:1].isdigit() and "." in word), None)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def cuda_failure() -> str:
    """Why torch cannot use CUDA here, in torch's words (its first line)."""
    import torch

    try:
        torch.cuda.init()
    except Exception as error:  # torch raises RuntimeError or AssertionError, depending on the cause
        return first_line(error)
    return "torch.cuda.is_available() is False"


def arch_capability(arch: str) -> tuple[int, int]:
    """The compute capability an entry of torch.cuda.get_arch_list() is built for: sm_86 -> (8, 6),
    sm_100a -> (10, 0), compute_120 -> (12, 0)."""
    digits = arch.split("_", 1)[1].rstrip("af")
    return int(digits[:-1]), int(digits[-1])


def build_supports(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with these CUDA architectures has kernels that run on a GPU of this compute
    capability. A cubin (sm_XY) runs on X.Y and later minor versions of X; an arch-specific cubin
    (sm_XYa) on X.Y alone; PTX (compute_XY) is compiled by the driver for X.Y and anything newer."""
    for arch in arch_list:
        built = arch_capability(arch)
        if arch.startswith("compute_"):
            if capability >= built:
                return True
        elif arch.endswith("a"):
            if capability == built:
                return True
        elif capability[0] == built[0] and capability[1] >= built[1]:
            return True
    return False


def supported_capabilities(arch_list: list[str]) -> str:
    """What a build supports, in words: "compute capability 7.5 and newer (sm_75 sm_80 ...)"."""
    if not arch_list:
        return "no GPU (a build without CUDA kernels)"
    lowest = min(arch_capability(arch) for arch in arch_list)
    return f"compute capability {lowest[0]}.{lowest[1]} and newer ({' '.join(arch_list)})"


def run_test_kernel() -> None:
    """One small convolution on the current GPU, waited for: what the model's first layer does."""
    import torch

    probe = torch.ones(1, 1, 3, 3, device="cuda")
    torch.nn.functional.conv2d(probe, probe)
    torch.cuda.synchronize()


def cuda_problem() -> Optional[str]:
    """Why torch cannot run the detector on the GPUs it sees, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return cuda_failure()
    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if not build_supports(capability, arch_list):
            return (f"{torch.cuda.get_device_name(index)} has compute capability {capability[0]}.{capability[1]}, "
                    f"and this build has kernels for {supported_capabilities(arch_list)}")
    try:
        run_test_kernel()
    except Exception as error:  # RuntimeError, or torch.AcceleratorError where torch has it
        return f"a test convolution failed on {torch.cuda.get_device_name()}: {first_line(error)}"
    return None


def unusable_gpu_message(gpu_ids: list, problem: str) -> str:
    import torch

    node = ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
    driver = nvidia_driver_version()
    return (
        f"{DEVICE_ERROR_MARKER} the detector actor on node {node} holds GPU(s) {', '.join(map(str, gpu_ids))} "
        f"but torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use them: {problem}; "
        f"NVIDIA driver {driver or 'not found'}. Run an image whose torch build supports the node's GPU and "
        f"driver (this project's image needs {IMAGE_REQUIREMENTS}), or set inference.cpu_fallback=true to run "
        f"the detector on the CPU deliberately"
    )


def assigned_gpu_ids() -> list:
    """The GPUs Ray gave this worker (none outside Ray)."""
    return ray.get_gpu_ids() if ray.is_initialized() else []


def configure_cuda_allocator() -> str:
    """Expandable segments for torch's CUDA allocator, unless the user configured it; returns the
    settings the allocator should then hold. Takes effect only if set before this process's allocator
    reads its settings (its first CUDA use), so a detector actor calls it before choose_device, and
    check_cuda_allocator verifies it."""
    configured = os.environ.get(CUDA_ALLOCATOR_VARIABLE) or os.environ.get(DEPRECATED_ALLOCATOR_VARIABLE)
    if configured:
        return configured
    os.environ[CUDA_ALLOCATOR_VARIABLE] = CUDA_ALLOCATOR_DEFAULT
    return CUDA_ALLOCATOR_DEFAULT


def allocator_options(settings: str) -> set[str]:
    """An allocator settings string ("key:value,key:value") as its set of options, spaces removed."""
    return {option.replace(" ", "") for option in settings.split(",") if option.strip()}


def check_cuda_allocator(expected: str) -> bool:
    """Whether torch's allocator holds the expected settings; logs a warning when it does not (its settings
    were read before configure_cuda_allocator, e.g. by code that used CUDA earlier in this process)."""
    import torch

    # torch's only way to read them back is private (in 2.14, the shipped build): a torch without it is not checked.
    read_settings = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if read_settings is None:
        return True
    held = read_settings()
    if allocator_options(expected) <= allocator_options(held):
        return True
    log.warning("the CUDA allocator holds the settings %r, not %r: it read them before the detector set %s (this "
                "process used CUDA earlier); the many batch shapes may fragment device memory", held, expected,
                CUDA_ALLOCATOR_VARIABLE)
    return False


def precision_problem(precision: str, gpu_name: str, capability: tuple[int, int]) -> Optional[str]:
    """Why a GPU cannot run the detector at this precision (a DeviceError's message), or None."""
    if precision == "bf16" and capability < BF16_MIN_CAPABILITY:
        return (f"{DEVICE_ERROR_MARKER} inference.precision=bf16 needs a GPU of compute capability "
                f"{BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]} or newer (Ampere and newer), where bfloat16 has "
                f"tensor-core kernels; {gpu_name} has {capability[0]}.{capability[1]} and would emulate it, slowly. "
                f"Set inference.precision=fp16 (or fp32) for this GPU")
    return None


def set_float32_math(device: torch.device) -> None:
    """IEEE float32 for float32 matrix products and convolutions on a GPU (FLOAT32_MATH), through the
    allow_tf32 flags: torch.set_float32_matmul_precision leaves cuDNN's convolutions (the backbone) in
    TF32, and once torch's newer per-backend fp32_precision settings are set, reading these flags (as
    other code may) raises in torch 2.14."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def set_cudnn_autotune(device: torch.device, enabled: bool) -> None:
    """cuDNN's autotuning (inference.cudnn_benchmark) on a GPU: each new input shape's convolutions are timed
    once with each algorithm and run with the fastest after. Off, cuDNN picks by heuristics."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = enabled


def cap_device_memory(device: torch.device, share: float) -> None:
    """Caps this process's GPU memory at `share` of the GPU's (inference.actors_per_gpu: each actor's
    share), so that the actors sharing a GPU cannot starve each other: torch's allocator then raises its
    out-of-memory error at the cap, which the detector meets by splitting the batch (app.out_of_memory).
    Nothing to cap on the CPU or for a whole GPU."""
    import torch

    if device.type == "cuda" and share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device)
        log.info("GPU memory of this actor capped at %.0f%% of the GPU's (a GPU shared by %s actors)", 100 * share,
                 round(1 / share))


def choose_device(cpu_fallback: bool = False) -> torch.device:
    """CUDA when Ray gave this actor a GPU; the CPU when it gave none. An actor given a GPU that torch
    cannot drive raises DeviceError, unless cpu_fallback allows the CPU (with a warning)."""
    import torch

    gpu_ids = assigned_gpu_ids()
    if not gpu_ids:
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda")
    message = unusable_gpu_message(gpu_ids, problem)
    if not cpu_fallback:
        raise DeviceError(message)
    log.warning("%s; running on the CPU (inference.cpu_fallback=true)", message.removeprefix(DEVICE_ERROR_MARKER).strip())
    return torch.device("cpu")
