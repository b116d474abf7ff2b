"""Reproducers from the trial19 user review (one per finding, tiny models).

Each is a strict xfail: it fails on the code it was written against, and an XPASS (the
fix landed) fails the run so that the marker is removed with the fix.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.errors import FxpruneError


class ViewsBatchTimesChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        n, c, h, w = y.shape
        return self.fc(y.view(n * c, h * w).amax(1).view(n, c))


def test_channels_last_module_is_checked_beyond_batch_one():
    torch.manual_seed(0)
    model, x = ViewsBatchTimesChannels().eval(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    try:
        small = fxprune.compile(model, plan, output="module", memory_format="channels_last")
    except FxpruneError:
        return  # refused at compile time, naming the line: fine
    small(torch.randn(2, 3, 8, 8))  # accepted: then it must run at another batch size


class StridedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


class FunctionalConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        y = torch.relu(nn.functional.conv2d(x, self.w1, padding=1))
        return nn.functional.conv2d(y, self.w2, padding=1).mean((2, 3))


def test_channels_last_converts_or_announces_functional_conv_weights():
    torch.manual_seed(0)
    model, x = FunctionalConvs().eval(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxprune.compile(model, plan, memory_format="channels_last")
    converted = small.w1.is_contiguous(memory_format=torch.channels_last) and \
        not small.w1.is_contiguous()
    assert converted or any("channels" in str(w.message) for w in caught)


def test_measure_model_latency_leaves_the_training_flag():
    from fxprune.bench import measure_model_latency

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    measure_model_latency({"m": model}, (torch.randn(1, 3, 8, 8),), repeats=1, warmup=0)
    assert model.training


def test_from_ratio_round_to_auto_is_typed():
    model, x = StridedConvs().eval(), torch.randn(1, 3, 16, 16)
    analysis = fxprune.analyze(model, (x,))
    try:
        fxprune.Plan.from_ratio(analysis, 0.5, round_to="auto")
    except FxpruneError:
        pass


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--batch", "0"]])
def test_cli_bench_rejects_bad_counts_up_front(bad, capsys):
    pytest.importorskip("torchvision")
    from fxprune.cli import main

    try:
        rc = main(["bench", "torchvision:resnet18", "--input-shape", "1,3,16,16",
                   "--batch", "1", "--repeats", "1", *bad])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2
