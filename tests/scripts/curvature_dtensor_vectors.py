"""List-vector operations on DTensor shards (2 gloo ranks) against the same operations on full tensors.

    python curvature_dtensor_vectors.py OUT_DIR     # spawns 2 ranks on MASTER_PORT; rank 0 writes OUT_DIR/result.pt

A 3 x 4 tensor sharded on dim 0 (uneven: 2 + 1 rows), a 5-vector sharded on dim 0 (3 + 2) and a 2 x 2 tensor
replicated: dot, norm and dots must equal the full tensors' (each entry counted once), random vectors must
be the full ones' shards, and a Lanczos run on a diagonal operator must give the one-process values.
"""

import os
import sys

import torch
import torch.distributed as dist


def run(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from adai_lightning.curvature import lanczos_extremes
    from adai_lightning.curvature.vectors import dot, dots, norm, numel, random_normal, rademacher

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    full_a = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64),
              torch.randn(2, 2, generator=gen, dtype=torch.float64)]
    full_b = [torch.randn_like(t) for t in full_a]
    placements = [[Shard(0)], [Shard(0)], [Replicate()]]
    shard = lambda vector: [distribute_tensor(t, mesh, p) for t, p in zip(vector, placements)]  # noqa: E731
    a, b = shard(full_a), shard(full_b)
    diagonal = [torch.arange(1.0, 1 + t.numel(), dtype=torch.float64).reshape(t.shape) for t in full_a]
    sharded_diagonal = shard(diagonal)
    top = lanczos_extremes(lambda v: [d * x for d, x in zip(sharded_diagonal, v)], a, 2, "largest",
                           torch.Generator().manual_seed(3), num_iters=30)
    reference = lanczos_extremes(lambda v: [d * x for d, x in zip(diagonal, v)], full_a, 2, "largest",
                                 torch.Generator().manual_seed(3), num_iters=30)
    result = {
        "dot": (dot(a, b), dot(full_a, full_b)), "norm": (norm(a), norm(full_a)),
        "dots": (dots([a, b], b).tolist(), dots([full_a, full_b], full_b).tolist()),
        "numel": (numel(a), numel(full_a)),
        "normal": all(torch.equal(s.full_tensor(), f) for s, f in
                      zip(random_normal(a, torch.Generator().manual_seed(5)),
                          random_normal(full_a, torch.Generator().manual_seed(5)))),
        "rademacher": all(torch.equal(s.full_tensor(), f) for s, f in
                          zip(rademacher(a, torch.Generator().manual_seed(5)),
                              rademacher(full_a, torch.Generator().manual_seed(5)))),
        "lanczos": (top.values.tolist(), reference.values.tolist()),
        "lanczos_vector": all(torch.allclose(s.full_tensor(), f, atol=1e-10)
                              for s, f in zip(top.vectors[0], reference.vectors[0])),
    }
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=2)
