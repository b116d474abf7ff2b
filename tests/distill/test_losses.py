"""Distillation losses against hand computations."""
import math

import pytest
import torch

from fxprune.distill.losses import cwd_loss, feature_loss, kd_loss, mixed_kd_loss
from fxprune.core.errors import DistillLossError, FxpruneError


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    T = 2.0
    want = sum(_kl(_softmax(t[i].tolist(), T), _softmax(s[i].tolist(), T)) for i in range(2))
    want = want / 2 * T * T
    assert kd_loss(s, t, temperature=T).item() == pytest.approx(want, rel=1e-12)
    assert kd_loss(t, t, temperature=T).item() == pytest.approx(0.0, abs=1e-12)


def test_mixed_kd_weights_task_and_kd():
    s = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randn(4, 5, dtype=torch.float64)
    task = torch.tensor(1.5, dtype=torch.float64)
    kd = kd_loss(s, t, temperature=3.0)
    got = mixed_kd_loss(task, s, t, alpha=0.25, temperature=3.0)
    assert got.item() == pytest.approx(0.75 * 1.5 + 0.25 * kd.item(), rel=1e-12)


def test_cwd_matches_hand_computation():
    # N=1, C=2, 1x3 maps: each channel is a distribution over 3 positions.
    s = torch.tensor([[[[0.0, 1.0, 2.0]], [[1.0, 1.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[2.0, 1.0, 0.0]], [[0.5, 0.0, 0.0]]]], dtype=torch.float64)
    T = 1.5
    kl = sum(_kl(_softmax(t[0, c, 0].tolist(), T), _softmax(s[0, c, 0].tolist(), T))
             for c in range(2))
    assert cwd_loss(s, t, temperature=T).item() == pytest.approx(kl * T * T / (1 * 2), rel=1e-12)


def test_cwd_normalises_by_n_times_c():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    y = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    one = cwd_loss(x, y)
    rep = cwd_loss(x.repeat(3, 2, 1, 1), y.repeat(3, 2, 1, 1))
    assert rep.item() == pytest.approx(one.item(), rel=1e-12)


def test_feature_losses():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    assert feature_loss(s, t, kind="mse").item() == pytest.approx((1 + 1 + 1 + 4) / 4)
    want = ((1 - 24 / 25) + (1 - 0.0)) / 2
    assert feature_loss(s, t, kind="cosine").item() == pytest.approx(want, rel=1e-12)


def test_gradients_reach_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(bad):
    with pytest.raises(DistillLossError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=bad)
    with pytest.raises(DistillLossError, match="temperature"):
        cwd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), temperature=bad)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bad_alpha(alpha):
    with pytest.raises(DistillLossError, match="alpha"):
        mixed_kd_loss(torch.tensor(0.0), torch.zeros(2, 3), torch.zeros(2, 3), alpha=alpha)


def test_mismatched_outputs():
    with pytest.raises(DistillLossError, match="differ") as info:
        kd_loss(torch.zeros(2, 10), torch.zeros(2, 100))
    assert isinstance(info.value, FxpruneError)
    with pytest.raises(DistillLossError, match="not a tensor"):
        feature_loss(torch.zeros(2, 3), {"x": torch.zeros(2, 3)})
    with pytest.raises(DistillLossError, match="kind"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="l7")


def test_pixel_kd_is_the_mean_of_per_pixel_kd():
    # [N, K, H, W] logits, class dim 1: the KL at every pixel, averaged over N*H*W pixels;
    # fit(loss="kd") uses this for dense prediction (benchmarks/distill_seg.py)
    from fxprune.distill.fit import distillation_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g)
    t = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g)
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    want = kd_loss(flat(s), flat(t), temperature=3.0)
    assert kd_loss(s, t, temperature=3.0, dim=1).item() == pytest.approx(want.item(), rel=1e-12)
    y = torch.zeros(2, 3, 4, dtype=torch.long)
    got = distillation_loss("kd", s, t, y, alpha=1.0, temperature=3.0, task_loss=None)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
