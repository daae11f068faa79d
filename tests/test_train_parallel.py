"""Data parallelism on CPU (gloo): FSDP2 and DDP on 2 processes train like 1 process on the same global batch;
gradient accumulation does not change the result; a run resumes on a different number of processes.

Tolerance: rtol 1e-5 on losses and grad norms. The runs differ only in the order of float32 additions (the
gradient is summed over two ranks' halves instead of within one backward), about 1e-7 relative per step,
carried through 8 AdamW steps; a real defect (a wrong normalisation, a rank seeing the wrong rows, an
unsynchronised gradient) moves the loss by 1e-3 or more from the second step on.
"""

import shutil

import pytest
import torch
from train_utils import array_loader_factory, random_tokens, read_metrics, run_multiprocess, tiny_config

from lmforge.core.manifest import read_manifest
from lmforge.model.checkpoints import CHECKPOINTS
from lmforge.train.trainer import Trainer

RTOL = 1e-5
BASE = {"checkpoint.interval": 4, "max_steps": 8}


def train_here(run_dir, **overrides):
    torch.set_num_threads(1)
    Trainer(tiny_config(run_dir, **{**BASE, **overrides}),
            loader_factory=array_loader_factory(random_tokens(), 32)).fit()
    return read_metrics(run_dir)


def column(rows, key):
    return [r[key] for r in rows]


def rewind_to_step_4(src, dst):
    """A copy of a finished run as if it had been stopped right after its step-4 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / CHECKPOINTS / "step00000008")
    rows = read_metrics(dst)
    (dst / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows if r["step"] <= 4))


def test_two_process_fsdp_ddp_hsdp_match_one_process_and_resume_across_world_sizes(tmp_path):
    single = train_here(tmp_path / "single")
    rewind_to_step_4(tmp_path / "single", tmp_path / "single_then_two")
    run_multiprocess(2, [
        (tmp_path / "fsdp", {**BASE, "parallel.data_parallel": "fsdp"}),
        (tmp_path / "ddp", {**BASE, "parallel.data_parallel": "ddp"}),
        (tmp_path / "hsdp", {**BASE, "parallel.data_parallel": "hsdp", "parallel.data.shard": 1}),
        (tmp_path / "single_then_two", {**BASE, "parallel.data_parallel": "fsdp"}),
    ])
    fsdp, ddp, hsdp = (read_metrics(tmp_path / name) for name in ("fsdp", "ddp", "hsdp"))
    # The runs really were 2-process runs (two independent 1-process runs would match `single` trivially).
    for name in ("single", "fsdp", "ddp", "hsdp", "single_then_two"):
        assert read_manifest(tmp_path / name)["counts"]["world_size"] == (1 if name == "single" else 2), name
    assert len(single) == len(fsdp) == len(ddp) == len(hsdp) == 8
    for other in (fsdp, ddp, hsdp):
        assert column(other, "loss") == pytest.approx(column(single, "loss"), rel=RTOL)
        assert column(other, "grad_norm") == pytest.approx(column(single, "grad_norm"), rel=RTOL)
        assert column(other, "tokens") == column(single, "tokens")
    assert single[-1]["loss"] < single[0]["loss"] - 0.3  # it learned something, so equality is not trivial

    # 1 -> 2 processes: resumed from the 1-process step-4 checkpoint, continues like the 1-process run.
    resumed = read_metrics(tmp_path / "single_then_two")
    assert column(resumed, "step") == list(range(1, 9))
    assert column(resumed, "loss") == pytest.approx(column(single, "loss"), rel=RTOL)
    # 2 -> 1 process.
    rewind_to_step_4(tmp_path / "fsdp", tmp_path / "two_then_single")
    resumed = train_here(tmp_path / "two_then_single")
    assert column(resumed, "loss") == pytest.approx(column(single, "loss"), rel=RTOL)


def test_gradient_accumulation_4x1_equals_1x4_with_uneven_masks(tmp_path):
    def run(name, micro):
        torch.set_num_threads(1)
        config = tiny_config(tmp_path / name, **{**BASE, "checkpoint.interval": None, "checkpoint.save_final": False,
                                                 "global_batch_size": 4 * 32, "micro_batch_size": micro * 32})
        trainer = Trainer(config, loader_factory=array_loader_factory(random_tokens(), 32, mask_fraction=0.9))
        shapes = []
        trainer.model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
        trainer.fit()
        # The 4x1 run really accumulates: 4 forwards of 1 row per step (else the equality below is vacuous).
        assert shapes == [(micro, 32)] * (8 * 4 // micro)
        return read_metrics(tmp_path / name)

    one_by_four, four_by_one = run("1x4", 4), run("4x1", 1)
    assert column(four_by_one, "loss") == pytest.approx(column(one_by_four, "loss"), rel=RTOL)
    assert column(four_by_one, "grad_norm") == pytest.approx(column(one_by_four, "grad_norm"), rel=RTOL)


def saved_activation_bytes(model, input_ids, backward=True):
    """(bytes, loss): the bytes of every distinct storage autograd keeps from the forward for the backward,
    parameters excluded. These saved activations are what activation checkpointing trades for recomputation;
    unlike a process's peak RSS on CPU, the count is exact and the same on every run."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    if backward:
        loss.backward()
    return sum(saved.values()), loss.detach()


def test_activation_checkpointing_saves_activations_recomputes_them_and_keeps_gradients():
    """Through the trainer's own `apply_activation_checkpointing`: "full" keeps a small fraction of the
    activations a plain forward keeps for the backward, "selective" (every 2nd of 2 blocks) keeps a part in
    between; the checkpointed blocks run their forward again in the backward; loss and gradients do not change.
    On this model "full" keeps about 1/6 of the plain run's activation bytes and "selective" about 3/5."""
    from train_utils import TINY_MODEL

    from lmforge.model.directory import build_model
    from lmforge.train.config import ModelSpec, ParallelConfig
    from lmforge.train.parallelize import apply_activation_checkpointing

    torch.set_num_threads(1)
    config = ModelSpec(**TINY_MODEL).build_config()
    assert config.n_layers == 2
    input_ids = torch.randint(2, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", "full", "selective"):
        model = build_model(config, seed=0)
        params = dict(model.named_parameters())  # the model's names, before any wrapping
        calls = [0] * len(model.blocks)
        for i, block in enumerate(model.blocks):
            # A pre-hook: the recomputation stops as soon as it has what the backward needs, before any post-hook.
            block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=mode, ac_every=2))
        nbytes, loss = saved_activation_bytes(model, input_ids)
        grads = {name: p.grad for name, p in params.items()}
        missing = [name for name, g in grads.items() if g is None]
        assert not missing, f"{mode}: no gradient for {missing}"
        results[mode] = {"bytes": nbytes, "loss": loss, "grads": grads, "calls": calls,
                         "names": set(model.state_dict())}

    plain, full, selective = results["none"], results["full"], results["selective"]
    assert full["bytes"] < 0.3 * plain["bytes"], f"full AC keeps {full['bytes']} of {plain['bytes']} bytes"
    assert full["bytes"] < selective["bytes"] < 0.8 * plain["bytes"], \
        f"selective AC keeps {selective['bytes']} of {plain['bytes']} bytes (full AC: {full['bytes']})"
    # Recomputation: a checkpointed block starts its forward twice (forward, then again in the backward).
    assert plain["calls"] == [1, 1], "forward starts per block, plain"
    assert full["calls"] == [2, 2], "forward starts per block, full AC"
    assert selective["calls"] == [2, 1], "forward starts per block, selective AC (block 0 checkpointed)"
    for checkpointed in (full, selective):
        assert torch.equal(checkpointed["loss"], plain["loss"])  # recomputation is exact on CPU
        for name, grad in plain["grads"].items():
            torch.testing.assert_close(checkpointed["grads"][name], grad,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
        assert checkpointed["names"] == plain["names"]  # state-dict names are the plain model's


def test_activation_checkpointing_in_the_trainer_changes_nothing_but_memory(tmp_path):
    from lmforge.model.loading import load

    def train(name, **overrides):
        torch.set_num_threads(1)
        trainer = Trainer(tiny_config(tmp_path / name, **{**BASE, "max_steps": 4, "checkpoint.interval": None,
                                                          **overrides}),
                          loader_factory=array_loader_factory(random_tokens(), 32))
        trainer.fit()
        input_ids = torch.from_numpy(random_tokens(64)).view(2, 32)
        return read_metrics(tmp_path / name), saved_activation_bytes(trainer.model, input_ids, backward=False)[0]

    plain, plain_bytes = train("plain")
    for mode in ("full", "selective"):
        rows, nbytes = train(mode, **{"parallel.activation_checkpointing": mode})
        assert column(rows, "loss") == column(plain, "loss")  # recomputation is exact on CPU
        assert nbytes < 0.8 * plain_bytes, f"{mode}: the trainer's model keeps {nbytes} of {plain_bytes} bytes"
    # Checkpoints keep the model's parameter names: the wrapped run's checkpoint loads into a plain model.
    assert set(load(tmp_path / "full").model.state_dict()) == set(load(tmp_path / "plain").model.state_dict())
