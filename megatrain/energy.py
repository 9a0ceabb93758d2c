"""Energy meters (placeholder until the energy branch lands)."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class EnergySample:
    joules: float
    power_w: float
    method: str


class EstimateMeter:
    method = "estimate"

    def __init__(self, power_w: float, clock=time.monotonic):
        self.power_w, self.clock = power_w, clock
        self.start = self.last = clock()

    def read(self) -> EnergySample:
        now = self.clock()
        return EnergySample(self.power_w * (now - self.start), self.power_w, self.method)


def make_meter(device: str, local_rank: int, fallback_power_w: float):
    meter = EstimateMeter(fallback_power_w)
    meter.reason = f"estimate: {fallback_power_w:.0f} W per process from the cluster profile"
    return meter
