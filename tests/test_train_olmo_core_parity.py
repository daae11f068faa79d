"""Skip-step decisions and LR schedules against OLMo-core 3.0 itself, run in its own venv (benchmarks/peers/
setup_olmo_core.sh; override with OLMO_CORE_VENV): olmo_core/optim/skip_step_optimizer.py
(`SkipStepOptimizer.get_step_factor`) and olmo_core/optim/scheduler.py (`ConstantWithWarmup`,
`LinearWithWarmup`, `CosWithWarmup`, `InvSqrtWithWarmup`, `WSD`). Skips when the venv is absent."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from lmforge.train.config import ScheduleConfig, SkipStepConfig
from lmforge.train.optim import SkipStep
from lmforge.train.schedule import lr_multiplier

OLMO_CORE_VENV = Path(os.environ.get("OLMO_CORE_VENV", Path(__file__).resolve().parents[1] / ".peers" / "olmo-core-venv"))
OLMO_CORE_PYTHON = OLMO_CORE_VENV / "bin" / "python"

pytestmark = pytest.mark.skipif(not OLMO_CORE_PYTHON.exists(), reason=f"OLMo-core peer not installed in {OLMO_CORE_VENV}")


def run_peer(script: str, payload) -> list:
    result = subprocess.run([str(OLMO_CORE_PYTHON), "-c", script], input=json.dumps(payload), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


SKIP_SCRIPT = """
import json, sys, torch
from olmo_core.optim.skip_step_optimizer import SkipStepOptimizer
window, sigma, series = json.load(sys.stdin)
opt = SkipStepOptimizer([torch.zeros(1, requires_grad=True)], {}, rolling_interval_length=window, sigma_factor=sigma)
skipped = []
for loss, grad_norm in series:
    opt.latest_loss = torch.tensor(loss)
    opt.latest_grad_norm = torch.tensor(grad_norm)
    skipped.append(bool(opt.step_skipped.item()))
print(json.dumps(skipped))
"""


def recorded_series() -> list[tuple[float, float]]:
    """A loss curve (decay plus deterministic noise) with spikes before the check starts, at the first checked
    step (the 16th value for a window of 32), and later (twice in a row, and in the grad norm)."""
    series = []
    for i in range(120):
        noise = 0.02 * math.sin(1.7 * i) + 0.01 * math.cos(5.3 * i)
        series.append((2.0 + 0.3 * math.exp(-i / 40) + noise, 1.0 + 0.5 * noise))
    for step, (loss, norm) in ((3, (2.6, 1.0)), (15, (4.0, 1.0)), (40, (4.0, 1.0)), (41, (4.0, 1.0)),
                               (70, (2.1, 3.0))):
        series[step] = (loss, norm)
    return series


def test_skip_step_decisions_match_olmo_core_on_a_recorded_series():
    window, sigma = 32, 3
    series = recorded_series()
    expected = run_peer(SKIP_SCRIPT, [window, sigma, series])
    rule = SkipStep(SkipStepConfig(sigma_factor=sigma, window=window, min_values=window // 2, max_consecutive=100))
    ours = [rule.check(loss, norm) is not None for loss, norm in series]
    assert ours == expected
    assert [i for i, skip in enumerate(expected) if skip] == [15, 40, 41, 70]


SCHEDULE_SCRIPT = """
import json, sys
from olmo_core.optim.scheduler import ConstantWithWarmup, CosWithWarmup, InvSqrtWithWarmup, LinearWithWarmup, WSD
cases = json.load(sys.stdin)
out = []
for name, kw, t, t_max in cases:
    if name == "constant":
        s = ConstantWithWarmup(warmup=kw["warmup"])
    elif name == "linear":
        s = LinearWithWarmup(warmup=kw["warmup"], alpha_f=kw["final_lr_fraction"])
    elif name == "cosine":
        s = CosWithWarmup(warmup=kw["warmup"], alpha_f=kw["final_lr_fraction"])
    elif name == "inv_sqrt":
        s = InvSqrtWithWarmup(warmup=kw["warmup"], alpha_f=kw["final_lr_fraction"])
    else:
        s = WSD(warmup=kw["warmup"], decay=kw["decay"], decay_fraction=None, decay_min_lr=kw["final_lr_fraction"])
    out.append(float(s.get_lr(1.0, t, t_max)))
print(json.dumps(out))
"""

SCHEDULES = [("constant", {"warmup": 10}), ("linear", {"warmup": 10, "final_lr_fraction": 0.1}),
             ("linear", {"warmup": 0, "final_lr_fraction": 0.0}), ("cosine", {"warmup": 10, "final_lr_fraction": 0.1}),
             ("cosine", {"warmup": 25, "final_lr_fraction": 0.0}), ("inv_sqrt", {"warmup": 10, "final_lr_fraction": 0.1}),
             ("inv_sqrt", {"warmup": 40, "final_lr_fraction": 0.25}), ("wsd", {"warmup": 10, "decay": 30, "final_lr_fraction": 0.0}),
             ("wsd", {"warmup": 5, "decay": 50, "final_lr_fraction": 0.1})]
STEPS = [1, 5, 10, 11, 24, 25, 26, 50, 69, 70, 71, 99, 100]  # OLMo-core's WSD goes below its minimum past t_max


def test_every_schedule_matches_olmo_core_at_chosen_steps():
    """lr_multiplier(t) equals OLMo-core's get_lr(1.0, t, t_max) with the same warmup, decay and final value."""
    t_max = 100
    cases = [(name, kw, t, t_max) for name, kw in SCHEDULES for t in STEPS]
    expected = run_peer(SCHEDULE_SCRIPT, cases)
    ours = [lr_multiplier(ScheduleConfig(name=name, **kw), t, t_max) for name, kw, t, _ in cases]
    mismatches = [(c[0], c[1], c[2], a, b) for c, a, b in zip(cases, ours, expected) if abs(a - b) > 1e-12]
    assert not mismatches


def test_default_final_lr_follows_olmo_core():
    """Left unset, the final value is OLMo-core's default: 0.1 of the peak for linear, cosine and inv_sqrt, 0 for
    wsd (WSD.decay_min_lr = 0.0)."""
    assert [ScheduleConfig(name=n).final_fraction() for n in ("linear", "cosine", "inv_sqrt", "wsd", "constant")] == \
        [0.1, 0.1, 0.1, 0.0, 1.0]
