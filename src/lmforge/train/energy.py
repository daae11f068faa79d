"""Energy and carbon of a training run, as OLMo and BLOOM report them: kWh and kg CO2eq, with the method.

One meter per process, read at every metrics line (a counter read, no sampling thread):

- `nvml`: the GPU's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules, Volta and
  newer), through the `pynvml` module of `nvidia-ml-py`; each rank reads its own GPU.
- `rapl`: the CPU packages' energy counters under /sys/class/powercap (`intel-rapl:N/energy_uj`, which also
  AMD's driver exposes), when readable. They count the whole package (every process on it) and wrap at
  `max_energy_range_uj`, which the reads at every metrics line catch; one rank per node reads them.
- `estimate`: a stated power times the elapsed time, labelled as an estimate: `energy.estimate_watts`, or
  10 W per CPU thread the process uses, 400 W per GPU.

kWh = joules x PUE / 3.6e6 and kg CO2eq = kWh x grid intensity (`EnergyConfig`). A resumed run adds to the
energy its checkpoint recorded; work a crash lost after the last checkpoint is not counted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from lmforge.core.errors import LmforgeError
from lmforge.train.config import EnergyConfig

POWERCAP = Path("/sys/class/powercap")
WATTS_PER_CPU_THREAD = 10.0
WATTS_PER_GPU = 400.0
JOULES_PER_KWH = 3.6e6


class _Rapl:
    """Package-level RAPL zones (`intel-rapl:N`, not their `intel-rapl:N:M` sub-zones), wrap-aware."""

    def __init__(self, root: Path):
        self.zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            try:
                start = int((zone / "energy_uj").read_text())
                wrap = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            self.zones.append([zone / "energy_uj", wrap, start, 0])  # path, wrap, last value, microjoules so far
        names = ", ".join(z[0].parent.name for z in self.zones)
        self.detail = f"RAPL package counters {names} ({root}), the whole CPU package"

    def joules(self) -> float:
        for zone in self.zones:
            path, wrap, last, total = zone
            value = int(path.read_text())
            zone[3] = total + (value - last if value >= last else value + wrap - last)
            zone[2] = value
        return sum(z[3] for z in self.zones) / 1e6


class _Nvml:
    def __init__(self, device: torch.device, nvml):
        nvml.nvmlInit()
        try:  # NVML numbers GPUs physically; torch's helper maps CUDA_VISIBLE_DEVICES to that numbering
            index = torch.cuda._get_nvml_device_index(device)
        except (AttributeError, RuntimeError):
            index = device.index or 0
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.start = nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        self.detail = f"NVML total-energy counter of GPU {index}"

    def joules(self) -> float:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start) / 1e3


class _Estimate:
    def __init__(self, watts: float, why: str, clock: Callable[[], float]):
        self.watts, self.clock, self.start = watts, clock, clock()
        self.detail = f"estimate: {watts:g} W ({why}) x elapsed time, not a measurement"

    def joules(self) -> float:
        return self.watts * (self.clock() - self.start)


def _import_nvml():
    try:
        import pynvml
    except ImportError:
        raise LmforgeError("pynvml is not installed (pip install nvidia-ml-py)") from None
    return pynvml


class _Elsewhere:
    """A rank whose node's counters another rank reads."""

    def __init__(self, detail: str):
        self.detail = detail

    def joules(self) -> float:
        return 0.0


class EnergyMeter:
    """Joules this process accounts for since it started; `method` and `detail` say how they are known."""

    def __init__(self, config: EnergyConfig, device: torch.device, reads_node_counters: bool = True,
                 powercap: Path = POWERCAP, nvml=None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        wanted = config.method
        self.source = None
        if wanted in ("auto", "nvml") and device.type == "cuda":
            self.source = self._try(lambda: _Nvml(device, nvml or _import_nvml()), "nvml", wanted)
        elif wanted in ("auto", "rapl") and device.type == "cpu":
            rapl = _Rapl(powercap)
            if rapl.zones:
                self.source, self.method = rapl if reads_node_counters else _Elsewhere(rapl.detail), "rapl"
            elif wanted == "rapl":
                raise LmforgeError(f"energy.method=rapl but no readable RAPL counter under {powercap}")
        elif wanted in ("nvml", "rapl"):
            raise LmforgeError(f"energy.method={wanted} does not apply to a {device.type} run")
        if self.source is None:
            if config.estimate_watts is not None:
                watts, why = config.estimate_watts, "energy.estimate_watts"
            elif device.type == "cuda":
                watts, why = WATTS_PER_GPU, "default for one GPU"
            else:
                threads = torch.get_num_threads()
                watts, why = WATTS_PER_CPU_THREAD * threads, (f"default {WATTS_PER_CPU_THREAD:g} W per CPU thread "
                                                              f"x {threads} threads")
            self.source, self.method = _Estimate(watts, why, clock), "estimate"
        self.detail = self.source.detail

    def _try(self, make, method: str, wanted: str):
        try:
            source = make()
        except Exception as e:  # no pynvml, no driver, or a GPU without the energy counter
            if wanted == method:
                raise LmforgeError(f"energy.method={method}: {e or type(e).__name__}") from None
            return None
        self.method = method
        return source

    def joules(self) -> float:
        return self.source.joules()


def energy_summary(joules: float, config: EnergyConfig, method: str, detail: str) -> dict:
    """kWh and kg CO2eq of `joules` of device energy, with how they were obtained (metrics, manifest, report)."""
    kwh = joules * config.pue / JOULES_PER_KWH
    return {"kwh": kwh, "kg_co2eq": kwh * config.grid_kg_co2eq_per_kwh, "method": method, "detail": detail,
            "pue": config.pue, "grid_kg_co2eq_per_kwh": config.grid_kg_co2eq_per_kwh}
