"""Backend-aware rounding: which channel counts a backend runs fastest, measured here.

CPU kernels (oneDNN, MLAS, MKL) vectorise over channels: a count that is a multiple of
the vector width (8 floats for AVX2, 16 for AVX-512) or of a kernel's block size avoids
a scalar tail, so "64 channels" can run faster per MAC than "61". How much, and for
which multiple, depends on the op, the backend and the machine, so fxprune measures it
rather than assuming it:

    table = measure_rounding()                    # eager, this machine, ~5 s, cached
    table.multiples                               # e.g. {"conv": 8, "linear": 16, ...}
    plan = fxprune.plan(analysis, "l1", target_latency=0.5)   # round_to="auto" default
    plan = fxprune.plan(analysis, "l1", ratio=0.5, round_to="auto", rounding=table)

For every op kind (``OP_KINDS``) one layer whose input and output widths are ``c`` is
timed for each ``c`` in ``counts`` (interleaved: every repeat visits every count in a
fresh random order, so a load spike hits all counts alike; the median per count is
kept). Efficiency is time per MAC, divided by a power-law trend fitted over the widths
(wider layers are more efficient per MAC whatever their alignment). For a candidate
multiple ``m`` the *gain* is the mean of that residual over widths that are not
multiples of ``m``, over its mean over widths that are, minus one: how much more a
misaligned width costs per MAC. Per kind the table keeps the smallest multiple whose gain
no larger candidate beats by ``threshold`` (a larger multiple must buy at least that
much more), and 1 where no gain reaches ``threshold`` (rounding buys nothing measurable).

A group's multiple (``auto_round_to``) is the largest multiple of the kinds of the
weights it slices (a conv's output and the next conv's input share one group), capped
so that the group can still lose units (``size >= 2 * multiple``); attention-head groups
(granularity > 1) are counted in heads and keep ``1``.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fxprune.core.groups import ChannelGroup, GroupAnalysis

__all__ = ["OP_KINDS", "CANDIDATES", "RoundingTable", "measure_rounding", "weight_kind",
           "auto_round_to"]

#: op kinds timed, with the layer and input built for a width ``c``
OP_KINDS = ("conv", "conv1x1", "depthwise", "linear")
#: candidate multiples
CANDIDATES = (2, 4, 8, 16, 32)

Runner = Callable[[torch.nn.Module, tuple], Callable[[], Any]]


def _layer(kind: str, c: int) -> tuple[torch.nn.Module, tuple, int]:
    """(layer, inputs, MACs) for width ``c``: shapes of a mid-network ResNet / MobileNet
    stage (28x28 convs, a 56x56 depthwise conv) and of a ViT-B/16 token matrix."""
    if kind == "conv":
        return torch.nn.Conv2d(c, c, 3, padding=1, bias=False), (torch.randn(1, c, 28, 28),), \
            c * c * 9 * 28 * 28
    if kind == "conv1x1":
        return torch.nn.Conv2d(c, c, 1, bias=False), (torch.randn(1, c, 28, 28),), c * c * 28 * 28
    if kind == "depthwise":
        return torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), \
            (torch.randn(1, c, 56, 56),), c * 9 * 56 * 56
    if kind == "linear":
        return torch.nn.Linear(c, c), (torch.randn(197, c),), 197 * c * c
    raise ValueError(f"unknown op kind {kind!r}; choose from {', '.join(OP_KINDS)}")


def _eager(model: torch.nn.Module, inputs: tuple) -> Callable[[], Any]:
    model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(*inputs)
    return run


@dataclass(frozen=True)
class RoundingTable:
    """Per op kind: the multiple to round kept counts to (``multiples``), the measured
    gain of every candidate (``gains``: fraction, 0.08 = non-multiples cost 8% more per
    MAC) and the median time per count (``times_ms``, milliseconds), on ``backend`` with
    ``threads`` intra-op threads."""

    backend: str
    threads: int
    multiples: dict[str, int]
    gains: dict[str, dict[int, float]] = field(default_factory=dict)
    times_ms: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"backend": self.backend, "threads": self.threads,
                           "multiples": self.multiples, "gains": self.gains,
                           "times_ms": self.times_ms})

    @classmethod
    def from_json(cls, text: str) -> "RoundingTable":
        d = json.loads(text)
        as_int = lambda m: {int(k): float(v) for k, v in m.items()}  # noqa: E731
        return cls(d["backend"], int(d["threads"]), {k: int(v) for k, v in d["multiples"].items()},
                   {k: as_int(v) for k, v in d["gains"].items()},
                   {k: as_int(v) for k, v in d["times_ms"].items()})

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(kind, self.multiples[kind], *(f"{self.gains.get(kind, {}).get(m, 0.0):+.1%}"
                                              for m in CANDIDATES)) for kind in self.multiples]
        return tabulate(rows, headers=["op kind", "multiple", *(f"gain x{m}" for m in CANDIDATES)])


_CACHE: dict[tuple, RoundingTable] = {}


def measure_rounding(kinds: Sequence[str] = OP_KINDS, *, counts: Iterable[int] = range(48, 97),
                     repeats: int = 15, threshold: float = 0.05, backend: str = "eager",
                     runner: Runner | None = None, timer: Callable[[str, int], float] | None = None,
                     seed: int = 0, cache: bool = True) -> RoundingTable:
    """Measure which channel-count multiple each op kind runs fastest (module docstring).

    ``runner(layer, inputs) -> run()`` prepares a backend (default: eager PyTorch under
    ``inference_mode``; ``fxprune.bench.measure_rounding`` passes onnxruntime's);
    ``timer(kind, c) -> ms`` replaces the measurement (tests). ``counts`` must span at
    least the largest candidate. Cached per arguments, backend and
    thread count when ``cache``. Raises ``ValueError`` on an unknown kind or too few counts.
    """
    counts = sorted(set(int(c) for c in counts))
    if not counts or counts[-1] - counts[0] < max(CANDIDATES):
        raise ValueError(f"counts must span at least {max(CANDIDATES)} widths, got "
                         f"{counts[:1]}..{counts[-1:]}")
    unknown = [k for k in kinds if k not in OP_KINDS]
    if unknown:
        raise ValueError(f"unknown op kind {unknown[0]!r}; choose from {', '.join(OP_KINDS)}")
    threads = torch.get_num_threads()
    key = (tuple(kinds), tuple(counts), repeats, threshold, backend, threads, seed)
    if cache and timer is None and key in _CACHE:
        return _CACHE[key]
    times: dict[str, dict[int, float]] = {}
    for kind in kinds:
        times[kind] = _median_times(kind, counts, repeats, runner or _eager, timer, seed)
    gains = {kind: {m: _gain(kind, times[kind], m) for m in CANDIDATES} for kind in kinds}
    multiples = {}
    for kind in kinds:  # a larger multiple must buy ``threshold`` more than a smaller one
        best, best_gain = 1, 0.0
        for m in CANDIDATES:
            if gains[kind][m] >= best_gain + threshold:
                best, best_gain = m, gains[kind][m]
        multiples[kind] = best
    table = RoundingTable(backend, threads, multiples, gains, times)
    if cache and timer is None:
        _CACHE[key] = table
    return table


def _median_times(kind: str, counts: list[int], repeats: int, runner: Runner,
                  timer: Callable[[str, int], float] | None, seed: int) -> dict[int, float]:
    if timer is not None:
        return {c: float(timer(kind, c)) for c in counts}
    runs = {}
    for c in counts:
        layer, inputs, _ = _layer(kind, c)
        run = runner(layer, inputs)
        run()  # warm-up (first-call allocations, onnxruntime session set-up)
        runs[c] = run
    samples: dict[int, list[float]] = {c: [] for c in counts}
    order = list(counts)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for c in order:
            start = time.perf_counter()
            runs[c]()
            samples[c].append((time.perf_counter() - start) * 1e3)
    return {c: statistics.median(s) for c, s in samples.items()}


def _gain(kind: str, times: Mapping[int, float], m: int) -> float:
    """How much more a width that is no multiple of ``m`` costs per MAC than one that is,
    after dividing out the size trend (a power law fitted to time per MAC over width:
    wider layers are more efficient anyway)."""
    cs = sorted(times)
    eff = np.array([times[c] / _layer_macs(kind, c) for c in cs])
    x = np.log(np.array(cs, dtype=float))
    slope, intercept = np.polyfit(x, np.log(eff), 1)
    residual = eff / np.exp(intercept + slope * x)
    on = [r for c, r in zip(cs, residual) if c % m == 0]
    off = [r for c, r in zip(cs, residual) if c % m]
    if not on or not off:
        return 0.0
    # means, not medians: with m = 8 where 16 is what is fast, half the multiples of 8
    # are slow, and the mean shows it
    return float(np.mean(off) / np.mean(on) - 1.0)


def _layer_macs(kind: str, c: int) -> int:
    return {"conv": c * c * 9, "conv1x1": c * c, "depthwise": c * 9, "linear": c * c}[kind]


def weight_kind(shape: Sequence[int]) -> str | None:
    """The op kind of a weight from its shape: 2-D -> linear; ``(O, 1, kh, kw)`` with
    ``O > 1`` -> depthwise; ``(O, I, 1, 1)`` -> conv1x1; other 3-D/4-D/5-D -> conv;
    1-D (norm scales, biases) -> None."""
    if len(shape) == 2:
        return "linear"
    if len(shape) >= 3:
        if shape[1] == 1 and shape[0] > 1 and len(shape) == 4:
            return "depthwise"
        if all(k == 1 for k in shape[2:]):
            return "conv1x1"
        return "conv"
    return None


def auto_round_to(analysis: GroupAnalysis, table: RoundingTable) -> dict[str, int]:
    """Per group name: the multiple its kept count rounds to (module docstring)."""
    shapes = {n: tuple(t.shape) for n, t in analysis.gm.named_parameters(remove_duplicate=False)}
    shapes.update({n: tuple(t.shape) for n, t in analysis.gm.named_buffers(remove_duplicate=False)})
    return {g.name: _group_multiple(g, shapes, table) for g in analysis.groups}


def _group_multiple(group: ChannelGroup, shapes: Mapping[str, tuple], table: RoundingTable) -> int:
    if group.granularity > 1:
        return 1
    kinds = {weight_kind(shapes[m.fqn]) for m in group.members if m.fqn in shapes}
    m = max((table.multiples.get(k, 1) for k in kinds if k), default=1)
    while m > 1 and group.size < 2 * m:
        m //= 2
    return max(m, 1)
