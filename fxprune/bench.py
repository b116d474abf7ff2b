"""Model-level latency the way deployments run it: eager, ``torch.compile``, onnxruntime.

``measure_model_latency({"original": m, "pruned": p}, (x,), backend="onnxruntime")``
times whole forwards of several models *interleaved* (repeat ``r`` runs every model once,
in an order rotated each repeat) so that load on a shared machine hits them alike, and
reports the median and the inter-quartile range (IQR) in milliseconds.
``bench_pruning`` prunes a model and tabulates latency before/after at batch 1 and a
throughput batch, with speedup / MAC-reduction per backend.

Backends: ``"eager"`` (the module itself, ``torch.inference_mode``), ``"compile"``
(``torch.compile``, inductor: needs a C compiler), ``"onnxruntime"`` (``torch.onnx``
export, CPU execution provider: needs the ``onnx`` extra). A backend that cannot run
raises ``BackendUnavailableError`` naming what to install.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fxprune.core.errors import BackendUnavailableError, FxpruneError

__all__ = ["BACKENDS", "LatencyStats", "measure_model_latency", "bench_pruning",
           "BenchRow", "prepare_backend", "faster_memory_format"]

BACKENDS = ("eager", "compile", "onnxruntime")


@dataclass(frozen=True)
class LatencyStats:
    """Times of one model's forward on one backend, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (IQR {self.iqr_ms:.2f})"


def _stats(times_ms: Sequence[float]) -> LatencyStats:
    xs = sorted(times_ms)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return LatencyStats(statistics.median(xs), q1, q3, len(xs))


def _require_module(name: str, extra: str, backend: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise BackendUnavailableError(
            f"backend '{backend}' needs the Python package '{name}', which is not installed; "
            f"install it with: pip install 'fxprune[{extra}]'")


def _eager(model: torch.nn.Module, inputs: tuple) -> Callable[[], Any]:
    model = model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(*inputs)

    return run


def _compiled(model: torch.nn.Module, inputs: tuple) -> Callable[[], Any]:
    if shutil.which("gcc") is None and shutil.which("cc") is None and shutil.which("clang") is None:
        raise BackendUnavailableError(
            "backend 'compile' (torch.compile, inductor) needs a C compiler on PATH "
            "(gcc, cc or clang); install one (e.g. apt-get install gcc) or use 'eager'")
    compiled = torch.compile(model.eval(), dynamic=False)
    return _eager(compiled, inputs)


def _onnxruntime(model: torch.nn.Module, inputs: tuple) -> Callable[[], Any]:
    _require_module("onnxruntime", "onnx", "onnxruntime")
    _require_module("onnx", "onnx", "onnxruntime")
    import onnxruntime as ort

    buf = io.BytesIO()
    names = [f"input_{i}" for i in range(len(inputs))]
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # its failure prints the IR
            torch.onnx.export(model.eval(), tuple(inputs), buf, input_names=names,
                              dynamo=False, opset_version=17)
        payload = buf.getvalue()
    except Exception as exc:  # the exporter's errors are untyped
        payload = _export_fallback(model, inputs, exc)
        names = None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # each session's pool spin-waits after a run; with several sessions measured in turn,
    # the waiting pools take the cores of the one running: on this 2-core machine
    # ResNet-50 measured 42-50 ms (IQR 11-36) spinning against 23.5-23.9 ms (IQR 0.6-0.9)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])
    names = names or [i.name for i in session.get_inputs()]
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}

    def run() -> Any:
        return session.run(None, feed)

    return run


def _export_fallback(model: torch.nn.Module, inputs: tuple, first: BaseException) -> bytes:
    """The deployment exporter (``fxprune.deploy.export_onnx``: dynamo, then legacy) where
    the TorchScript exporter fails (torchvision's fused MultiheadAttention); announced."""
    import tempfile
    import warnings

    from fxprune.deploy import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(model, inputs, path, dynamic_batch=False)
        except Exception as exc:
            raise FxpruneError(f"backend 'onnxruntime': torch.onnx.export failed "
                               f"({type(first).__name__}: {first}; then {exc}); use 'eager' "
                               f"or 'compile'") from exc
        warnings.warn(f"backend 'onnxruntime': the TorchScript exporter failed on "
                      f"{type(model).__name__} ({type(first).__name__}); measured the "
                      f"fxprune.export_onnx (dynamo) graph instead", stacklevel=3)
        with open(path, "rb") as fh:
            return fh.read()


_PREPARE = {"eager": _eager, "compile": _compiled, "onnxruntime": _onnxruntime}


def prepare_backend(backend: str, model: torch.nn.Module, inputs: tuple) -> Callable[[], Any]:
    """A no-argument callable running ``model(*inputs)`` on ``backend``.

    Raises ``BackendUnavailableError`` for a backend that is not installed (naming the
    extra) and ``ValueError`` for an unknown backend name."""
    if backend not in _PREPARE:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return _PREPARE[backend](model, inputs)


def measure_model_latency(models: Mapping[str, torch.nn.Module], inputs: tuple, *,
                          backend: str = "eager", repeats: int = 20, warmup: int = 3
                          ) -> dict[str, LatencyStats]:
    """Median and IQR (ms) of each model's forward on ``inputs``, measured interleaved.

    Requires: models taking the same ``inputs`` (a tuple of CPU tensors), ``repeats >= 1``.
    Each model is prepared for ``backend`` (compiled / exported once), run ``warmup``
    times, then the models are run in turn ``repeats`` times, the order rotated each
    repeat; all in eval mode, each module's train/eval flag restored afterwards (a bare
    tensor is taken as one input). Raises ``BackendUnavailableError`` (see
    ``prepare_backend``), ``ValueError`` for no models or ``repeats < 1``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not models:
        raise ValueError("measure_model_latency needs at least one model: {name: module}")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    flags = [(m, m.training) for model in models.values() for m in model.modules()]
    try:  # the runners measure in eval mode; each module's own flag is restored after
        runs = {name: prepare_backend(backend, m, inputs) for name, m in models.items()}
        for run in runs.values():
            for _ in range(max(warmup, 1)):  # at least once: compile/JIT happens here
                run()
        names = list(runs)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        for m, flag in flags:
            m.training = flag
    return {n: _stats(times[n]) for n in names}


def faster_memory_format(model: torch.nn.Module, inputs: tuple, *, backend: str = "eager",
                         repeats: int = 10, margin: float = 0.02
                         ) -> tuple[str, dict[str, LatencyStats]]:
    """Which conv-weight layout runs ``model(*inputs)`` faster on ``backend``, measured.

    Returns ``("channels_last" or "contiguous", {layout: LatencyStats})``: both layouts
    (``passes.memory_format.to_channels_last``; ``model`` is not modified) measured
    interleaved; channels-last is chosen only when its median is more than ``margin``
    (a fraction) below the contiguous one, so noise keeps the default. A model that does
    not run channels-last (``check_memory_format`` fails: a ``.view`` of an NHWC
    activation) keeps contiguous, with a warning, and only that layout is measured. Pass the answer to
    ``fxprune.compile(..., memory_format=...)``. Raises ``BackendUnavailableError`` for
    a backend that is not installed."""
    from passes.memory_format import check_memory_format, to_channels_last
    from fxprune.core.errors import VerificationError

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    converted = to_channels_last(model)
    try:
        check_memory_format(model, converted, inputs)
    except VerificationError as e:  # a .view the NHWC strides reject: contiguous it is
        warnings.warn(f"faster_memory_format: channels-last does not run this model, so "
                      f"contiguous is kept ({str(e).splitlines()[0]})", stacklevel=2)
        got = measure_model_latency({"contiguous": model}, inputs, backend=backend,
                                    repeats=repeats)
        return "contiguous", got
    got = measure_model_latency({"contiguous": model, "channels_last": converted},
                                inputs, backend=backend, repeats=repeats)
    faster = got["channels_last"].median_ms < (1 - margin) * got["contiguous"].median_ms
    return ("channels_last" if faster else "contiguous"), got


@dataclass(frozen=True)
class BenchRow:
    """Original vs pruned latency on one backend at one batch size."""

    backend: str
    batch: int
    original: LatencyStats
    pruned: LatencyStats
    mac_reduction: float

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms

    @property
    def ratio(self) -> float:
        """speedup / MAC reduction (1.0: latency follows the MACs)."""
        return self.speedup / self.mac_reduction


def bench_pruning(original: torch.nn.Module, pruned: torch.nn.Module, make_input: Callable[[int], tuple],
                  *, mac_reduction: float, batches: Sequence[int] = (1, 8),
                  backends: Sequence[str] = ("eager",), repeats: int = 10, warmup: int = 2
                  ) -> list[BenchRow]:
    """One ``BenchRow`` per (backend, batch): both models measured interleaved.

    ``make_input(batch)`` gives the input tuple; ``mac_reduction`` = dense / pruned MACs.
    Raises ``BackendUnavailableError`` before measuring anything if a backend is missing."""
    for b in backends:
        if b == "onnxruntime":
            _require_module("onnxruntime", "onnx", b)
            _require_module("onnx", "onnx", b)
        elif b not in _PREPARE:
            raise ValueError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    rows = []
    for backend in backends:
        for batch in batches:
            got = measure_model_latency({"original": original, "pruned": pruned},
                                        make_input(batch), backend=backend,
                                        repeats=repeats, warmup=warmup)
            rows.append(BenchRow(backend, batch, got["original"], got["pruned"], mac_reduction))
    return rows


def rows_table(rows: Sequence[BenchRow]) -> str:
    """The rows as a text table (tabulate)."""
    from tabulate import tabulate

    return tabulate([(r.backend, r.batch, str(r.original), str(r.pruned), f"{r.speedup:.2f}x",
                      f"{r.mac_reduction:.2f}x", f"{r.ratio:.2f}") for r in rows],
                     headers=["backend", "batch", "original", "pruned", "speedup",
                              "MAC reduction", "speedup/MACs"])


def measure_rounding(backend: str = "eager", **kwargs: Any) -> Any:
    """``fxprune.cost.rounding.measure_rounding`` on ``backend`` (``BACKENDS``): the
    channel-count multiple each op kind runs fastest there, measured on this machine.
    Raises ``BackendUnavailableError`` for a backend that is not installed."""
    from fxprune.planning.cost.rounding import measure_rounding as measure

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "compile":  # one torch.compile per op kind and width: minutes
        raise ValueError("measure_rounding does not run on 'compile' (a compile per width); "
                         "measure 'eager' (the kernels inductor calls for convs and matmuls) "
                         "or 'onnxruntime'")
    return measure(backend=backend, runner=lambda layer, inputs: prepare_backend(
        backend, layer, inputs), **kwargs)


def plan_for_measured_latency(model: torch.nn.Module, inputs: tuple,
                              target_ms: float | None = None, *,
                              target_fraction: float | None = None,
                              backend: str = "eager", tolerance: float = 0.05,
                              max_iters: int = 5, repeats: int = 10, scope: str = "global",
                              round_to: int | str = "auto",
                              criterion: str = "l1") -> tuple[Any, Any, float]:
    """(plan, pruned model, measured ms): a plan whose *measured* latency on ``backend``
    is within ``tolerance`` (relative) of ``target_ms`` (milliseconds, one forward of
    ``inputs``). ``target_fraction`` instead asks for that fraction of the dense model's
    latency, measured in the same runs (on a machine whose load changes, an absolute
    target means something else from one minute to the next; a fraction does not).

    Iterates plan (``fxprune.plan(target_latency=fraction)``, the latency table's
    prediction) -> compile -> measure (interleaved with the dense model) -> rescale the
    fraction by target / measured. Each measurement is taken relative to the dense model
    in the same interleaved run and scaled to the dense latency first measured (so a
    machine that gets busier or quieter between runs does not move the answer); the
    returned ms is that figure. Raises ``LatencyTargetError`` with both figures in ms
    when the floor model (every group at one unit or its minimum) measures above
    ``target_ms``; returns the closest plan found after ``max_iters`` otherwise (check the
    measured figure). A fraction below what the latency table's floor allows (its
    prediction can be above the measured floor) is moved halfway back towards the last one
    that planned; ``LatencyTargetError`` when no try planned. ``round_to="auto"``
    (default) rounds kept counts to the multiples ``backend`` runs fastest, measured here
    (``measure_rounding``; eager's multiples for ``"compile"``). ``ValueError`` for a bad
    target, tolerance, ``max_iters`` or backend name, before anything is measured."""
    import fxprune
    from fxprune.core.errors import BudgetError, LatencyTargetError

    if (target_ms is None) == (target_fraction is None):
        raise ValueError("give one of target_ms (milliseconds) or target_fraction (of the "
                         "dense latency)")
    if target_ms is not None and not target_ms > 0:
        raise ValueError(f"target_ms must be > 0 ms, got {target_ms}")
    if target_fraction is not None and not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    if not 0 <= tolerance < 1 or max_iters < 1:
        raise ValueError(f"tolerance must be in [0, 1) and max_iters >= 1, got {tolerance}, "
                         f"{max_iters}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    analysis = fxprune.analyze(model, inputs)
    floor_plan = fxprune.Plan.from_ratio(analysis, 0.999, criterion=criterion)
    floor = fxprune.compile(model, floor_plan).eval()
    got = measure_model_latency({"dense": model, "floor": floor}, inputs, backend=backend,
                                repeats=repeats)
    dense_ms, floor_ms = got["dense"].median_ms, got["floor"].median_ms
    if target_ms is None:
        target_ms = target_fraction * dense_ms
    if floor_ms > target_ms:
        raise LatencyTargetError(
            f"target latency {target_ms:.3f} ms is below what the floor model measures "
            f"({floor_ms:.3f} ms on '{backend}'; dense {dense_ms:.3f} ms); raise the target "
            f"or use a faster backend")
    fraction, best = min(target_ms / dense_ms, 1.0), None
    # rounding is measured per op kind and width; under torch.compile that would be one
    # compile per width (minutes), so compile plans round to eager's multiples (as the CLI)
    rounding = measure_rounding("eager" if backend == "compile" else backend) \
        if round_to == "auto" else None
    reachable = 1.0  # the lowest fraction the latency table's floor was seen to allow
    for _ in range(max_iters):
        try:
            plan = fxprune.plan(analysis, criterion, target_latency=fraction, scope=scope,
                                round_to=round_to, rounding=rounding)
        except BudgetError:
            # below the table's floor (its prediction, not the measurement): halfway back
            # towards the last fraction that planned
            fraction = 0.5 * (fraction + reachable)
            continue
        reachable = min(reachable, fraction)
        pruned = fxprune.compile(model, plan).eval()
        now = measure_model_latency({"dense": model, "pruned": pruned}, inputs, backend=backend,
                                    repeats=repeats)
        # the pruned/dense ratio of this run, at the first run's dense latency: load that
        # changes between runs scales both models and cancels
        ms = now["pruned"].median_ms * dense_ms / now["dense"].median_ms
        if best is None or abs(ms - target_ms) < abs(best[2] - target_ms):
            best = (plan, pruned, ms)
        if abs(ms - target_ms) <= tolerance * target_ms:
            break
        fraction = min(max(fraction * target_ms / ms, 1e-3), 1.0)
    if best is None:
        raise LatencyTargetError(
            f"target latency {target_ms:.3f} ms: no plan in {max_iters} tries (the latency "
            f"table's floor is above every fraction tried; floor model measured "
            f"{floor_ms:.3f} ms on '{backend}', dense {dense_ms:.3f} ms); raise the target "
            f"or max_iters")
    return best
