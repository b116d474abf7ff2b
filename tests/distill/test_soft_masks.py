"""selection="soft" (ViT-Slim learnable soft masks): masks, penalty, removal, fold, resume."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.distill import Pruner, fit, load_checkpoint, save_checkpoint
from fxprune.core.errors import CheckpointMismatchError, DistillError, SoftMaskFoldError

from tests.distill._distill_models import ResNetlet, batches


class Block(nn.Module):
    """A pre-norm transformer block (separate q/k/v, manual attention) and a linear head."""

    def __init__(self, d: int = 16, heads: int = 4, classes: int = 10, act_q: str = ""):
        super().__init__()
        self.h, self.act_q = heads, act_q
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        b, n, d = x.shape
        y = self.ln1(x)
        q = F.gelu(self.q(y)) if self.act_q == "gelu" else self.q(y)
        q = q.view(b, n, self.h, d // self.h).transpose(1, 2)
        k = q if self.act_q == "tied" else self.k(y).view(b, n, self.h, d // self.h).transpose(1, 2)
        v = self.v(y).view(b, n, self.h, d // self.h).transpose(1, 2)
        a = (q @ k.transpose(-2, -1) * (d // self.h) ** -0.5).softmax(-1)
        x = x + self.o((a @ v).transpose(1, 2).reshape(b, n, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def _tokens(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


MODELS = {"cnn": (ResNetlet, batches), "block": (Block, _tokens)}


def _pruner(name="cnn", frontend="fx", **kw):
    torch.manual_seed(0)
    make, data = MODELS[name]
    kw.setdefault("target_macs", 0.5)
    kw.setdefault("interval", 2)
    kw.setdefault("steps", 4)
    kw.setdefault("l1", 1e-2)
    return Pruner(make(), (data(1)[0][0],), selection="soft", frontend=frontend, **kw), data


def _scramble(p, seed=0):
    """Soft masks far from 1 (as after training), so that a missed fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.student.soft_mask.copy_(torch.rand(len(p.student.soft_mask), generator=g) * 1.5 + 0.2)


def test_masks_are_parameters_and_multiply_the_gates():
    p, data = _pruner()
    m = p.student.soft_mask
    assert p.mask_parameters() == [m] and any(q is m for q in p.student.parameters())
    assert all(q is not m for q in p.weight_parameters())
    assert len(p.weight_parameters()) == len(list(p.student.parameters())) - 1
    assert torch.equal(m.detach(), torch.ones_like(m))
    x = data(1)[0][0]
    p.student.eval()
    units = torch.as_tensor(p.analysis.group_of == 0)
    with torch.no_grad():
        m[units] = 0.0  # soft 0 computes what hard 0 computes
        soft_zero = p.student(x)
        m.fill_(1.0)
        p.student.mask[units] = 0.0
        hard_zero = p.student(x)
        p.student.mask.fill_(1.0)
        dense = p.student(x)
    assert torch.equal(soft_zero, hard_zero) and not torch.allclose(soft_zero, dense)
    _scramble(p)
    live = p._soft_live.float()
    assert p.penalty().item() == pytest.approx(1e-2 * (m.abs() * live).sum().item(), rel=1e-6)


def test_smallest_masks_are_removed():
    p, data = _pruner(interval=1, steps=2)
    _scramble(p, seed=1)
    want = p.student.soft_mask.detach().abs().clone()
    opt = torch.optim.SGD(p.student.parameters(), lr=0.0)  # masks stay as set
    fit(p, data(1), opt, steps=1, progress=False, loss="task")
    removed = ~p.mask
    assert removed.any()
    for g in p.analysis.groups:
        units = torch.as_tensor(p.analysis.group_of == g.id)
        gone, kept = want[units & removed], want[units & p.mask]
        if len(gone) and len(kept):
            assert gone.max() < kept.min(), g.name


def test_removed_masks_get_no_gradient_and_stay_frozen():
    p, data = _pruner(interval=1, steps=2)
    opt = torch.optim.SGD(p.student.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    batch = data(3)
    fit(p, batch[:1], opt, steps=1, progress=False, loss="task")
    gone = ~p.mask
    assert gone.any()
    frozen = p.student.soft_mask.detach()[gone].clone()
    for x, y in batch:
        loss = F.cross_entropy(p.student(x), y) + p.penalty()
        opt.zero_grad()
        loss.backward()
        grad = p.student.soft_mask.grad
        assert torch.equal(grad[gone], torch.zeros_like(grad[gone]))  # no gradient reaches them
        assert grad[p.mask].abs().sum() > 0
        opt.step()  # momentum and weight decay move them...
        p.step()    # ...and the pruner puts them back
        assert torch.equal(p.student.soft_mask.detach()[gone], frozen)


def test_fit_adds_the_penalty():
    p, data = _pruner(interval=8, steps=8, l1=0.5)  # no removal within 3 steps
    opt = torch.optim.SGD([{"params": p.weight_parameters(), "lr": 0.0},
                           {"params": p.mask_parameters(), "lr": 0.1}])
    fit(p, data(1), opt, steps=3, progress=False, loss=lambda s, t, y: 0.0 * s.sum())
    m = p.student.soft_mask.detach()
    live = p._soft_live
    assert torch.allclose(m[live], torch.full_like(m[live], 1.0 - 3 * 0.1 * 0.5))
    assert torch.equal(m[~live], torch.ones_like(m[~live]))  # ungated units: not penalised


@pytest.mark.parametrize("name,frontend", [("cnn", "fx"), ("cnn", "export"), ("block", "fx"),
                                           ("block", "export")])
def test_finish_folds_masks_exactly(name, frontend):
    p, data = _pruner(name, frontend)
    kinds = {f.how for f in p.folds}
    assert "columns" in kinds and (name == "cnn" or "rows" in kinds)
    opt = torch.optim.SGD(p.student.parameters(), lr=0.05)
    fit(p, data(2), opt, steps=4, progress=False, loss="kd")
    _scramble(p)
    result = p.finish()
    assert result.report.ok and result.student_max_err < 1e-5 and (~p.mask).any()
    p.folds = ()  # without the fold the compiled model must differ: the check can fail
    with pytest.raises(fxprune.VerificationError, match="differs from the gated student"):
        p.finish()


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("variant,names", [("gelu", "gelu"),       # a nonlinearity before q.k
                                           ("tied", "transpose")])  # q is k: rows would give m^2
def test_unfoldable_mask_is_refused_at_construction(frontend, variant, names):
    torch.manual_seed(0)
    model = Block(act_q=variant)
    with pytest.raises(SoftMaskFoldError, match="not a linear/conv input") as info:
        Pruner(model, (_tokens(1)[0][0],), target_macs=0.5, interval=2, steps=4,
               selection="soft", frontend=frontend)
    assert names in str(info.value) and "Remedy" in str(info.value)
    Pruner(model, (_tokens(1)[0][0],), target_macs=0.5, interval=2, steps=4,
           selection="slimming", frontend=frontend)  # other selections are unaffected


@pytest.mark.parametrize("kw,match", [({"l1": -1.0}, "l1 must be"), ({"l1": float("nan")}, "l1 must"),
                                      ({"criterion": "taylor_gate"}, "ranks units by their learned"),
                                      ({"criterion": "l1"}, "ranks units by their learned")])
def test_bad_arguments(kw, match):
    with pytest.raises(DistillError, match=match):
        _pruner(**kw)


def _train(p, opt, data, start, stop):
    for i in range(start, stop):
        x, y = data[i]
        s = p.student(x)
        with torch.no_grad():
            t = p.teacher(x)
        loss = F.mse_loss(s, t) + F.cross_entropy(s, y) + p.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        p.step()


def _setup():
    p, _ = _pruner(interval=2, steps=6, l1=0.05)
    opt = torch.optim.SGD([{"params": p.weight_parameters()},
                           {"params": p.mask_parameters(), "lr": 0.2}], lr=0.05, momentum=0.9)
    return p, opt


def test_resume_is_bitwise_equal(tmp_path):
    data = batches(6, seed=3)
    torch.use_deterministic_algorithms(True)
    try:
        p, opt = _setup()
        _train(p, opt, data, 0, 6)
        want_mask, want_soft = p.mask.clone(), p.student.soft_mask.detach().clone()
        want = {k: v.clone() for k, v in p.student.state_dict().items()}

        p, opt = _setup()
        _train(p, opt, data, 0, 3)  # stop mid-interval, after a removal
        path = tmp_path / "ckpt.pt"
        save_checkpoint(path, {"student": p.student.state_dict(), "optimizer": opt.state_dict(),
                               "pruner": p.state_dict()})
        state = load_checkpoint(path)
        assert "soft_mask" in state["pruner"] and "soft_frozen" in state["pruner"]
        torch.manual_seed(1234)
        p, opt = _setup()
        p.student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        with torch.no_grad():
            p.student.soft_mask.fill_(7.0)  # the pruner's state alone must restore the masks
        p.load_state_dict(state["pruner"])
        _train(p, opt, data, 3, 6)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(p.mask, want_mask) and (~want_mask).any()
    assert not torch.equal(want_soft, torch.ones_like(want_soft))
    got = p.student.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert p.finish().report.ok


def test_checkpoint_without_soft_masks_is_refused():
    p, _ = _pruner()
    state = p.state_dict()
    del state["soft_mask"]
    with pytest.raises(CheckpointMismatchError, match="soft masks"):
        p.load_state_dict(state)
    scored = Pruner(ResNetlet(), (batches(1)[0][0],), target_macs=0.5, interval=2, steps=4)
    with pytest.raises(CheckpointMismatchError):  # another selection: identity differs
        p.load_state_dict(scored.state_dict())
    assert np.array_equal(p.mask.numpy(), np.ones(p.analysis.num_units, dtype=bool))
