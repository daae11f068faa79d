"""Energy and carbon of a training run: NVML, RAPL or a stated estimate, turned into kWh and kg CO2eq."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.core.config import ConfigError
from lmforge.core.errors import LmforgeError
from lmforge.train.config import EnergyConfig
from lmforge.train.energy import EnergyMeter, energy_summary


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_estimate_is_watts_times_time_and_says_so():
    clock = Clock()
    meter = EnergyMeter(EnergyConfig(estimate_watts=50.0), torch.device("cpu"), powercap=_no_rapl(), clock=clock)
    clock.now += 36.0
    assert meter.method == "estimate" and meter.joules() == pytest.approx(1800.0)
    assert "estimate: 50 W (energy.estimate_watts)" in meter.detail and "not a measurement" in meter.detail
    # 1800 J = 0.5 Wh; PUE 1.2 -> 0.6 Wh = 6e-4 kWh; at 0.5 kg/kWh -> 3e-4 kg.
    summary = energy_summary(meter.joules(), EnergyConfig(pue=1.2, grid_kg_co2eq_per_kwh=0.5), meter.method,
                             meter.detail)
    assert summary["kwh"] == pytest.approx(6e-4) and summary["kg_co2eq"] == pytest.approx(3e-4)
    assert summary["method"] == "estimate" and summary["pue"] == 1.2


def test_default_estimate_is_ten_watts_per_cpu_thread():
    clock = Clock()
    meter = EnergyMeter(EnergyConfig(), torch.device("cpu"), powercap=_no_rapl(), clock=clock)
    clock.now += 10.0
    assert meter.joules() == pytest.approx(10.0 * 10.0 * torch.get_num_threads())
    assert f"x {torch.get_num_threads()} threads" in meter.detail


def _no_rapl():
    from pathlib import Path

    return Path("/nonexistent/powercap")


def _zone(root, name, energy, wrap):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    return zone / "energy_uj"


def test_rapl_sums_packages_and_survives_a_wrap(tmp_path):
    package0 = _zone(tmp_path, "intel-rapl:0", 1_000, 10_000)
    package1 = _zone(tmp_path, "intel-rapl:1", 50, 1_000_000)
    sub_zone = _zone(tmp_path, "intel-rapl:0:0", 0, 10_000)  # the cores inside package 0: not counted twice
    meter = EnergyMeter(EnergyConfig(), torch.device("cpu"), powercap=tmp_path)
    assert meter.method == "rapl" and "intel-rapl:0, intel-rapl:1" in meter.detail
    package0.write_text("9000\n")
    package1.write_text("2050\n")
    sub_zone.write_text("5000\n")
    assert meter.joules() == pytest.approx((8_000 + 2_000) / 1e6)
    package0.write_text("500\n")  # wrapped at 10,000: 1,000 more to the wrap, then 500
    assert meter.joules() == pytest.approx((8_000 + 1_500 + 2_000) / 1e6)
    other_rank = EnergyMeter(EnergyConfig(), torch.device("cpu"), reads_node_counters=False, powercap=tmp_path)
    assert other_rank.method == "rapl" and other_rank.joules() == 0.0


class FakeNvml:
    """nvidia-ml-py's calls the meter makes; energy in millijoules."""

    def __init__(self):
        self.millijoules = 5_000_000

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self.millijoules


def test_nvml_reads_the_gpu_energy_counter():
    nvml = FakeNvml()
    meter = EnergyMeter(EnergyConfig(), torch.device("cuda", 0), nvml=nvml)
    assert meter.method == "nvml" and "NVML" in meter.detail
    nvml.millijoules += 3_600_000  # 3.6 kJ = 1 Wh
    assert energy_summary(meter.joules(), EnergyConfig(), meter.method, meter.detail)["kwh"] == pytest.approx(1e-3)


def test_gpu_without_nvml_falls_back_to_a_labelled_estimate():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    meter = EnergyMeter(EnergyConfig(), torch.device("cuda", 0), nvml=Broken())
    assert meter.method == "estimate" and "400 W (default for one GPU)" in meter.detail
    with pytest.raises(LmforgeError, match="energy.method=nvml: NVML Shared Library Not Found"):
        EnergyMeter(EnergyConfig(method="nvml"), torch.device("cuda", 0), nvml=Broken())


def test_forced_methods_that_cannot_apply_are_refused(tmp_path):
    with pytest.raises(LmforgeError, match="no readable RAPL counter"):
        EnergyMeter(EnergyConfig(method="rapl"), torch.device("cpu"), powercap=tmp_path)
    with pytest.raises(LmforgeError, match="does not apply to a cpu run"):
        EnergyMeter(EnergyConfig(method="nvml"), torch.device("cpu"))
    for field, bad in (("pue", 0.9), ("grid_kg_co2eq_per_kwh", -1.0), ("estimate_watts", 0.0)):
        with pytest.raises(ConfigError, match=field):
            EnergyConfig(**{field: bad})


def test_training_run_records_energy(tmp_path):
    """A real run: every metrics row carries the energy so far, the manifest the total with its method; a
    resumed run adds to what its checkpoint recorded."""
    from train_utils import array_loader_factory, random_tokens, tiny_config

    from lmforge.train.trainer import train

    def run(max_steps):
        config = tiny_config(tmp_path / "run", max_steps=max_steps, **{"energy.estimate_watts": 20.0,
                                                                       "energy.method": "estimate"})
        return train(config, loader_factory=array_loader_factory(random_tokens(), 32))

    first = run(4)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    energies = [r["energy_kwh"] for r in rows]
    assert len(rows) == 4 and energies == sorted(energies) and energies[0] > 0
    assert all(r["co2eq_kg"] == pytest.approx(r["energy_kwh"] * 0.475) for r in rows)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["energy"]["method"] == "estimate" and manifest["energy"]["kwh"] >= energies[-1]
    assert first["energy"]["kwh"] == manifest["energy"]["kwh"]
    meta_path = tmp_path / "run" / "checkpoints" / "step00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["energy_joules"] > 0
    meta_path.write_text(json.dumps({**meta, "energy_joules": 3.6e9}))  # 1,000 kWh before the resume
    second = run(8)  # resumes from step 4's checkpoint and adds to what it recorded
    assert 1000 < second["energy"]["kwh"] < 1000 + 1e-3
