"""FusedSAM under torch.distributed: DDP (local and global perturbation), closure API, FSDP2.

Two gloo processes on the CPU, started with torch.multiprocessing on a free
port.  Each worker runs many checks (process start-up dominates the time) and
asserts itself; a failing rank's traceback is raised here, the other rank is
terminated, and a watchdog kills both if anything hangs.  Every worker also
computes its reference in-process (a non-distributed copy of the model on the
whole batch), so nothing but the seed crosses between processes.
"""

import copy
import math
import os
import secrets
import socket
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from fastsam import FusedSAM, frozen_bn_stats
from fastsam.distributed import first_pass, sam_step

WORLD = 2
STEPS = 5
RHO = 0.05
TOL = 1e-6  # relative, per tensor (the tolerance)
# float64: 1e-6 then measures the algorithm.  In float32 the rounding of a different
# reduction order, grown over 5 SGD+momentum steps, reaches 8e-7 (measured), too close.
DTYPE = torch.float64
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


# --------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, seed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        worker(rank, seed)
    finally:
        dist.destroy_process_group()
    # The work has passed; skip interpreter finalisation.  Since this session's import graph
    # grew (torch.library custom ops, the integrations), about one run in eight aborted *after*
    # both ranks had finished and destroyed the process group ("terminate called without an
    # active exception": a C++ thread still joinable at exit), which failed the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(worker, timeout=90.0):
    """Run worker(rank, seed) on WORLD gloo ranks; re-raise a rank's failure; never leave processes behind."""
    seed = secrets.randbits(31)
    ctx = mp.start_processes(
        _entry, args=(WORLD, _free_port(), worker, seed), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} (seed {seed}) did not finish in {timeout:.0f} s")
    except Exception as exc:
        raise AssertionError(f"{worker.__name__} failed with seed {seed}") from exc
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


# --------------------------------------------------------------------------- helpers for the workers
def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _mse(out, y):
    return torch.nn.functional.mse_loss(out, y)


def _batches(seed, steps=STEPS, n=8):
    """The same global batches on every rank; rank r trains on rows [r*n/2, (r+1)*n/2)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=g, dtype=DTYPE), torch.randn(n, 3, generator=g, dtype=DTYPE)) for _ in range(steps)
    ]


def _shard(batch, rank):
    x, y = batch
    k = x.shape[0] // WORLD
    return x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k]


def _model(seed, cls=_mlp):
    torch.manual_seed(seed)
    return cls().to(DTYPE)


def _state_tensors(model, opt):
    """Parameters, buffers and the base optimizer's tensor state, in a fixed order."""
    out = [t.detach() for t in model.parameters()] + list(model.buffers())
    for p in model.parameters():
        st = opt.base_optimizer.state[p]
        out += [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
    return out


def _assert_ranks_bitwise_equal(tensors, what):
    mine = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    bufs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(bufs, mine)
    assert all(torch.equal(bufs[0], b) for b in bufs[1:]), f"{what}: ranks differ"


def _assert_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = float((a.detach().double() - e.detach().double()).norm() / e.detach().double().norm().clamp_min(1e-30))
        assert err <= TOL, f"{what}, tensor {i}: relative error {err:.3g} > {TOL}"


@torch.no_grad()
def _reference_sam_step(model, base, shards, mode, perturb_eps=1e-12):
    """One SAM step in one process over the ranks' shards: each shard's forward runs alone (as
    on its rank); 'local' perturbs per shard and averages the shards' SAM gradients, 'global'
    perturbs with the averaged first gradient.  BN statistics: shard 0's first pass only."""
    params = list(model.parameters())
    w = [p.clone() for p in params]

    def grads(x, y, track_bn):
        with torch.enable_grad():
            if track_bn:
                loss = _mse(model(x), y)
            else:
                with frozen_bn_stats(model):
                    loss = _mse(model(x), y)
            return torch.autograd.grad(loss, params)

    def perturb(g):
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
        for p, t in zip(params, g):
            p.add_(t, alpha=RHO / (norm + perturb_eps))

    def restore():
        for p, t in zip(params, w):
            p.copy_(t)

    firsts = [grads(x, y, track_bn=(r == 0)) for r, (x, y) in enumerate(shards)]
    sam = []
    for r, (x, y) in enumerate(shards):
        g = firsts[r] if mode == "local" else [sum(ts) / len(shards) for ts in zip(*firsts)]
        perturb(g)
        sam.append(grads(x, y, track_bn=False))
        restore()
    for p, ts in zip(params, zip(*sam)):
        p.grad = sum(ts) / len(shards)
    base.step()
    base.zero_grad()


# --------------------------------------------------------------------------- DDP worker
def _ddp_checks(rank, seed):
    batches = _batches(seed)

    # 1. global mode == single-process FusedSAM on the concatenated batch; the closure API
    #    (with first_pass) == sam_step bitwise; ranks bitwise identical after every step.
    # 2. local mode == average of the per-shard SAM gradients computed in one process.
    for mode in ("global", "local"):
        for name, (base_cls, kw) in BASES.items():
            ref = _model(seed)
            ddp = DDP(copy.deepcopy(ref))
            ddp_c = DDP(copy.deepcopy(ref))  # trained through the closure API
            opt = FusedSAM(ddp.parameters(), base_cls, rho=RHO, perturbation=mode, **kw)
            opt_c = FusedSAM(ddp_c.parameters(), base_cls, rho=RHO, perturbation=mode, **kw)
            if mode == "global":
                opt_ref = FusedSAM(ref.parameters(), base_cls, rho=RHO, **kw)
            else:
                opt_ref = base_cls(ref.parameters(), foreach=False, **kw)
            for step, batch in enumerate(batches):
                x, y = _shard(batch, rank)
                loss = sam_step(ddp, opt, _mse, x, y)
                assert loss.shape == () and not loss.requires_grad

                with first_pass(ddp_c, opt_c):
                    _mse(ddp_c(x), y).backward()

                def closure():
                    with frozen_bn_stats(ddp_c):
                        second = _mse(ddp_c(x), y)
                    second.backward()
                    return second

                opt_c.step(closure)
                opt_c.zero_grad()

                if mode == "global":
                    _mse(ref(batch[0]), batch[1]).backward()
                    opt_ref.first_step(zero_grad=True)
                    _mse(ref(batch[0]), batch[1]).backward()
                    opt_ref.second_step(zero_grad=True)
                else:
                    _reference_sam_step(ref, opt_ref, [_shard(batch, r) for r in range(WORLD)], "local")
                what = f"{mode}/{name} step {step}"
                _assert_close(list(ddp.parameters()), list(ref.parameters()), what)
                for p, q in zip(ddp.parameters(), ddp_c.parameters()):
                    assert torch.equal(p, q), f"{what}: closure API differs from sam_step"
                _assert_ranks_bitwise_equal(_state_tensors(ddp.module, opt), what)

    # 3. a model with BatchNorm, both modes: the perturbed pass leaves the statistics alone;
    #    every rank ends each step with rank 0's statistics (shard 0, unperturbed weights).
    for mode in ("global", "local"):
        base_cls, kw = BASES["sgd"]
        ref = _model(seed, _BNNet)
        ddp = DDP(copy.deepcopy(ref))
        opt = FusedSAM(ddp.parameters(), base_cls, rho=RHO, perturbation=mode, **kw)
        opt_ref = base_cls(ref.parameters(), foreach=False, **kw)
        for step, batch in enumerate(batches):
            sam_step(ddp, opt, _mse, *_shard(batch, rank))
            _reference_sam_step(ref, opt_ref, [_shard(batch, r) for r in range(WORLD)], mode)
            what = f"BN {mode} step {step}"
            _assert_close(list(ddp.parameters()), list(ref.parameters()), what)
            _assert_close(
                [ddp.module.bn.running_mean, ddp.module.bn.running_var],
                [ref.bn.running_mean, ref.bn.running_var],
                what + " running stats",
            )
            assert int(ddp.module.bn.num_batches_tracked) == step + 1, what
            _assert_ranks_bitwise_equal(_state_tensors(ddp.module, opt), what)

    # 4. SAM inactive: one synchronised pass and the base step, plain DDP training.
    base_cls, kw = BASES["sgd"]
    plain = DDP(_model(seed))
    ddp = DDP(_model(seed))
    opt = FusedSAM(ddp.parameters(), base_cls, rho=RHO, perturbation="local", sam_start_step=100, **kw)
    opt_plain = base_cls(plain.parameters(), **kw)
    for batch in batches[:3]:
        x, y = _shard(batch, rank)
        sam_step(ddp, opt, _mse, x, y)
        _mse(plain(x), y).backward()
        opt_plain.step()
        opt_plain.zero_grad()
        # the base step's math through the fused kernels (FMA or not per backend): equal to rounding
        _assert_close(list(ddp.parameters()), list(plain.parameters()), "inactive SAM vs plain DDP training")

    # 5. a non-finite gradient on rank 1 only makes every rank skip the step: in the first
    #    pass (local mode: the other rank's gradient is finite), or in the second.
    for mode, bad_call in (("local", 0), ("local", 1), ("global", 0)):
        ddp = DDP(_model(seed))
        opt = FusedSAM(ddp.parameters(), base_cls, rho=RHO, perturbation=mode, **kw)
        calls = []

        def loss_fn(out, y):
            loss = _mse(out, y)
            calls.append(None)
            if rank == 1 and len(calls) == 5 + bad_call:  # step 2 (of 0..3), first or second pass
                loss = loss * float("inf")
            return loss

        for step, batch in enumerate(batches[:4]):
            before = [t.clone() for t in _state_tensors(ddp.module, opt)]
            sam_step(ddp, opt, loss_fn, *_shard(batch, rank))
            what = f"non-finite {mode} pass {bad_call} step {step}"
            assert bool(opt.found_inf) == (step == 2), what
            if step == 2:
                for a, b in zip(_state_tensors(ddp.module, opt), before):
                    assert torch.equal(a, b), f"{what}: a skipped step changed the state"
            _assert_ranks_bitwise_equal(_state_tensors(ddp.module, opt), what)

    # 6. checkpoint written by rank 0, loaded by every rank: resuming is exact.
    for mode in ("local", "global"):
        base_cls, kw = BASES["adamw"]
        ddp = DDP(_model(seed, _BNNet))
        opt = FusedSAM(ddp.parameters(), base_cls, rho=RHO, perturbation=mode, **kw)
        for batch in batches[:3]:
            sam_step(ddp, opt, _mse, *_shard(batch, rank))
        path = os.path.join(os.environ.get("FASTSAM_TEST_TMP", "/tmp"), f"fastsam_ckpt_{seed}_{mode}.pt")
        if rank == 0:
            torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        ckpt = torch.load(path, weights_only=True)
        dist.barrier()
        if rank == 0:
            os.remove(path)
        resumed_model = _model(seed + 1, _BNNet)  # other initial weights: the checkpoint must overwrite them
        resumed_model.load_state_dict(ckpt["model"])
        resumed = DDP(resumed_model)
        opt_r = FusedSAM(resumed.parameters(), base_cls, rho=RHO, perturbation=mode, **kw)
        opt_r.load_state_dict(ckpt["opt"])
        for batch in batches[3:]:
            sam_step(ddp, opt, _mse, *_shard(batch, rank))
            sam_step(resumed, opt_r, _mse, *_shard(batch, rank))
        for a, b in zip(_state_tensors(ddp.module, opt), _state_tensors(resumed.module, opt_r)):
            assert torch.equal(a, b), f"{mode}: resuming from rank 0's checkpoint is not exact"


def test_ddp_local_global_closure_bn_nonfinite_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAM_TEST_TMP", str(tmp_path))  # inherited by the spawned ranks
    _spawn(_ddp_checks)


# --------------------------------------------------------------------------- FSDP2 worker
def _fsdp_checks(rank, seed):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    batches = _batches(seed)

    def sharded(model):
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    # global perturbation over shards (8 and 3 rows: even and uneven shards) == single-process SAM
    for name, adaptive in (("sgd", False), ("adamw", False), ("sgd", True)):
        base_cls, kw = BASES[name]
        rho = 0.5 if adaptive else RHO
        ref = _model(seed)
        model = sharded(copy.deepcopy(ref))
        opt = FusedSAM(model.parameters(), base_cls, rho=rho, adaptive=adaptive, perturbation="global", **kw)
        opt_ref = FusedSAM(ref.parameters(), base_cls, rho=rho, adaptive=adaptive, **kw)
        for step, batch in enumerate(batches):
            sam_step(model, opt, _mse, *_shard(batch, rank))
            sam_step(ref, opt_ref, _mse, *batch)
            full = [p.full_tensor() for p in model.parameters()]
            _assert_close(full, list(ref.parameters()), f"FSDP2 {name} adaptive={adaptive} step {step}")
        p = next(model.parameters())
        assert isinstance(p, DTensor)
        state = opt.base_optimizer.state[p]
        assert all(isinstance(state[k], DTensor) for k in ("momentum_buffer", "exp_avg") if k in state)
        # the sharded optimizer state, gathered by torch.distributed.checkpoint, is the single-process one
        full = get_optimizer_state_dict(model, opt.base_optimizer, options=StateDictOptions(full_state_dict=True))
        for fqn, q in ref.named_parameters():
            st_ref = opt_ref.base_optimizer.state[q]
            keys = [k for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if k in st_ref]
            assert keys
            _assert_close([full["state"][fqn][k] for k in keys], [st_ref[k] for k in keys], f"FSDP2 {name} {fqn}")

    # the variants' global sums (GSAM's and LookSAM's dot products and norms) over the shards too
    from fastsam import GSAM, FriendlySAM, LookSAM

    for cls, extra in ((GSAM, dict(alpha=0.3)), (LookSAM, dict(k=2)), (FriendlySAM, {})):
        base_cls, kw = BASES["sgd"]
        ref = _model(seed)
        model = sharded(copy.deepcopy(ref))
        opt = cls(model.parameters(), base_cls, rho=RHO, perturbation="global", **extra, **kw)
        opt_ref = cls(ref.parameters(), base_cls, rho=RHO, **extra, **kw)
        for step, batch in enumerate(batches):
            sam_step(model, opt, _mse, *_shard(batch, rank))
            sam_step(ref, opt_ref, _mse, *batch)
            full = [p.full_tensor() for p in model.parameters()]
            _assert_close(full, list(ref.parameters()), f"FSDP2 {cls.__name__} step {step}")

    # a non-finite gradient in rank 1's shard only: every rank skips (the norm is global)
    base_cls, kw = BASES["sgd"]
    model = sharded(_model(seed))
    opt = FusedSAM(model.parameters(), base_cls, rho=RHO, perturbation="global", **kw)
    sam_step(model, opt, _mse, *_shard(batches[0], rank))
    before = [p.full_tensor() for p in model.parameters()]
    x, y = _shard(batches[1], rank)
    _mse(model(x), y).backward()
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    opt.first_step(zero_grad=True)
    _mse(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert bool(opt.found_inf), f"rank {rank} did not skip"
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.full_tensor(), b), "a skipped FSDP2 step changed the parameters"

    # per-rank perturbation cannot exist with sharded weights: refused, not silently global
    opt = FusedSAM(model.parameters(), base_cls, rho=RHO, perturbation="local", **kw)
    with pytest.raises(ValueError, match="perturbation='global'"):
        sam_step(model, opt, _mse, x, y)


def test_fsdp2_global_norm_over_shards_equals_single_process():
    _spawn(_fsdp_checks)


# --------------------------------------------------------------------------- no process group
@pytest.mark.parametrize("mode", ["local", "global"])
def test_without_process_group_both_modes_are_plain_sam(mode, seed):
    """Outside a process group sam_step is the two-step SAM loop (BN statistics from the first pass)."""
    model = _BNNet().to(DTYPE)
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, perturbation=mode, lr=0.1, momentum=0.9)
    opt_twin = FusedSAM(twin.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9)
    for x, y in _batches(seed, steps=3):
        loss = sam_step(model, opt, _mse, x, y)
        first = _mse(twin(x), y)
        first.backward()
        opt_twin.first_step(zero_grad=True)
        with frozen_bn_stats(twin):
            _mse(twin(x), y).backward()
        opt_twin.second_step(zero_grad=True)
        assert torch.equal(loss, first.detach())
        for a, b in zip(
            list(model.parameters()) + list(model.buffers()), list(twin.parameters()) + list(twin.buffers())
        ):
            assert torch.equal(a, b)
        assert all(p.grad is None for p in model.parameters())
