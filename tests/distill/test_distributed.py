"""torch.distributed: 2 CPU processes on gloo remove the same units as one process would."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fxprune.distill import Pruner

from tests.distill._distill_models import ResNetlet, batches

STEPS, INTERVAL = 6, 2


def _run(rank: int, world: int, out: str | None):
    """Train with DDP when ``world > 1`` (rank ``rank`` gets its half of every batch)."""
    torch.manual_seed(0)
    model = ResNetlet(bn=False, p=0.0)  # no batch statistics: shards == the whole batch
    data = batches(STEPS, size=8, seed=7)
    p = Pruner(model, (data[0][0],), target_macs=0.5, interval=INTERVAL, steps=STEPS,
               criterion="taylor_gate")
    net = p.student
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(p.student)
    opt = torch.optim.SGD(p.student.parameters(), lr=0.1)
    masks = []
    for x, y in data:
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if p.step() is not None:
            masks.append(p.mask.clone())
    state = {k: v.detach().clone() for k, v in p.student.gm.state_dict().items()}
    result = {"masks": masks, "state": state}
    if out is not None:
        torch.save(result, out)
    return result


def _worker(rank: int, world: int, folder: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        _run(rank, world, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch: 25-55 s on the shared 2-core box
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _run(0, 1, None)
    assert len(r0["masks"]) == STEPS // INTERVAL
    for a, b, c in zip(r0["masks"], r1["masks"], single["masks"]):
        assert torch.equal(a, b)          # every rank removed the same units
        assert torch.equal(a, c)          # ... and the same as one process on all the data
    assert (~r0["masks"][-1]).any()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
        torch.testing.assert_close(v, single["state"][k], rtol=1e-4, atol=1e-5)
