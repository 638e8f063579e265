"""DistributedDataParallel: two CPU processes (gloo) give the adapter the same gradients as one
process on the concatenated batch."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WIDTH = 10


def _setup():
    from torch import nn

    import tensoradapt.torch as tat
    from tensoradapt import presets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 2))
    adapter = tat.attach(model, presets.lorta(3, 2), ["0", "2"], seed=1)
    with torch.no_grad():  # a point with non-zero gradients for every tensor
        for p in adapter.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, adapter


def _batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, adapter = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _batch()
        shard = slice(rank * 4, rank * 4 + 4)
        loss = (ddp(x[shard]) - y[shard]).square().mean()
        loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in adapter.named_trainable_parameters()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_ddp_two_processes_match_one_process(tmp_path) -> None:
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)
    model, adapter = _setup()
    x, y = _batch()
    (model(x) - y).square().mean().backward()
    for name, p in adapter.named_trainable_parameters():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-7)
    assert set(ddp_grads) == {n for n, _ in adapter.named_trainable_parameters()}

