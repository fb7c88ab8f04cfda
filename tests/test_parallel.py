"""Distributed equivalence on CPU with gloo: a feature-sharded (TP=2) model and data-parallel
(DP=2) replicas must compute what one process computes (forward, every loss term, every
gradient, the optimizer step, dead-feature and BatchTopK statistics), and checkpoints must move
between layouts.

Each test spawns 2 processes once and runs every case inside them; the single-process reference
runs in the test process. fp32 throughout, tolerance 1e-5 (the issue's bar).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _testing import assert_close, newest_checkpoint

import kernels
from clt.checkpoint import load_checkpoint, save_sharded_checkpoint
from clt.losses import LossWeights, compute_losses
from clt.model import CrossLayerTranscoder
from clt.molt import MixtureOfLinearTransforms
from clt.parallel import (
    GradSync,
    Mesh,
    clip_grad_norm,
    merge_tensors,
    mesh_from_group,
    parallelize,
    select_top,
    shard_model_state,
    shard_optimizer_state,
    shard_parameters,
)
from clt.trainer import train_step

L, D_IN, D_OUT, F, N, K = 3, 6, 5, 16, 12, 3
DEAD = [1, 6, 9, 14]  # dead in every layer, on both shards, so AuxK selects across ranks
WEIGHTS = LossWeights(sparsity_coef=0.1, preact_coef=0.05, l0_coef=0.02, auxk_alpha=0.5,
                      auxk_k=3, dead_tokens=100)
CASES = [  # (nonlinearity, reach, extra model kwargs)
    ("topk", None, {}),
    ("topk", 1, {}),
    ("topk", 2, {"rank_by_decoder_norm": True}),
    ("batchtopk", None, {"batchtopk_scope": "layer"}),
    ("batchtopk", None, {"batchtopk_scope": "global"}),
    ("batchtopk", 1, {"batchtopk_scope": "layer"}),
    ("jumprelu", None, {"jumprelu_init_threshold": 0.05}),
    ("jumprelu", 1, {"jumprelu_init_threshold": 0.05}),
    ("relu", None, {}),
    ("relu", 1, {}),
    # Matryoshka prefixes that end inside a shard (rank 1 holds none of the first ones) and skips
    ("topk", None, {"prefix_bounds": [2, 8, 16], "skip": True}),
    ("batchtopk", 1, {"batchtopk_scope": "layer", "prefix_bounds": [4, 12, 16]}),
    ("jumprelu", None, {"jumprelu_init_threshold": 0.05, "prefix_bounds": [8, 16],
                        "skip": True}),
]


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """What is under test is the sharding, not the kernels (tested on their own against the
    same torch paths): the reference and the spawned workers (who inherit the environment) run
    the torch paths, not Triton through the interpreter, which took most of this file's time."""
    monkeypatch.setenv("CLT_FORCE_TORCH", "1")


def model_kwargs(case) -> dict:
    kind, reach, extra = case
    return {"n_layers": L, "d_in": D_IN, "d_out": D_OUT, "n_features": F, "reach": reach,
            "nonlinearity": kind, "k": K, **extra}


def full_model(case, seed: int) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    model = CrossLayerTranscoder(**model_kwargs(case))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        model.b_dec.normal_(0, 0.1)
        model.tokens_since_fired[:, DEAD] = 1000
        if model.W_skip is not None:
            model.W_skip.normal_(0, 0.1)
    return model


def batch(seed: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, n, D_IN, generator=g), torch.randn(L, n, D_OUT, generator=g)


def layout(case) -> kernels.DecoderLayout:
    return kernels.DecoderLayout(L, F, case[1] or L)


# ---- process harness -------------------------------------------------------------------------


def _entry(rank: int, world: int, tp: int, store: str, job: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = mesh_from_group(tp, world // tp)
        torch.save(JOBS[job](mesh, Path(folder)), Path(folder) / f"out{rank}.pt")
        dist.barrier()  # nobody tears down while a peer finishes its last collective
    finally:
        dist.destroy_process_group()


def spawn(job: str, tmp_path: Path, tp: int, world: int = 2) -> list:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    store = tmp_path / "store"
    mp.spawn(_entry, args=(world, tp, str(store), job, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(world)]


def sharded_model(case, mesh: Mesh, full: CrossLayerTranscoder) -> CrossLayerTranscoder:
    return parallelize(full, mesh)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- tensor parallel -------------------------------------------------------------------------


def _tp_job(mesh: Mesh, folder: Path) -> list[dict]:
    results = []
    for i, case in enumerate(CASES):
        model = sharded_model(case, mesh, full_model(case, seed=i))
        x, y = batch(100 + i)
        out = compute_losses(model, x, y, WEIGHTS, step=3)
        out.total.backward()
        result = {"total": out.total.detach(), "terms": {k: v.detach() for k, v in
                                                          out.terms.items()},
                  "yhat": out.yhat.detach(), "grads": grads(model),
                  "threshold": model.threshold.clone()}
        result["norm"] = clip_grad_norm(model, 0.5, mesh)
        result["clipped"] = grads(model)
        model.eval()
        result["eval_yhat"] = model(x)[0].detach()
        results.append(result)
    return results


def test_tensor_parallel_matches_single_process(tmp_path):
    ranks = spawn("tp", tmp_path, tp=2)
    for i, case in enumerate(CASES):
        model = full_model(case, seed=i)
        x, y = batch(100 + i)
        out = compute_losses(model, x, y, WEIGHTS, step=3)
        out.total.backward()
        ref = grads(model)
        name = f"{case[0]} reach={case[1]} {case[2]}"
        if case[0] in ("topk", "batchtopk"):
            assert "auxk" in out.terms, name  # the cross-shard AuxK path ran
        for r in ranks:
            got = r[i]
            assert_close(got["yhat"], out.yhat, atol=1e-5, rtol=1e-5, name=f"{name} yhat")
            assert_close(got["total"], out.total, atol=1e-5, rtol=1e-5, name=f"{name} loss")
            assert got["terms"].keys() == out.terms.keys(), name
            for term, value in out.terms.items():
                assert_close(got["terms"][term], value, atol=1e-5, rtol=1e-5,
                             name=f"{name} {term}")
            assert_close(got["threshold"], model.threshold, atol=1e-6, name=f"{name} threshold")
        assert ref.keys() == ranks[0][i]["grads"].keys(), name
        for pname, g in ref.items():
            merged = merge_tensors(pname, [r[i]["grads"][pname] for r in ranks], layout(case))
            assert_close(merged, g, atol=1e-5, rtol=1e-5, name=f"{name} grad {pname}")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        assert_close(ranks[0][i]["norm"], norm, atol=1e-5, rtol=1e-5, name=f"{name} grad norm")
        merged = merge_tensors("W_dec", [r[i]["clipped"]["W_dec"] for r in ranks], layout(case))
        assert_close(merged, model.W_dec.grad, atol=1e-5, rtol=1e-5, name=f"{name} clipped")
        model.eval()
        for r in ranks:
            assert_close(r[i]["eval_yhat"], model(x)[0], atol=1e-5, rtol=1e-5,
                         name=f"{name} inference")


# ---- data parallel ---------------------------------------------------------------------------

DP_CASES = [c for c in CASES if c[1] is None]
ACCUM = 2


def _sgd(model: torch.nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # new params = params - grads
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _micro_batches(i: int, replica: int, replicas: int) -> list:
    """Micro-batch m of one process with the whole batch = every replica's micro-batch m."""
    out = []
    for m in range(ACCUM):
        x, y = batch(200 + 10 * i + m, N * replicas)
        rows = slice(replica * N, (replica + 1) * N)
        out.append((x[:, rows], y[:, rows]))
    return out


def _dp_job(mesh: Mesh, folder: Path) -> list[dict]:
    results = []
    tcfg = SimpleNamespace(grad_accum=ACCUM, mixed_precision="no", grad_clip=None)
    for i, case in enumerate(DP_CASES):
        model = sharded_model(case, mesh, full_model(case, seed=i))  # one shard: all features
        optimizer, scheduler = _sgd(model)
        metrics = train_step(model, optimizer, scheduler,
                             iter(_micro_batches(i, mesh.dp_rank, mesh.dp_size)), WEIGHTS, 3,
                             tcfg, mesh=mesh, grad_sync=GradSync(model.parameters(), mesh, 0.001))
        results.append({"state": model.state_dict(), "loss": mesh.dp_mean_metrics(metrics)})
    return results


def test_data_parallel_matches_single_process_with_the_whole_batch(tmp_path):
    ranks = spawn("dp", tmp_path, tp=1)
    tcfg = SimpleNamespace(grad_accum=ACCUM, mixed_precision="no", grad_clip=None)
    for i, case in enumerate(DP_CASES):
        model = full_model(case, seed=i)
        optimizer, scheduler = _sgd(model)
        whole = [(torch.cat([a[0] for a in parts], 1), torch.cat([a[1] for a in parts], 1))
                 for parts in zip(*[_micro_batches(i, r, 2) for r in range(2)], strict=True)]
        metrics = train_step(model, optimizer, scheduler, iter(whole), WEIGHTS, 3, tcfg)
        name = f"{case[0]} {case[2]}"
        assert "loss/auxk" in metrics or case[0] not in ("topk", "batchtopk"), name
        for r in ranks:
            for key, value in model.state_dict().items():
                assert_close(r[i]["state"][key], value, atol=1e-5, rtol=1e-5,
                             name=f"{name} {key} after one step")
            assert_close(r[i]["loss"]["loss"].float(), metrics["loss"], atol=1e-5, rtol=1e-5,
                         name=f"{name} mean loss")


# ---- checkpoints across layouts --------------------------------------------------------------

CKPT_CASE = CASES[0]


def _adam_step(model: torch.nn.Module, mesh: Mesh | None = None):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = batch(7)
    compute_losses(model, x, y, WEIGHTS, step=1).total.backward()
    optimizer.step()
    return optimizer


def _save_job(mesh: Mesh, folder: Path) -> dict:
    model = sharded_model(CKPT_CASE, mesh, full_model(CKPT_CASE, seed=1))
    optimizer = _adam_step(model, mesh)
    counter = {"counts": torch.arange(L * 8.0).view(L, 8) + 100 * mesh.tp_rank, "tokens": 5}
    save_sharded_checkpoint(
        folder / "run", 4, 2, mesh,
        {"layout": [L, F, L], "param_names": shard_parameters(model)},
        {"step": 4, "config": {}, "scheduler": {}},
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "counter": counter},
        {"data": {"rank": mesh.rank}, "rng": None},
    )
    return {}


def _load_job(mesh: Mesh, folder: Path) -> dict:
    state = load_checkpoint(newest_checkpoint(folder / "run"))
    model = parallelize(CrossLayerTranscoder(**model_kwargs(CKPT_CASE)), mesh)
    model.load_state_dict(shard_model_state(state["model"], mesh.tp_rank, 2, layout(CKPT_CASE)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(shard_optimizer_state(
        state["optimizer"], shard_parameters(model), mesh.tp_rank, 2, layout(CKPT_CASE)))
    x, _ = batch(8)
    return {"yhat": model(x)[0].detach(), "exp_avg": optimizer.state_dict()["state"]}


MESH_CASES = [CASES[0], CASES[4], CASES[6]]  # TopK, global BatchTopK, JumpReLU


def _mesh_job(mesh: Mesh, folder: Path) -> list[dict]:
    """TP=2 x DP=2: each replica's shard after one step with the replica's half of the batch."""
    results = []
    tcfg = SimpleNamespace(grad_accum=ACCUM, mixed_precision="no", grad_clip=1.0)
    for i, case in enumerate(MESH_CASES):
        model = sharded_model(case, mesh, full_model(case, seed=i))
        optimizer, scheduler = _sgd(model)
        train_step(model, optimizer, scheduler,
                   iter(_micro_batches(i, mesh.dp_rank, mesh.dp_size)), WEIGHTS, 3, tcfg,
                   mesh=mesh, grad_sync=GradSync(model.parameters(), mesh))
        results.append(model.state_dict())
    return results


def test_tensor_times_data_parallel_matches_single_process(tmp_path):
    ranks = spawn("mesh", tmp_path, tp=2, world=4)  # ranks 0,1: replica 0; 2,3: replica 1
    tcfg = SimpleNamespace(grad_accum=ACCUM, mixed_precision="no", grad_clip=1.0)
    for i, case in enumerate(MESH_CASES):
        model = full_model(case, seed=i)
        optimizer, scheduler = _sgd(model)
        whole = [(torch.cat([a[0] for a in parts], 1), torch.cat([a[1] for a in parts], 1))
                 for parts in zip(*[_micro_batches(i, r, 2) for r in range(2)], strict=True)]
        train_step(model, optimizer, scheduler, iter(whole), WEIGHTS, 3, tcfg)
        for replica in range(2):
            shards = ranks[2 * replica: 2 * replica + 2]
            for key, value in model.state_dict().items():
                merged = merge_tensors(key.rsplit(".", 1)[-1], [s[i][key] for s in shards],
                                       layout(case))
                assert_close(merged, value, atol=1e-5, rtol=1e-5,
                             name=f"{case[0]} {case[2]} replica {replica} {key}")


JOBS = {"tp": _tp_job, "dp": _dp_job, "save": _save_job, "load": _load_job, "mesh": _mesh_job}


def test_sharded_checkpoint_loads_on_one_process_and_back(tmp_path):
    (tmp_path / "run").mkdir()
    spawn("save", tmp_path, tp=2)
    path = newest_checkpoint(tmp_path / "run")
    assert path.name == "step_00000004" and (path / "manifest.json").is_file()
    state = load_checkpoint(path)
    ref = full_model(CKPT_CASE, seed=1)
    ref_opt = _adam_step(ref)
    single = CrossLayerTranscoder(**model_kwargs(CKPT_CASE))
    single.load_state_dict(state["model"])
    x, _ = batch(8)
    assert_close(single(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5, name="TP=2 -> 1 outputs")
    for i, (pstate) in ref_opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(state["optimizer"]["state"][i][key], pstate[key], atol=1e-6,
                         name=f"merged Adam {key} of parameter {i}")
    assert state["counter"]["counts"].shape == (L, F)
    assert [r["data"]["rank"] for r in state["ranks"]] == [0, 1]
    # and back: the merged checkpoint, re-sharded on 2 ranks, gives the same outputs
    ranks = spawn("load", tmp_path, tp=2)
    for r in ranks:
        assert_close(r["yhat"], ref(x)[0], atol=1e-5, rtol=1e-5, name="1 -> TP=2 outputs")


def test_incomplete_sharded_checkpoint_is_refused(tmp_path):
    from clt.checkpoint import CheckpointError

    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "manifest.json").write_text(
        '{"format": "clt-sharded-checkpoint/1", "step": 1, "tensor": 2, "data": 1, '
        '"layout": [3, 16, 3], "param_names": []}')
    with pytest.raises(CheckpointError, match="missing tp0.pt, tp1.pt, rank0.pt"):
        load_checkpoint(folder)


# ---- pieces that need no processes -----------------------------------------------------------


def test_select_top_breaks_ties_by_key():
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    key = torch.tensor([[0, 7, 2, 5], [3, 1, 2, 0]])
    keep = select_top(score, key, torch.tensor([2, 3]))
    assert keep.tolist() == [[False, True, True, False], [False, True, True, True]]
    keep = select_top(score, key, 1)
    assert keep.tolist() == [[False, False, True, False], [False, False, False, True]]


@pytest.mark.parametrize("reach", [None, 1, 2])
def test_shard_and_merge_are_inverse(reach):
    case = ("topk", reach, {})
    state = full_model(case, seed=3).state_dict()
    shards = [shard_model_state(state, r, 4, layout(case)) for r in range(4)]
    assert shards[1]["W_enc"].shape == (L, D_IN, F // 4)
    local = kernels.DecoderLayout(L, F // 4, reach or L)
    assert shards[1]["W_dec"].shape == (local.n_rows, D_OUT)
    # rank 1's decoder block of source 0 holds features 4..7 of the full model
    full_block = layout(case).source_view(state["W_dec"], 0)
    assert torch.equal(local.source_view(shards[1]["W_dec"], 0), full_block[4:8])
    for key, value in state.items():
        assert torch.equal(merge_tensors(key.rsplit(".", 1)[-1], [s[key] for s in shards],
                                         layout(case)), value), key


@pytest.mark.parametrize("tp,dp", [(2, 1), (1, 2)])
def test_parallelize_refuses_a_model_that_trains_in_one_process(tp, dp):
    """A MOLT is not shardable: more than one process is refused, whichever axis."""
    model = MixtureOfLinearTransforms(2, 4, 4, [(2, 4)], nonlinearity="relu")
    with pytest.raises(ValueError, match="MixtureOfLinearTransforms trains in one process"):
        parallelize(model, Mesh(tp_size=tp, dp_size=dp))
