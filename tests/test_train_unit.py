"""Trainer pieces against hand-worked values: schedules, clipping (float64), skip-step, config refusal."""

import math

import pytest
import torch
from train_utils import array_loader_factory, random_tokens, tiny_config

from lmforge.core.errors import LmforgeError
from lmforge.train.config import OptimizerConfig, ScheduleConfig, SkipStepConfig
from lmforge.train.optim import SkipStep, clip_grad_norm, parameter_groups
from lmforge.train.schedule import lr_multiplier


@pytest.mark.parametrize("name, kw, t, duration, expected", [
    ("cosine", dict(warmup=10, final_lr_fraction=0.1), 5, 110, 0.5),
    ("cosine", dict(warmup=10, final_lr_fraction=0.1), 10, 110, 1.0),
    ("cosine", dict(warmup=10, final_lr_fraction=0.1), 60, 110, 0.1 + 0.9 * 0.5),  # halfway: cos(pi/2) = 0
    ("cosine", dict(warmup=10, final_lr_fraction=0.1), 35, 110, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", dict(warmup=10, final_lr_fraction=0.1), 110, 110, 0.1),
    ("cosine", dict(warmup=10, final_lr_fraction=0.1), 500, 110, 0.1),
    ("linear", dict(warmup=100, final_lr_fraction=0.1), 600, 1100, 0.55),
    ("linear", dict(warmup=0, final_lr_fraction=0.0), 750, 1000, 0.25),  # annealing: linear to zero
    ("linear", dict(warmup=0, final_lr_fraction=0.0, duration=500), 250, 1000, 0.5),
    ("inv_sqrt", dict(warmup=100), 50, 0, 0.5),
    ("inv_sqrt", dict(warmup=100, final_lr_fraction=0.0), 400, 0, 0.5),
    ("inv_sqrt", dict(warmup=100, final_lr_fraction=0.0), 10_000, 0, 0.1),
    ("inv_sqrt", dict(warmup=100), 400, 0, 0.1 + 0.9 * 0.5),  # default final fraction 0.1
    ("wsd", dict(warmup=0), 950, 1000, 0.5),  # default: decay to 0 over the last 10%
    ("wsd", dict(warmup=100, decay=200, final_lr_fraction=0.0), 800, 1000, 1.0),
    ("wsd", dict(warmup=100, decay=200, final_lr_fraction=0.0), 900, 1000, 0.5),
    ("wsd", dict(warmup=100, decay=200, final_lr_fraction=0.0), 1000, 1000, 0.0),
    ("wsd", dict(warmup=0, final_lr_fraction=0.1), 950, 1000, 0.55),  # default decay: last 10%
    ("constant", dict(warmup=4), 2, 100, 0.5),
    ("constant", dict(warmup=4), 50, 100, 1.0),
])
def test_schedules_match_hand_computed_values(name, kw, t, duration, expected):
    assert lr_multiplier(ScheduleConfig(name=name, **kw), t, duration) == pytest.approx(expected, abs=1e-12)


def test_schedule_refuses_duration_within_warmup():
    with pytest.raises(LmforgeError, match="longer than the warmup"):
        lr_multiplier(ScheduleConfig(name="cosine", warmup=100), 150, 100)


def test_clipping_matches_float64():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 5), (13,), (3, 4, 2)]]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    grads64 = [p.grad.double().clone() for p in params]
    norm64 = torch.cat([g.flatten() for g in grads64]).norm().item()
    norm = clip_grad_norm(params, max_norm=1.0)
    assert norm.item() == pytest.approx(norm64, rel=1e-6)
    for p, g in zip(params, grads64):
        torch.testing.assert_close(p.grad.double(), g * (1.0 / (norm64 + 1e-6)), rtol=1e-6, atol=1e-9)
    clipped = torch.cat([p.grad.double().flatten() for p in params]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_no_clipping_below_max_norm_and_when_disabled():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])
    assert clip_grad_norm([p], max_norm=1.0).item() == pytest.approx(0.5)
    assert torch.equal(p.grad, torch.tensor([0.3, 0.4, 0.0, 0.0]))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([p], max_norm=1.0, clip=False).item() == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))


def test_parameter_groups_exclude_embeddings_and_optionally_norms():
    from lmforge.model.presets import get_preset
    from lmforge.model.transformer import Transformer

    model = Transformer(get_preset("olmo2-tiny"))
    groups = parameter_groups(model, OptimizerConfig(weight_decay=0.1))
    no_decay = {id(p) for p in groups[1]["params"]}
    assert no_decay == {id(model.embed.weight)}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    groups = parameter_groups(model, OptimizerConfig(decay_norm_and_bias=False))
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.blocks[0].attn_norm.weight) in no_decay and id(model.lm_head.weight) not in no_decay


def test_skip_step_on_nan_and_on_spike():
    rule = SkipStep(SkipStepConfig(sigma_factor=6, window=128, min_values=64, max_consecutive=3))
    losses = [3.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(64)]  # mean 3.0, std ~0.0142
    for loss in losses:
        assert rule.check(loss, 1.0 + (loss - 3.0)) is None
    assert "non-finite" in rule.check(float("nan"), 1.0)
    assert "non-finite" in rule.check(3.0, float("inf"))
    assert rule.check(3.0, 1.0) is None  # a normal step resets the run of skips
    mean = sum(losses + [3.0]) / 65
    std = math.sqrt(sum((x - mean) ** 2 for x in losses + [3.0]) / 64)
    assert rule.check(mean + 5.9 * std, 1.0) is None  # within 6 sigma
    assert "loss" in rule.check(3.5, 1.0)  # a spike far above 6 sigma
    assert "grad norm" in rule.check(3.0, 50.0)


def test_skip_step_inactive_until_min_values_and_stops_after_too_many():
    rule = SkipStep(SkipStepConfig(min_values=10, max_consecutive=2))
    checked = SkipStep(SkipStepConfig(min_values=10))
    for _ in range(8):
        rule.check(1.0, 1.0)
    for _ in range(9):
        checked.check(1.0, 1.0)
    assert rule.check(100.0, 1.0) is None  # 9 values with this one: no statistics yet
    assert checked.check(100.0, 1.0) is not None  # the 10th value is checked (OLMo-core counts the current one)
    rule.check(1.0, 1.0)
    assert rule.check(float("nan"), 1.0) is not None
    with pytest.raises(LmforgeError, match="2 optimizer steps in a row were skipped"):
        rule.check(float("nan"), 1.0)


def test_trainer_skips_update_on_injected_nan_and_spike(tmp_path, monkeypatch):
    from lmforge.train.trainer import Trainer

    torch.set_num_threads(1)
    config = tiny_config(tmp_path, max_steps=6, **{"skip_step.enabled": True, "skip_step.min_values": 2,
                                                   "checkpoint.interval": None, "checkpoint.save_final": False})
    trainer = Trainer(config, loader_factory=array_loader_factory(random_tokens(), 32))
    original = trainer.objective.forward_loss
    snapshots = {}

    def injected(model, input_ids, labels, doc_ids):
        ce, z, router = original(model, input_ids, labels, doc_ids)
        if trainer.step == 3:
            ce = ce * float("nan")
        if trainer.step == 5:
            ce = ce * 1000  # loss and gradient spike far beyond 6 sigma
        snapshots.setdefault(trainer.step, [p.detach().clone() for p in trainer.params])
        return ce, z, router

    monkeypatch.setattr(trainer.objective, "forward_loss", injected)
    trainer.fit()
    rows = {r["step"]: r for r in map(__import__("json").loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert [s for s, r in rows.items() if r["skipped"]] == [3, 5]
    # A skipped step leaves the weights as they were: the step after it starts from the same parameters.
    for skipped in (3, 5):
        assert all(torch.equal(a, b) for a, b in zip(snapshots[skipped], snapshots[skipped + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert trainer.optimizer.state[trainer.params[0]]["step"].item() == 4


@pytest.mark.parametrize("overrides, message", [
    ({"global_batch_size": 5 * 32}, "not divisible by micro_batch_size x data-parallel ranks"),
    ({"micro_batch_size": 40}, "multiple of data.sequence_length"),
    ({"data.sequence_length": 128, "micro_batch_size": 128, "global_batch_size": 512}, "longer than the model's context"),
    ({"max_steps": None}, "set max_steps or max_tokens"),
    ({"batch_size_schedule": [[0, 256], [1000, 384]]}, "must be a positive multiple of the first"),
    ({"model.overrides.d_modl": 32}, "unknown model field 'd_modl'"),
    ({"schedule.warmup": 4, "schedule.duration": 3}, "must be longer than the warmup"),
])
def test_bad_configs_are_refused_before_compute(tmp_path, overrides, message):
    from lmforge.train.trainer import Trainer

    def no_loader(*_):
        raise AssertionError("the loader must not be built for a config that cannot run")

    with pytest.raises(LmforgeError, match=message):
        Trainer(tiny_config(tmp_path, **overrides), loader_factory=no_loader)


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)  # tiny ones on 1 rank, recipes on 8
def test_shipped_configs_resolve_and_fit_their_scale(path):
    from lmforge.core.config import load_config
    from lmforge.model.presets import get_preset
    from lmforge.train.config import TrainConfig

    config = load_config(TrainConfig, path, ["data.paths=[tokens]"])
    model = get_preset(config.model.preset) if config.model.vocab_from_tokenizer else config.model.build_config()
    config.check(1 if "tiny" in config.model.preset else 8, model)


def test_fused_ce_and_z_loss_match_float64_reference():
    from lmforge.model.transformer import cross_entropy_loss
    from lmforge.train.objective import IGNORE_INDEX

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = IGNORE_INDEX
    ce, z = cross_entropy_loss(logits, labels, IGNORE_INDEX, 1e-4, reduction="sum")
    lp = torch.log_softmax(logits.double(), -1)
    lse = torch.logsumexp(logits.double(), -1)
    valid = labels != IGNORE_INDEX
    expected_ce = -lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[valid].sum()
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert z.item() == pytest.approx(1e-4 * lse[valid].pow(2).sum().item(), rel=1e-6)


def test_fused_loss_gradient_matches_float64_autograd():
    from lmforge.model.transformer import cross_entropy_loss
    from lmforge.train.objective import IGNORE_INDEX

    torch.manual_seed(1)
    logits = (torch.randn(2, 4, 9) * 3).requires_grad_()
    labels = torch.randint(0, 9, (2, 4))
    labels[1, 3] = IGNORE_INDEX
    ce, z = cross_entropy_loss(logits, labels, IGNORE_INDEX, 1e-2, reduction="sum")
    (0.7 * ce + 1.3 * z).backward()
    ref = logits.detach().double().requires_grad_()
    valid = labels != IGNORE_INDEX
    lse = torch.logsumexp(ref, -1)
    ce64 = (lse - ref.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1))[valid].sum()
    (0.7 * ce64 + 1.3 * 1e-2 * lse[valid].pow(2).sum()).backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


def test_batch_size_warmup_doubles_on_token_schedule_and_lr_in_tokens(tmp_path):
    from train_utils import read_metrics

    from lmforge.train.trainer import Trainer

    torch.set_num_threads(1)
    config = tiny_config(tmp_path, **{"max_tokens": 1280, "max_steps": None, "global_batch_size": 128,
                                      "batch_size_schedule": [[0, 128], [256, 256], [768, 512]],
                                      "schedule": {"name": "linear", "units": "tokens", "warmup": 256, "final_lr_fraction": 0.0},
                                      "checkpoint.interval": None, "checkpoint.save_final": False})
    trainer = Trainer(config, loader_factory=array_loader_factory(random_tokens(), 32))
    trainer.fit()
    rows = read_metrics(tmp_path)
    # 128, 128 (256 reached), 256, 256 (768 reached), 512 -> 1280 tokens in 5 steps
    assert [r["tokens"] for r in rows] == [128, 256, 512, 768, 1280]
    assert trainer.loader.position == 1280 // 32  # every instance of the order used once, none skipped
    lr = 3e-3
    assert [r["lr"] for r in rows] == pytest.approx([lr * 0.5, lr, lr * (1 - 256 / 1024), lr * (1 - 512 / 1024), 0.0])


def test_in_loop_evaluators_run_every_interval_in_eval_mode(tmp_path):
    from train_utils import read_metrics

    from lmforge.train.trainer import Trainer

    torch.set_num_threads(1)
    calls = []

    def evaluator(model):
        calls.append((model.training, torch.is_grad_enabled()))
        return {"score": float(len(calls))}

    config = tiny_config(tmp_path, **{"max_steps": 5, "eval_interval": 2, "checkpoint.interval": None,
                                      "checkpoint.save_final": False})
    trainer = Trainer(config, loader_factory=array_loader_factory(random_tokens(), 32), evaluators=[evaluator])
    trainer.fit()
    assert calls == [(False, False), (False, False)]
    assert trainer.model.training
    evals = [r for r in read_metrics(tmp_path) if "eval/score" in r]
    assert [(r["step"], r["eval/score"]) for r in evals] == [(2, 1.0), (4, 2.0)]
