"""benchmarks/distill_seg.py: the digit canvases and the mIoU it reports."""
import pytest
import torch

from tests.distill._distill_models import load_benchmark

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def seg():
    return load_benchmark("distill_seg")


def test_canvases_are_seeded_and_labelled_where_the_digit_is(seg):
    args = seg.parse(["--train-canvases", "16", "--test-canvases", "8"])
    xtr, ytr, xte, yte = seg.load_canvases(args, seed=0)
    again = seg.load_canvases(args, seed=0)
    other = seg.load_canvases(args, seed=1)
    assert all(torch.equal(a, b) for a, b in zip((xtr, ytr, xte, yte), again))
    assert not torch.equal(xtr, other[0])  # training canvases: per seed
    assert torch.equal(xte, other[2]) and torch.equal(yte, other[3])  # test set: fixed
    assert xtr.shape == (16, 1, 32, 32) and ytr.shape == (16, 32, 32)
    assert int(ytr.min()) >= 0 and int(ytr.max()) < seg.CLASSES
    # non-overlapping digits: labelled exactly where the intensity is above the threshold
    assert torch.equal(ytr > 0, xtr[:, 0] > seg.THRESHOLD)


def test_canvases_use_only_the_digits_given(seg):
    import distill  # on sys.path through benchmarks/distill_seg.py

    _, _, x, y = distill.load_data()
    three = torch.nonzero(y == 3)[:5, 0]
    for scale in (1, 2):
        images, labels = seg.canvases(x[three], y[three], 6, 40, seed=0, scale=scale, most=3)
        assert set(labels.unique().tolist()) == {0, 4}  # digit 3 is class 4; 0 background
        assert (images > 0).any(dim=(1, 2, 3)).all()


class _Fixed(torch.nn.Module):
    def __init__(self, pred):
        super().__init__()
        self.pred = pred

    def forward(self, x):
        return torch.nn.functional.one_hot(self.pred, 11).permute(0, 3, 1, 2).float()


def test_miou_over_present_classes_matches_hand_computation(seg):
    y = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 2]]])
    miou, acc = seg.segmentation_scores(_Fixed(pred), torch.zeros(1, 1, 1, 4), y)
    # class 0: tp 1, union 2; class 1: tp 1, union 3; class 2: tp 0, union 1; 8 absent
    assert miou == pytest.approx(100 * (1 / 2 + 1 / 3 + 0) / 3)
    assert acc == pytest.approx(50.0)
    perfect, _ = seg.segmentation_scores(_Fixed(y), torch.zeros(1, 1, 1, 4), y)
    assert perfect == pytest.approx(100.0)
