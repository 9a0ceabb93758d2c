"""Accelerator table: dense peak TFLOP/s per precision and board power, plus detection.

Inside:
  Accelerator              one row: key, marketing name, dense peaks, TDP, datasheet source
  ACCELERATORS             the table (V100, A100, H100, H200 variants + a rough per-core CPU row)
  match_accelerator(name)  torch/NVML device name -> table row, or None
  cpu_accelerator(n)       the rough CPU row scaled to n cores
  detect_accelerator(i)    this process's device -> row (CPU fallback, "unknown GPU" row otherwise)
  peak_flops(accel, prec)  dense peak in FLOP/s for "fp32" | "tf32" | "fp16" | "bf16"

All GPU numbers are *dense* (NVIDIA datasheets print tensor-core numbers "with sparsity",
i.e. 2x: we halve those). They are peaks at boost clock: MFU against them is the honest
convention (PaLM, Megatron). TDP is the board's maximum power; the energy meters measure
the real draw, TDP only feeds estimates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatrain.schema import ConfigError

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}


@dataclass(frozen=True)
class Accelerator:
    key: str  # stable id used in logs and configs, e.g. "A100-SXM-80GB"
    name: str  # human name (the device name when detected)
    peak_tflops: dict[str, float | None] = field(default_factory=dict)  # dense; None = no such unit
    tdp_w: float | None = None  # board power (max TDP for configurable parts)
    source: str = ""  # where the numbers come from
    rough: bool = False  # True for order-of-magnitude rows (CPU, unknown GPU)
    memory_gb: float | None = None  # device memory in GiB, as the product name says it


def _row(key, name, fp32, tf32, fp16, bf16, tdp_w, memory_gb, source) -> Accelerator:
    peaks = {"fp32": fp32, "tf32": tf32, "fp16": fp16, "bf16": bf16}
    return Accelerator(key, name, peaks, tdp_w, source, memory_gb=memory_gb)


# Sources (dense numbers; "*" in the datasheets marks 2x sparsity numbers, halved here):
_V100 = (
    "NVIDIA V100 Tensor Core GPU datasheet (2020): SXM2 15.7/125 TF, 300 W; PCIe 14/112 TF, 250 W"
)
_V100S = "NVIDIA V100S datasheet: PCIe 16.4 fp32 / 130 tensor TF, 250 W"
_A100 = (
    "NVIDIA A100 datasheet (2021): 19.5 fp32, 156 tf32, 312 bf16/fp16; "
    "SXM 400 W, PCIe 250 W (40GB) / 300 W (80GB)"
)
_H100 = (
    "NVIDIA H100 datasheet: SXM 67 / 989* / 1979*, up to 700 W; "
    "PCIe 51 / 756* / 1513*, 300-350 W; NVL 60 / 835* / 1671*, 350-400 W"
)
_H200 = (
    "NVIDIA H200 datasheet: SXM same compute as H100 SXM, up to 700 W; "
    "NVL 60 / 835* / 1671*, up to 600 W"
)

# Volta has no TF32 and no BF16 units: None. peak_flops("tf32") falls back to fp32 there
# (allow_tf32 on Volta just runs fp32); bf16 raises (use fp16 on V100).
ACCELERATORS: dict[str, Accelerator] = {
    a.key: a
    for a in [
        # key, name, then dense TFLOP/s fp32 tf32 fp16 bf16, TDP (W), memory (GB), source
        _row("V100-SXM2-16GB", "Tesla V100 SXM2 16GB", 15.7, None, 125.0, None, 300, 16, _V100),
        _row("V100-SXM2-32GB", "Tesla V100 SXM2 32GB", 15.7, None, 125.0, None, 300, 32, _V100),
        _row("V100-PCIe", "Tesla V100 PCIe", 14.0, None, 112.0, None, 250, 16, _V100),
        _row("V100S-PCIe", "Tesla V100S PCIe", 16.4, None, 130.0, None, 250, 32, _V100S),
        _row("A100-SXM-40GB", "A100 SXM4 40GB", 19.5, 156.0, 312.0, 312.0, 400, 40, _A100),
        _row("A100-SXM-80GB", "A100 SXM4 80GB", 19.5, 156.0, 312.0, 312.0, 400, 80, _A100),
        _row("A100-PCIe-40GB", "A100 PCIe 40GB", 19.5, 156.0, 312.0, 312.0, 250, 40, _A100),
        _row("A100-PCIe-80GB", "A100 PCIe 80GB", 19.5, 156.0, 312.0, 312.0, 300, 80, _A100),
        _row("H100-SXM", "H100 SXM5 80GB", 67.0, 494.7, 989.4, 989.4, 700, 80, _H100),
        _row("H100-PCIe", "H100 PCIe 80GB", 51.0, 378.0, 756.5, 756.5, 350, 80, _H100),
        _row("H100-NVL", "H100 NVL 94GB", 60.0, 417.5, 835.5, 835.5, 400, 94, _H100),
        _row("H200-SXM", "H200 SXM 141GB", 67.0, 494.7, 989.4, 989.4, 700, 141, _H200),
        _row("H200-NVL", "H200 NVL 141GB", 60.0, 417.5, 835.5, 835.5, 600, 141, _H200),
    ]
}

# Rough CPU row, per core: a core with two 256-bit FMA pipes does 2 x 8 lanes x 2 = 32 fp32
# FLOP/cycle, ~100 GFLOP/s at ~3 GHz (AVX-512 parts peak higher but clock down). No AMX
# assumed, so half precisions run at the fp32 rate. Power: server sockets draw ~4-8 W per core
# at TDP (EPYC 9654: 360 W / 96 cores; Xeon Gold 6248: 150 W / 20 cores); we take 7 W.
CPU_CORE = Accelerator(
    "cpu-core",
    "CPU core (rough)",
    {p: 0.1 for p in PRECISIONS},
    7.0,
    "rough: 32 fp32 FLOP/cycle x ~3 GHz per core; ~7 W per core at socket TDP",
    rough=True,
)

# Ordered: first match wins, so specific variants come before the generic family name.
# Word boundaries keep "GH200" off "H200" and "V100S" off "V100". Matching is case-insensitive
# on names like "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla V100-PCIE-32GB".
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bH200\b.*\bNVL\b", "H200-NVL"),
    (r"\bH200\b", "H200-SXM"),
    (r"\bH100\b.*\bNVL\b", "H100-NVL"),
    (r"\bH100\b.*PCIE", "H100-PCIe"),
    (r"\bH100\b", "H100-SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM5 part
    (r"\bA100\b.*(80GB.*PCIE|PCIE.*80GB)", "A100-PCIe-80GB"),
    (r"\bA100\b.*PCIE", "A100-PCIe-40GB"),
    (r"\bA100\b.*80GB", "A100-SXM-80GB"),
    (r"\bA100\b", "A100-SXM-40GB"),
    (r"\bV100S\b", "V100S-PCIe"),
    (r"\bV100\b.*PCIE", "V100-PCIe"),
    (r"\bV100\b.*32GB", "V100-SXM2-32GB"),  # also catches SXM3/DGXS 32GB (slightly faster parts)
    (r"\bV100\b", "V100-SXM2-16GB"),
]


def match_accelerator(device_name: str) -> Accelerator | None:
    """Table row for a CUDA/NVML device name, or None if the family is not in the table."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return ACCELERATORS[key]
    return None


def cpu_accelerator(n_cores: int) -> Accelerator:
    """The rough CPU row scaled to the cores this process computes on."""
    peaks = {p: v * n_cores for p, v in CPU_CORE.peak_tflops.items()}
    return Accelerator(
        "cpu",
        f"CPU x {n_cores} cores (rough)",
        peaks,
        CPU_CORE.tdp_w * n_cores,
        CPU_CORE.source,
        rough=True,
    )


def detect_accelerator(device_index: int | None = None) -> Accelerator:
    """This process's accelerator: the CUDA device (current one by default) or the CPU.

    A GPU missing from the table comes back as an "unknown-gpu" row with no peaks, so that
    MFU is not reported against a made-up number (peak_flops raises on it).
    """
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device() if device_index is None else device_index
        name = torch.cuda.get_device_name(index)
        return match_accelerator(name) or Accelerator(
            "unknown-gpu", name, {}, None, "not in megatrain.hardware.ACCELERATORS", rough=True
        )
    return cpu_accelerator(torch.get_num_threads())  # intra-op threads ~ cores this process uses


def peak_flops(accel: Accelerator, precision: str) -> float:
    """Dense peak FLOP/s of `accel` in `precision` ("fp32", "tf32", "fp16", "bf16", or a dtype
    name)."""
    p = str(precision).lower().removeprefix("torch.")
    p = _ALIASES.get(p, p)
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    tflops = accel.peak_tflops.get(p)
    if tflops is None and p == "tf32":
        tflops = accel.peak_tflops.get("fp32")  # no TF32 units: "tf32" matmuls run in fp32
    if tflops is None:
        raise ValueError(
            f"{accel.name} has no {p} peak in the table "
            f"({'no such units' if p in accel.peak_tflops else 'unknown device'})"
        )
    return tflops * 1e12


def check_device(
    precision: str,
    device_type: str,
    device_name: str,
    capability: tuple[int, int] | None,
    profile_name: str,
    profile_gpus_per_node: int,
) -> None:
    """Refuse, by name, to train where it would silently go wrong: on the CPU of a GPU cluster
    (a job that asked Slurm for no GPU), or in bf16 on a GPU without bf16 tensor cores (V100:
    attention falls back to its slowest kernel and runs out of memory; there is no peak to
    measure MFU against)."""
    if device_type == "cpu" and profile_gpus_per_node > 0:
        raise ConfigError(
            f"cluster profile '{profile_name}' has {profile_gpus_per_node} GPUs per node but this "
            "process sees none: ask Slurm for them (`--gres=gpu:N`, as slurm/pretrain.sh does), "
            "or set `cluster` to a CPU profile (e.g. cluster=local)"
        )
    if device_type == "cuda" and precision == "bf16" and capability and capability < (8, 0):
        major, minor = capability
        raise ConfigError(
            f"precision=bf16 on {device_name} (compute capability {major}.{minor}, no bf16 "
            "tensor cores): set precision=fp16, which trains with dynamic loss scaling"
        )
