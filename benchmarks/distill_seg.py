"""Prune while training with KD for dense prediction: part (c), digit-canvas segmentation.

    PYTHONPATH=$PWD python benchmarks/distill_seg.py            # 5 seeds, 2x fewer MACs
    PYTHONPATH=$PWD python benchmarks/distill_seg.py --quick    # 1 seed, a few steps (CI)

Data: the digits of ``sklearn.datasets.load_digits`` with part (a)'s fixed stratified
75/25 split (``distill.load_data``), so test canvases hold only test digits. A canvas is
``--canvas`` x ``--canvas`` pixels (default 32) with 2 to ``--most`` (default 4) digits at
their native 8x8 (``--scale 2``: upscaled bilinearly to 16x16), pasted at random
non-overlapping positions; a pixel's label is ``digit + 1`` where that
digit's intensity is above ``THRESHOLD``, else 0 (background): 11 classes. Training
canvases come from a per-seed generator; the test canvases are one fixed set (generator
seed ``TEST_SEED``) shared by every seed and method.

Model: a small encoder-decoder (``SegNet``) with BatchNorm, two stride-2 downsamplings, an
``interpolate`` + concat skip and a ``ConvTranspose2d`` + add skip, per-pixel logits
``[N, 11, H, W]``; the dense teacher is trained from scratch per seed (AdamW, cosine
schedule: SGD, part (a)'s optimizer, reached 13% mIoU in 400 steps where AdamW reached
38%). At ``--factor`` fewer MACs every method then gets the same ``--steps`` steps of
prune while training (``cpd``, cubic schedule, budget reached at half the steps, as in
part (a)):

  (iii) no KD (cross-entropy only)
  (iv)  + vanilla pixel-wise KD (KL over the class dim at every pixel)
  (vi)  + channel-wise distillation (Shu et al. 2021) on the logits

with one fixed ``alpha`` = 0.7 and temperature 4 for both KD losses (part (a)'s values,
chosen before any run). mIoU: one confusion matrix over all test pixels; IoU per class
= TP / (TP + FP + FN), mean over the 11 classes (background included); a class absent
from both labels and predictions would be left out of the mean (it never happens on the
default test set: every class is present). Reported: mIoU, pixel accuracy, MACs, params,
the max error of the compiled model against the gated student (``finish()``), mean ± std
over seeds, and the wall time.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill  # noqa: E402  (benchmarks/distill.py: data split, batches, training, tables)

import fxprune  # noqa: E402

CLASSES = 11
THRESHOLD = 0.25  # of the 0..1 intensity of the upscaled digit
TEST_SEED = 12345


class SegNet(nn.Module):
    """Encoder (full, 1/2, 1/4 resolution) and decoder with a concat and an add skip."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.enc1 = nn.Sequential(block(1, w), block(w, w))
        self.enc2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w))
        self.enc3 = nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w))
        self.dec2 = block(6 * w, 2 * w)  # after interpolate x2 + concat with enc2
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)  # then add enc1
        self.dec1 = nn.Sequential(nn.BatchNorm2d(w), nn.ReLU(), block(w, w))
        self.head = nn.Conv2d(w, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        up = F.interpolate(e3, scale_factor=2.0, mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up, e2], 1))
        d1 = self.dec1(self.up1(d2) + e1)
        return self.head(d1)


def canvases(digits: torch.Tensor, labels: torch.Tensor, count: int, size: int, seed: int,
             scale: int = 2, most: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` canvases ``[count, 1, size, size]`` and their pixel labels ``[count, size, size]``."""
    gen = torch.Generator().manual_seed(seed)
    big = digits if scale == 1 else F.interpolate(digits, scale_factor=float(scale),
                                                  mode="bilinear", align_corners=False)
    big = big.clamp(0.0, 1.0)[:, 0]
    d = big.shape[-1]
    x = torch.zeros(count, 1, size, size)
    y = torch.zeros(count, size, size, dtype=torch.long)
    for i in range(count):
        boxes = _boxes(int(torch.randint(2, most + 1, (), generator=gen)), size, d, gen)
        for r, c in boxes:
            k = int(torch.randint(0, len(big), (), generator=gen))
            x[i, 0, r:r + d, c:c + d] = big[k]
            y[i, r:r + d, c:c + d][big[k] > THRESHOLD] = int(labels[k]) + 1
    return x, y


def _boxes(want: int, size: int, d: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``want`` top-left corners of non-overlapping ``d`` x ``d`` boxes (rejection sampling)."""
    boxes: list[tuple[int, int]] = []
    tries = 0
    while len(boxes) < want:
        r, c = (int(v) for v in torch.randint(0, size - d + 1, (2,), generator=gen))
        if all(abs(r - r0) >= d or abs(c - c0) >= d for r0, c0 in boxes):
            boxes.append((r, c))
        tries += 1
        if tries % 200 == 0:  # a crowded start: begin again
            boxes = []
    return boxes


def load_canvases(args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, ...]:
    """Training canvases of the seed (train digits), the fixed test canvases (test digits)."""
    xtr, ytr, xte, yte = distill.load_data()
    shape = dict(size=args.canvas, scale=args.scale, most=args.most)
    train = canvases(xtr, ytr, args.train_canvases, seed=seed, **shape)
    test = canvases(xte, yte, args.test_canvases, seed=TEST_SEED, **shape)
    return train + test


@torch.no_grad()
def segmentation_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        batch: int = 128) -> tuple[float, float]:
    """(mIoU %, pixel accuracy %) over all pixels of ``x`` (see the module docstring)."""
    model.eval()
    pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    confusion = torch.bincount(y.flatten() * CLASSES + pred.flatten(),
                               minlength=CLASSES * CLASSES).reshape(CLASSES, CLASSES).double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    miou = float((tp[present] / union[present]).mean()) * 100
    return miou, float(tp.sum() / confusion.sum()) * 100


METHODS = ("(iii) PWT cpd", "(iv) PWT cpd + pixel KD", "(vi) PWT cpd + CWD")
LOSS_OF = dict(zip(METHODS, ("task", "kd", "cwd")))
METHOD_KEYS = dict(zip(("pwt", "pwt-kd", "pwt-cwd"), METHODS))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rows: dict[str, list[tuple[float, ...]]] = {}
    dense_rows = []
    for seed in range(args.seeds):
        xtr, ytr, xte, yte = load_canvases(args, seed)
        torch.manual_seed(seed)
        dense = SegNet(args.width)
        distill.train(dense, distill.Batches(xtr, ytr, args.batch, seed), args.pretrain, args.lr,
                      args.optimizer)
        dense.eval()
        example = xtr[:2]
        analysis = fxprune.analyze(dense, (example,))
        from fxprune.planning.cost import compute_cost
        cost = compute_cost(analysis)  # MACs of a batch of 2: halve for per sample
        dense_rows.append(segmentation_scores(dense, xte, yte) + (
            cost.dense.macs / 2, distill.count(dense)))
        for name in [METHOD_KEYS[k] for k in args.method]:
            torch.manual_seed(1000 + seed)
            data = distill.Batches(xtr, ytr, args.batch, 1000 + seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                result = distill.while_training(dense, LOSS_OF[name], 1.0 / args.factor, data,
                                                example, args.steps, args.lr_ft, args.interval,
                                                kind=args.optimizer)
            if not result.report.ok:
                raise fxprune.VerificationError(f"{name}, seed {seed}: slice != mask")
            rows.setdefault(name, []).append(segmentation_scores(result.model, xte, yte) + (
                result.macs / 2, distill.count(result.model), result.student_max_err))
    return {"dense": dense_rows, "rows": rows}


def report(result: dict, args: argparse.Namespace, wall: float) -> str:
    from tabulate import tabulate

    def line(name: str, factor: str, rs: list) -> list[str]:
        err = f"{max(r[4] for r in rs):.1e}" if len(rs[0]) > 4 else "-"
        return [name, factor, distill._ms([r[0] for r in rs], ".2f"),
                distill._ms([r[1] for r in rs], ".2f"), distill._ms([r[2] for r in rs], ",.0f"),
                distill._ms([r[3] for r in rs], ",.0f"), err]

    table = [line("dense", "1x", result["dense"])]
    table += [line(name, f"{args.factor:g}x", rs) for name, rs in result["rows"].items()]
    head = (f"digit canvases {args.canvas}x{args.canvas}: {args.seeds} seed(s), "
            f"{args.train_canvases} train / {args.test_canvases} test canvases, 2-{args.most} "
            f"digits at {args.scale}x, {args.optimizer} lr {args.lr:g} / {args.lr_ft:g}, pretrain "
            f"{args.pretrain} steps, {args.steps} steps per method, batch {args.batch}, width "
            f"{args.width}, KD alpha 0.7 T 4; wall {wall:.1f} s\n")
    return head + tabulate(table, headers=["method", "fewer MACs", "mIoU %", "pixel acc %",
                                           "MACs/sample", "params", "max err vs student"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, a few steps (CI)")
    distill.training_arguments(ap, pretrain=800, steps=250, batch=16, width=16, lr=5e-3,
                               lr_ft=1e-3, methods=METHOD_KEYS)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--canvas", type=int, default=32)
    ap.add_argument("--scale", type=int, default=1, help="2: digits upscaled to 16x16")
    ap.add_argument("--most", type=int, default=4, help="2 to this many digits per canvas")
    ap.add_argument("--train-canvases", type=int, default=1024)
    ap.add_argument("--test-canvases", type=int, default=256)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.pretrain, args.steps, args.interval = 1, 10, 6, 2
        args.width, args.train_canvases, args.test_canvases, args.threads = 8, 64, 32, 1
    return args


def main(argv: list[str] | None = None) -> str:
    return distill.timed_main(argv, parse, run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
