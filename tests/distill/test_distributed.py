"""torch.distributed: 2 CPU processes on gloo remove the same units as one process would.

``selection="hard"`` (the default: gate-gradient statistics, all-reduced by the pruner) and
``"soft"`` (learnable soft masks: DDP all-reduces their gradients like any weight's, so
``|m|`` and with it every removal agree across ranks before the pruner reads them).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fxprune.distill import Pruner

from tests.distill._distill_models import ResNetlet, batches

STEPS, INTERVAL = 6, 2
SELECTIONS = {"hard": {"criterion": "taylor_gate"}, "soft": {"selection": "soft", "l1": 1e-2}}


def _run(rank: int, world: int, out: str | None, selection: str):
    """Train with DDP when ``world > 1`` (rank ``rank`` gets its half of every batch)."""
    torch.manual_seed(0)
    model = ResNetlet(bn=False, p=0.0)  # no batch statistics: shards == the whole batch
    data = batches(STEPS, size=8, seed=7)
    p = Pruner(model, (data[0][0],), target_macs=0.5, interval=INTERVAL, steps=STEPS,
               **SELECTIONS[selection])
    net = p.student
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(p.student)
    opt = torch.optim.SGD(p.weight_parameters() + p.mask_parameters(), lr=0.1)
    masks, soft = [], []
    for x, y in data:
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        # the penalty is the same on every rank: DDP's mean keeps it whole, as one process does
        loss = F.cross_entropy(net(x), y) + p.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if p.step() is not None:
            masks.append(p.mask.clone())
            if p.student.soft_mask is not None:  # what this rank holds, before any averaging
                soft.append(p.student.soft_mask.detach().clone())
    state = {k: v.detach().clone() for k, v in p.student.state_dict().items()}
    small = p.finish(data[0][0])  # soft: the kept masks folded into the weights
    folded = {k: v.detach().clone() for k, v in small.model.state_dict().items()}
    result = {"masks": masks, "soft": soft, "state": state, "folded": folded}
    if out is not None:
        torch.save(result, out)
    return result


def _worker(rank: int, world: int, folder: str, selection: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        _run(rank, world, os.path.join(folder, f"rank{rank}.pt"), selection)
    finally:
        dist.destroy_process_group()


def _same(a: dict, b: dict, single: dict) -> None:
    assert a.keys() == b.keys() == single.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k    # bit-identical on both ranks
        torch.testing.assert_close(v, single[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow  # two fresh interpreters import torch: 25-55 s on the shared 2-core box
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path, selection):
    mp.spawn(_worker, args=(2, str(tmp_path), selection), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _run(0, 1, None, selection)
    assert len(r0["masks"]) == STEPS // INTERVAL
    for a, b, c in zip(r0["masks"], r1["masks"], single["masks"]):
        assert torch.equal(a, b)          # every rank removed the same units
        assert torch.equal(a, c)          # ... and the same as one process on all the data
    assert (~r0["masks"][-1]).any()
    assert len(r0["soft"]) == (len(r0["masks"]) if selection == "soft" else 0)
    for a, b, c in zip(r0["soft"], r1["soft"], single["soft"]):
        assert torch.equal(a, b)          # DDP synced the masks: the ranks' |m| agree
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        assert not torch.equal(a, torch.ones_like(a))  # the masks did learn
    _same(r0["state"], r1["state"], single["state"])
    _same(r0["folded"], r1["folded"], single["folded"])
