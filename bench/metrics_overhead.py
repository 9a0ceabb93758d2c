"""Cost of measuring a step: the four StepMetrics marks per step, and one collect() per interval.

    python bench/metrics_overhead.py [--steps 10000] [--device cuda]

On CPU the marks are perf_counter readings; on GPU they record CUDA events (no synchronization),
and collect() synchronizes once. Prints microseconds per step and milliseconds per collect().
"""

from __future__ import annotations

import argparse
import time

import torch

from megatrain.energy import EstimateMeter
from megatrain.metrics import StepMetrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    m = StepMetrics(
        tokens_per_step=1 << 20,
        world_size=1,
        flops_per_token=1e9,
        peak_flops=1e15,
        meter=EstimateMeter(700.0),
        pue=1.2,
        intensity_g_per_kwh=57.0,
        device=device,
        max_steps=args.steps,
        first_step=0,
    )
    loss = torch.zeros((), dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        m.begin_step()
        m.begin_compute()
        m.begin_optimizer()
        m.end_step(loss)
    per_step = (time.perf_counter() - t0) / args.steps
    t0 = time.perf_counter()
    m.collect(args.steps)
    collect_s = time.perf_counter() - t0
    print(
        f"{device.type}: {per_step * 1e6:.2f} us per step (4 marks + loss accumulation), "
        f"collect() over {args.steps} steps {collect_s * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
