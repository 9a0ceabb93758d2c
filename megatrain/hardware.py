"""Accelerator peaks (placeholder until the energy branch lands)."""
from dataclasses import dataclass, field


@dataclass
class Accelerator:
    name: str
    peak_tflops: dict = field(default_factory=dict)
    power_w: float = 0.0


TABLE = {"cpu": Accelerator("cpu", {"fp32": 0.1, "bf16": 0.1, "fp16": 0.1}, 15.0)}


def detect_accelerator():
    return TABLE["cpu"]


def peak_flops(accel, precision):
    return accel.peak_tflops[precision] * 1e12
