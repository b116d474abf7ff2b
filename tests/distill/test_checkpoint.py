"""Checkpoint and resume: bitwise-equal continuation on CPU; atomic saves."""
import os

import pytest
import torch
import torch.nn.functional as F

from fxprune.distill import Pruner, load_checkpoint, save_checkpoint
from fxprune.distill.losses import mixed_kd_loss

from tests.distill._distill_models import ResNetlet, batches

DATA = batches(6, seed=3)


def _setup(criterion):
    torch.manual_seed(0)
    model = ResNetlet()
    p = Pruner(model, (DATA[0][0],), target_macs=0.5, interval=2, steps=6,
               criterion=criterion, closure=_closure)
    opt = torch.optim.SGD(p.student.parameters(), lr=0.05, momentum=0.9)
    return p, opt


def _closure(student):
    x, y = DATA[0]
    return F.cross_entropy(student(x), y)


def _train(p, opt, start, stop):
    for i in range(start, stop):
        x, y = DATA[i]
        s = p.student(x)
        with torch.no_grad():
            t = p.teacher(x)
        loss = mixed_kd_loss(F.cross_entropy(s, y), s, t, alpha=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        p.step()


@pytest.mark.parametrize("criterion", ["taylor", "cpd"])
def test_resume_is_bitwise_equal(tmp_path, criterion):
    torch.use_deterministic_algorithms(True)
    try:
        p, opt = _setup(criterion)
        _train(p, opt, 0, 6)
        want_mask = p.mask.clone()
        want = {k: v.clone() for k, v in p.student.state_dict().items()}

        p, opt = _setup(criterion)
        _train(p, opt, 0, 3)  # stop mid-interval: accumulated scores must survive
        path = tmp_path / "ckpt.pt"
        save_checkpoint(path, {"student": p.student.state_dict(), "optimizer": opt.state_dict(),
                               "pruner": p.state_dict()})
        del p, opt
        torch.manual_seed(1234)  # a different RNG state: the checkpoint must restore it
        p, opt = _setup(criterion)
        state = load_checkpoint(path)
        p.student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        p.load_state_dict(state["pruner"])
        assert p.step_count == 3 and p.removals == 1
        _train(p, opt, 3, 6)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(p.mask, want_mask) and (~want_mask).any()
    got = p.student.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_save_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})  # cannot be pickled
    assert load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path) == {"step": 3}
