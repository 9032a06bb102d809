"""fastsam.hessian inside a 2-rank gloo process group on CPU.

Each rank holds its own half of the data; the products are all-reduced, so both ranks must get
identical eigenvalues / trace, equal to the single-process result on the concatenated data.
"""

import datetime
import os
import secrets
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastsam.hessian as hessian

WORLD = 2
TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(seed):
    """The same model on every rank, and the full data (one chunk of 8 samples per rank)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(8 * WORLD, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8 * WORLD,), generator=g)
    return model, x, y


def _solve(model, data, seed):
    r = hessian.eigenvalues(model, nn.functional.cross_entropy, data, k=3, tol=1e-10, seed=seed)
    t = hessian.trace(model, nn.functional.cross_entropy, data, num_samples=30, seed=seed)
    return r.eigenvalues, r.num_hvps, t.trace


def _worker(rank, port, seed, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        model, x, y = _problem(seed)
        mine = (x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8])
        # seed=None on purpose: rank 0's fresh seed must be broadcast to every rank
        values, hvps, tr = _solve(model, mine, None if rank else seed)
        torch.save({"values": values, "hvps": hvps, "trace": tr}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    seed = secrets.randbits(31)
    print(f"seed={seed}")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"seed={seed}: distributed run timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert torch.equal(r0["values"], r1["values"]), f"seed={seed}: ranks disagree {r0} {r1}"
    assert r0["hvps"] == r1["hvps"] and r0["trace"] == r1["trace"]
    model, x, y = _problem(seed)
    values, _, tr = _solve(model, (x, y), seed)
    assert torch.allclose(r0["values"], values, rtol=1e-8, atol=0), f"seed={seed}: {r0['values']} vs {values}"
    assert abs(r0["trace"] - tr) <= 1e-8 * abs(tr), f"seed={seed}"
