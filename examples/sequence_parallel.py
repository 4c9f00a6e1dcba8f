"""Gated linear attention with its sequence sharded over the ranks of a process group.

    torchrun --nproc-per-node 2 examples/sequence_parallel.py

Every rank builds the same module and the same whole-sequence inputs (seeded), keeps its
slice of the time axis, and checks its slice of the outputs against a one-process run.
"""

import torch
import torch.distributed as dist

import recdsl
from recdsl.distributed import SequenceParallel


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same params and inputs on every rank
    module = recdsl.compile("examples/gla.rec", dk=16, dv=16)
    q, k, v, g = torch.randn(4, 2, 1000, 16).unbind(0)  # the whole sequence, [B, T, d] each
    bounds = [round(r * 1000 / world) for r in range(world + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])  # this rank's contiguous slice
    parallel = SequenceParallel(module)
    y, final = parallel(q[:, mine], k[:, mine], v[:, mine], g[:, mine], return_state=True)
    y_whole, final_whole = module(q, k, v, g, return_state=True)
    assert torch.allclose(y, y_whole[:, mine], atol=1e-4)
    assert torch.allclose(final["S"], final_whole["S"], atol=1e-4)  # on every rank
    if rank == 0:
        print(parallel.describe(batch=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
