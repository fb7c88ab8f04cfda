"""Training on a planted sparse crosslayer dictionary, the schedule and gradient accumulation."""

import math

import pytest
import torch
from _testing import pooled_buffers

from clt.config import validate_config
from clt.data.synthetic import PlantedDictionary
from clt.trainer import (
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    loss_weights,
    lr_factor,
    standardized_batches,
    train_step,
)

PLANTED = {"n_layers": 3, "d_in": 32, "d_out": 32, "n_true_features": 48, "active_per_layer": 3}


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """Hundreds of training steps: run the torch paths, not Triton through the interpreter."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


def planted_config(kind: str, **overrides):
    k = {"k": 4} if kind in ("topk", "batchtopk") else {}
    loss = {"sparsity_coef": 0.5, "sparsity_warmup_steps": 100} if kind == "jumprelu" else {}
    raw = {
        "model": {"n_features": 96},
        "nonlinearity": {"kind": kind, **k},
        "loss": {"dead_tokens": 2048, **loss},
        "data": {"source": "synthetic", "synthetic": PLANTED, "standardize_tokens": 4096},
        "train": {"steps": 300, "batch_tokens": 256, "lr": 1e-2, "warmup_steps": 10,
                  "decay": "constant", "device": "cpu"},
        "logging": {"wandb_mode": "disabled"},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_config(raw)


def train_planted(cfg):
    torch.manual_seed(cfg.train.seed)
    data = PlantedDictionary(**cfg.data.synthetic.model_dump())
    model = build_model(cfg, data.d_in, data.d_out, torch.device("cpu"))
    model.standardizer.fit(iter(lambda: data.next_batch(1024), None), cfg.data.standardize_tokens)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    batches = standardized_batches(model, data, cfg.train.batch_tokens)
    for step in range(cfg.train.steps):
        train_step(model, optimizer, scheduler, batches, loss_weights(cfg), step, cfg.train)
    return model, evaluate(model, data.heldout_batches(4096))


@pytest.mark.slow
def test_planted_dictionary_is_recovered_and_crosslayer_beats_per_layer():
    fvu = {}
    for kind in ("topk", "batchtopk", "jumprelu"):
        _, metrics = train_planted(planted_config(kind))
        fvu[kind] = metrics["eval/fvu"]
        assert (fvu[kind] < 0.3).all(), f"{kind}: held-out FVU per layer {fvu[kind].tolist()}"
    _, plt_metrics = train_planted(planted_config("topk", model={"reach": 1}))
    plt_fvu = plt_metrics["eval/fvu"]
    # targets of later layers mix the features of every earlier layer, which a PLT cannot see
    assert plt_fvu[1:].min() > 0.3 and plt_fvu.mean() > 3 * fvu["topk"].mean(), (
        plt_fvu.tolist(), fvu["topk"].tolist())


def test_lr_schedule_warmup_then_decay():
    cfg = planted_config("topk", train={"steps": 110, "warmup_steps": 10, "decay": "cosine",
                                        "min_lr_ratio": 0.1})
    f = lr_factor(cfg.train)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    linear = lr_factor(planted_config("topk", train={"steps": 20, "warmup_steps": 0,
                                                     "decay": "linear"}).train)
    assert [linear(s) for s in (0, 10, 20)] == pytest.approx([1.0, 0.5, 0.0])


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 64 tokens give the same update as one batch of 128 (no AuxK, so the
    objective is a plain mean over tokens)."""
    results = []
    for accum in (1, 2):
        cfg = planted_config("topk", train={"steps": 3, "batch_tokens": 128, "grad_accum": accum,
                                                "warmup_steps": 0},
                             loss={"auxk_alpha": 0.0})
        torch.manual_seed(0)
        model = build_model(cfg, 32, 32, torch.device("cpu")).double()
        data = PlantedDictionary(**cfg.data.synthetic.model_dump())
        x, y = data.next_batch(128)
        micro = iter([(x.double()[:, i:i + 128 // accum], y.double()[:, i:i + 128 // accum])
                      for i in range(0, 128, 128 // accum)])
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        train_step(model, optimizer, scheduler, micro, loss_weights(cfg), 0, cfg.train)
        results.append(model)
    for (name, a), b in zip(results[0].named_parameters(), results[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=f"parameter {name} differs")


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu"])
def test_recycled_gradients_reuse_memory_and_change_nothing(kind, monkeypatch):
    """``train_step`` donates last step's gradients (``recycle_grads``): from the second step on
    the final ``W_dec`` and ``W_enc`` gradients are donated memory handed out by
    ``kernels.buffers`` (so where two ops produce a ``W_dec`` gradient, JumpReLU's decode and
    decoder norms, autograd accumulated into the recycled one in place instead of adding into a
    fresh tensor), and four steps (AuxK or the JumpReLU penalties running) give bitwise the
    parameters of plain ``zero_grad(set_to_none=True)``."""
    import clt.trainer as trainer_mod
    import kernels

    handed_out: set[int] = set()
    empty = kernels.buffers.empty

    def recording_empty(shape, dtype, device):
        before = pooled_buffers()
        t = empty(shape, dtype, device)
        if pooled_buffers() < before:
            handed_out.add(t.data_ptr())
        return t

    def run(recycle: bool):
        monkeypatch.setattr(kernels.buffers, "empty", recording_empty)
        if not recycle:
            monkeypatch.setattr(trainer_mod, "recycle_grads",
                                lambda model: [setattr(p, "grad", None)
                                               for p in model.parameters()])
        loss = {"dead_tokens": 1}  # every unfired feature counts as dead: AuxK runs
        if kind == "jumprelu":
            loss = {"sparsity_coef": 0.5, "sparsity_warmup_steps": 0, "preact_coef": 1e-3}
        cfg = planted_config(kind, train={"steps": 4, "batch_tokens": 64, "warmup_steps": 0},
                             loss=loss)
        torch.manual_seed(0)
        model = build_model(cfg, 32, 32, torch.device("cpu"))
        data = PlantedDictionary(**cfg.data.synthetic.model_dump())
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        batches = iter(lambda: data.next_batch(64), None)
        for step in range(4):
            handed_out.clear()
            metrics = train_step(model, optimizer, scheduler, batches, loss_weights(cfg), step,
                                 cfg.train)
            assert kind == "jumprelu" or "loss/auxk" in metrics or step == 0  # none dead yet
            if recycle and step > 0:
                assert model.W_dec.grad.data_ptr() in handed_out, "W_dec grad not recycled"
                if kind == "topk":  # one encoder op; BatchTopK's AuxK encoder gradient is a
                    # second W_enc-sized one (a gather's), JumpReLU's the dense GEMM's own
                    assert model.W_enc.grad.data_ptr() in handed_out, "W_enc grad not recycled"
        monkeypatch.undo()
        monkeypatch.setenv("CLT_FORCE_TORCH", "1")
        return model

    recycled, plain = run(True), run(False)
    for (name, a), b in zip(recycled.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), f"parameter {name} differs"
