"""FSDP2 (``torch.distributed.fsdp.fully_shard``): two CPU processes (gloo), each block sharded on
its own and the root last (the adapter's tensors, registered at ``model.tensoradapt``, belong to
the root's group).  The adapter's gradients, one optimiser step, ``deltas()``, ``disabled()`` and
the saved file equal one process on the whole batch; ``merge()``/``detach()`` refuse, changing
nothing."""

from __future__ import annotations

import datetime
import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WIDTH, BLOCKS, BATCH, WORLD, LR = 8, 2, 8, 2, 0.5
# name: (config, modules_to_save, root reshard_after_forward)
CASES = {
    "lora": ("lora", ["head"], None),  # factored LoRA, one group per target, plus a trained head
    "lorta_shared": ("lorta_shared", None, None),  # one group over the 4 targets of both blocks (one component)
    "fastfood": ("fastfood", None, True),  # LoRA through a Fastfood projection; the root also reshards
}


def _config(key: str):
    from tensoradapt import presets

    return {
        "lora": presets.lora(2),
        "lorta_shared": presets.lorta(3, 2, groups=1),
        "fastfood": presets.with_projection(presets.lora(2), "fastfood", 0.5),
    }[key]


def _net():
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.tanh(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
            self.head = nn.Linear(WIDTH, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h)

    return Net()


def _setup(case: str, *, saved: bool = True):
    import tensoradapt.torch as tat

    key, to_save, _ = CASES[case]
    torch.manual_seed(0)
    model = _net()
    adapter = tat.attach(model, _config(key), ["fc1", "fc2"], seed=1, modules_to_save=to_save if saved else None)
    with torch.no_grad():  # a point with non-zero gradients for every tensor (LoRA's B starts at zero)
        for p in adapter.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, adapter


def _batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 4, generator=gen), torch.randn(BATCH, 2, generator=gen)


def _shard(model, case: str) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:  # per block, then the root: the adapter's shared tensors are the root's
        fully_shard(block)
    reshard = CASES[case][2]
    fully_shard(model, **({} if reshard is None else {"reshard_after_forward": reshard}))


def _local_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, store: str, folder: str) -> None:
    import safetensors.torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results: dict[str, torch.Tensor] = {}
        x, y = _batch()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for case in CASES:
            model, adapter = _setup(case)
            _shard(model, case)
            params = dict(adapter.named_trainable_parameters())
            assert all(isinstance(p, DTensor) for p in params.values())  # sharded by the root's group
            returned = adapter.save(os.path.join(folder, f"{case}.init.safetensors"))  # every rank: a collective
            assert str(returned) == os.path.join(folder, f"{case}.init.safetensors")
            if case == "lora":  # a write that fails on the writing rank raises on every rank (no rank hangs)
                try:
                    adapter.save(os.path.join(folder, "adapter.txt"))  # not .safetensors: refused by rank 0
                except (ValueError, RuntimeError) as error:
                    assert type(error) is (ValueError if rank == 0 else RuntimeError), error
                    assert ".safetensors" in str(error) if rank == 0 else "failed" in str(error), error
                else:
                    raise AssertionError("a failed save did not raise on every rank")

            loss = (model(x[part]) - y[part]).square().mean()
            loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in params.items()}  # gradients are DTensor shards too
            opt = torch.optim.SGD(adapter.trainable_parameters(), lr=LR)
            opt.step()
            opt.zero_grad()
            stepped = {n: p.detach().full_tensor() for n, p in params.items()}
            adapter.save_pretrained(os.path.join(folder, f"{case}.step"))
            deltas = adapter.deltas()  # a collective too
            with torch.no_grad():
                with adapter.disabled():
                    base_out = model(x[part])
                out = model(x[part])

            before = _local_state(model)
            for call in (adapter.merge, adapter.detach, adapter.merge_and_detach):
                try:
                    call()
                except RuntimeError as error:
                    assert "FSDP2" in str(error) and "not changed" in str(error), error
                else:
                    raise AssertionError(f"{call.__name__}() did not refuse a model sharded by FSDP2")
            after = _local_state(model)
            assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
            assert adapter.attached and not adapter.merged
            if rank == 0:
                for n, g in grads.items():
                    results[f"{case}/grad/{n}"] = g
                for n, p in stepped.items():
                    results[f"{case}/step/{n}"] = p
                for n, d in deltas.items():
                    results[f"{case}/delta/{n}"] = d
                results[f"{case}/base_out"], results[f"{case}/out"] = base_out, out
            else:  # each rank's outputs are its own part of the batch
                results[f"{case}/out1"] = out
        for case in ("lora", "lorta_shared"):  # the factored path and the generated one
            model, adapter = _setup(case, saved=False)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model.tensoradapt)  # wrong: its forward never runs, so its tensors stay sharded
            fully_shard(model)
            try:
                model(x[part])
            except RuntimeError as error:
                assert "sharded DTensors" in str(error) and "fully_shard" in str(error), error
            else:
                raise AssertionError("a forward with the adapter's tensors still sharded did not refuse")
        if rank == 0:
            safetensors.torch.save_file({k: v.contiguous() for k, v in results.items()},
                                        os.path.join(folder, "rank0.pt.safetensors"))
        else:
            safetensors.torch.save_file(results, os.path.join(folder, "rank1.pt.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    import safetensors.torch

    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(WORLD, str(folder / "store"), str(folder)), nprocs=WORLD, join=True)
    return (folder, safetensors.torch.load_file(folder / "rank0.pt.safetensors"),
            safetensors.torch.load_file(folder / "rank1.pt.safetensors"))


def _reference(case: str, folder):
    """One process on the whole batch: gradients, one SGD step, the files, deltas, outputs."""
    model, adapter = _setup(case)
    init = adapter.save(folder / f"{case}.single.init.safetensors")
    x, y = _batch()
    (model(x) - y).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in adapter.named_trainable_parameters()}
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=LR)
    opt.step()
    stepped = {n: p.detach().clone() for n, p in adapter.named_trainable_parameters()}
    step = adapter.save_pretrained(folder / f"{case}.single.step")
    with torch.no_grad():
        with adapter.disabled():
            base_out = model(x)
        out = model(x)
    return grads, stepped, adapter.deltas(), init, step, base_out, out


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_gradients_and_step_match_one_process(fsdp_run, case: str) -> None:
    folder, rank0, _ = fsdp_run
    grads, stepped, _, _, _, _, _ = _reference(case, folder)
    names = {k.split("/", 2)[2] for k in rank0 if k.startswith(f"{case}/grad/")}
    assert names == set(grads) and names
    for name, g in grads.items():
        assert g.abs().sum() > 0, name  # every tensor gets a gradient: the comparison means something
        _close(rank0[f"{case}/grad/{name}"], g)
        _close(rank0[f"{case}/step/{name}"], stepped[name])


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_save_matches_one_process(fsdp_run, case: str) -> None:
    import safetensors.torch

    import tensoradapt.torch as tat

    folder, _, _ = fsdp_run
    _, _, _, init, step, _, _ = _reference(case, folder)
    # the same values (before training): the same file, byte for byte (write_adapter fixes the order of
    # the header's __metadata__ entries, which safetensors writes in a per-process hash order)
    assert (folder / f"{case}.init.safetensors").read_bytes() == init.read_bytes()
    # after a step, equal up to the reduction order of the gradients; the same metadata and names
    sharded = folder / f"{case}.step" / "adapter_model.safetensors"
    assert tat.read_metadata(sharded) == tat.read_metadata(step)
    ours, theirs = safetensors.torch.load_file(sharded), safetensors.torch.load_file(step)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        _close(ours[name], theirs[name])
    assert not list(folder.glob(f".{case}*.tmp")) and not list((folder / f"{case}.step").glob(".*.tmp"))
    model = _net()  # the file loads on an unsharded model, where merge() and detach() work
    adapter = tat.load(model, sharded)
    adapter.merge()
    adapter.detach()


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_deltas_and_disabled_match_one_process(fsdp_run, case: str) -> None:
    folder, rank0, rank1 = fsdp_run
    _, _, deltas, _, _, base_out, out = _reference(case, folder)
    for name, d in deltas.items():
        _close(rank0[f"{case}/delta/{name}"], d)
    half = BATCH // WORLD
    _close(rank0[f"{case}/base_out"], base_out[:half])
    _close(rank0[f"{case}/out"], out[:half])
    _close(rank1[f"{case}/out1"], out[half:])
    assert not torch.allclose(base_out, out)  # the adapter does change the output


def test_refusals_need_fsdp() -> None:
    """Without FSDP2 the same calls work (the refusal is not a blanket one)."""
    from tensoradapt.torch.distributed import fsdp_sharded, gather_full

    model, adapter = _setup("lorta_shared")
    assert not fsdp_sharded(model)
    tensors = dict(adapter.named_trainable_parameters())
    assert all(a is b for a, b in zip(gather_full(tensors).values(), tensors.values(), strict=True))
    adapter.merge()
    adapter.detach()
