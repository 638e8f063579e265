"""A SuperLoRA adapter trained under FSDP2 (``torch.distributed.fsdp.fully_shard``), then saved.

    torchrun --nproc_per_node 2 examples/fsdp_train.py [OUTPUT_FOLDER]   # 2 processes (gloo on CPU, nccl on GPUs)
    python examples/fsdp_train.py [OUTPUT_FOLDER]                        # one process, same code path

A tiny GPT-2 built from its config (no download).  Every transformer block gets its own
``fully_shard`` group, then the root: the adapter's tensors live in ``model.tensoradapt``, a module
at the root, so they belong to the root's group (LoRTA with ``groups=1`` shares them across every
block).  ``adapter.save_pretrained`` is a collective under FSDP2: every rank calls it, the full
tensors are gathered and rank 0 writes the file.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

import tensoradapt.torch as tat
from tensoradapt import presets


def main(output: str) -> None:
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # started by torchrun (or accelerate launch): MASTER_ADDR, RANK, … are set
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # a single process
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        torch.manual_seed(0)  # the same base weights on every rank
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
        adapter = tat.attach(model, presets.lorta(order=3, rank=8, groups=1), ["c_attn"])  # before sharding
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)  # the root last: the adapter's tensors (model.tensoradapt) are in its group
        # the optimiser after fully_shard: sharding replaced the parameters by DTensors
        opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
        device = torch.device("cuda") if cuda else torch.device("cpu")
        data = torch.Generator().manual_seed(1)
        for step in range(3):
            batch = torch.randint(0, config.vocab_size, (2 * world, 32), generator=data)  # the global batch
            ids = batch[2 * rank: 2 * rank + 2].to(device)  # this rank's part of it
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f} (rank 0's part of the batch)")
        path = adapter.save_pretrained(output)  # every rank: gathers the shards; rank 0 writes
        if rank == 0:
            print(f"saved {path} ({world} process{'es' if world > 1 else ''})")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpt2-lorta-fsdp")
