"""Peak table values, device-name matching, peak_flops units and detection (no GPU needed)."""

import pytest
import torch

from megatrain import hardware as hw
from megatrain.hardware import ACCELERATORS, match_accelerator, peak_flops
from megatrain.schema import ConfigError


def test_datasheet_values():
    assert ACCELERATORS["V100-SXM2-32GB"].peak_tflops["fp32"] == 15.7
    assert ACCELERATORS["V100-SXM2-32GB"].peak_tflops["fp16"] == 125.0
    a100 = ACCELERATORS["A100-SXM-80GB"].peak_tflops
    assert (a100["fp32"], a100["tf32"], a100["bf16"], a100["fp16"]) == (19.5, 156.0, 312.0, 312.0)
    h100 = ACCELERATORS["H100-SXM"].peak_tflops
    assert (h100["fp32"], h100["tf32"], h100["bf16"], h100["fp16"]) == (67.0, 494.7, 989.4, 989.4)
    assert ACCELERATORS["H200-SXM"].peak_tflops == h100  # same compute, more/faster memory
    assert ACCELERATORS["H100-SXM"].tdp_w == 700 and ACCELERATORS["A100-SXM-80GB"].tdp_w == 400


def test_table_is_complete_and_dense():
    for accel in ACCELERATORS.values():
        assert set(accel.peak_tflops) == set(hw.PRECISIONS), accel.key
        assert accel.tdp_w and accel.source and not accel.rough
        p = accel.peak_tflops
        if p["tf32"] is not None:  # Ampere/Hopper: dense bf16 = 2 x dense tf32, and > fp32
            assert p["bf16"] == pytest.approx(2 * p["tf32"], rel=2e-3), accel.key
            assert p["fp16"] == p["bf16"] > p["fp32"]
        else:  # Volta: no tf32 / bf16 units
            assert p["bf16"] is None and p["fp16"] > p["fp32"]


@pytest.mark.parametrize(
    "name, key",
    [
        ("Tesla V100-SXM2-16GB", "V100-SXM2-16GB"),
        ("Tesla V100-SXM2-32GB", "V100-SXM2-32GB"),
        ("Tesla V100-PCIE-32GB", "V100-PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S-PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100-SXM-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-PCIe-40GB"),
        ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("H100", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA H200", "H200-SXM"),
        ("NVIDIA H200 NVL", "H200-NVL"),
    ],
)
def test_match_accelerator(name, key):
    assert match_accelerator(name).key == key


@pytest.mark.parametrize(
    "name", ["NVIDIA GH200 480GB", "NVIDIA GeForce RTX 4090", "NVIDIA A800-SXM4-80GB", ""]
)
def test_unknown_names_do_not_match(name):
    assert match_accelerator(name) is None


def test_peak_flops_units_and_aliases():
    h100 = ACCELERATORS["H100-SXM"]
    assert peak_flops(h100, "bf16") == pytest.approx(989.4e12)
    assert (
        peak_flops(h100, "bfloat16") == peak_flops(h100, torch.bfloat16) == peak_flops(h100, "BF16")
    )
    assert peak_flops(h100, "float32") == pytest.approx(67e12)
    with pytest.raises(ValueError, match="unknown precision"):
        peak_flops(h100, "fp8")


def test_volta_tf32_is_fp32_and_bf16_raises():
    v100 = ACCELERATORS["V100-SXM2-16GB"]
    assert peak_flops(v100, "tf32") == peak_flops(v100, "fp32") == pytest.approx(15.7e12)
    with pytest.raises(ValueError, match="no bf16"):
        peak_flops(v100, "bf16")


def test_cpu_row_is_rough_and_scales_with_cores():
    cpu = hw.cpu_accelerator(4)
    assert cpu.rough and cpu.key == "cpu" and "rough" in cpu.name
    assert peak_flops(cpu, "fp32") == pytest.approx(4 * hw.CPU_CORE.peak_tflops["fp32"] * 1e12)
    assert cpu.tdp_w == pytest.approx(4 * hw.CPU_CORE.tdp_w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_detect_accelerator_cpu_fallback():
    accel = hw.detect_accelerator()
    assert accel.key == "cpu" and accel.rough
    assert peak_flops(accel, "fp32") == pytest.approx(torch.get_num_threads() * 0.1e12)


@pytest.mark.parametrize(
    "device_name, key",
    [("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB"), ("NVIDIA Foo 9000", "unknown-gpu")],
)
def test_detect_accelerator_gpu_names(monkeypatch, device_name, key):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: device_name)
    accel = hw.detect_accelerator()
    assert accel.key == key
    if key == "unknown-gpu":  # no made-up peak for MFU
        assert accel.name == device_name and accel.rough
        with pytest.raises(ValueError, match="unknown device"):
            peak_flops(accel, "bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detect_accelerator_real_gpu():
    accel = hw.detect_accelerator()
    assert accel.name  # a table row, or "unknown-gpu" with the device name


def test_a_gpu_profile_without_a_gpu_is_refused():
    """An sbatch without --gres: training on the node's CPU would look like a very slow run."""
    with pytest.raises(ConfigError, match="'jean-zay-h100' has 4 GPUs per node but this process"):
        hw.check_device("bf16", "cpu", "cpu", None, "jean-zay-h100", 4)
    hw.check_device("fp32", "cpu", "cpu", None, "local", 0)


def test_bf16_on_a_gpu_without_bf16_units_is_refused():
    with pytest.raises(ConfigError, match="set precision=fp16"):
        hw.check_device("bf16", "cuda", "Tesla V100-SXM2-32GB", (7, 0), "jean-zay-v100", 4)
    hw.check_device("fp16", "cuda", "Tesla V100-SXM2-32GB", (7, 0), "jean-zay-v100", 4)
    hw.check_device("bf16", "cuda", "NVIDIA A100-SXM4-80GB", (8, 0), "jean-zay-a100", 8)


def test_every_gpu_row_knows_its_memory():
    assert all(a.memory_gb for a in hw.ACCELERATORS.values())
    assert hw.ACCELERATORS["V100-SXM2-32GB"].memory_gb == 32
