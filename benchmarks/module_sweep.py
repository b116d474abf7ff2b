"""Sweep ``fxprune.compile(model, plan, output="module")`` over the model zoos.

    python benchmarks/module_sweep.py                    # every model (slow)
    python benchmarks/module_sweep.py --family timm      # torchvision | timm | hf
    python benchmarks/module_sweep.py --only resnet18 gpt2
    python benchmarks/module_sweep.py --quick            # 3 models, one per family

Models and inputs come from the zoo tests (imported, not copied): every torchvision
classification model (``tests/zoo/test_torchvision.py``: ``MODELS``, ``model_config``),
the timm list (``tests/zoo/test_timm_zoo.py``: ``ARCHS``, ``make``) and the Hugging Face
factories (``tests/zoo/test_hf.py``: ``MODELS``, ``build``; captured by torch.export).
Per model: analyse, ``Plan.from_ratio(0.3, criterion="random", seed=0)``,
``compile(output="module")``; then, measured here (independently of the check that
``compile`` runs itself):

- ``outcome``: ``ok``; ``ok (attention_scale=recompute)`` where the default refuses with
  that remedy (a forward that computes its softmax scale from the kept width, torchvision
  Swin v1: the module and the GraphModule both recompute it); ``refused`` (a typed ``FxpruneError``: class and first line);
  ``crash`` (any other exception, or a typed error that only wraps one: a bug);
- ``class``: ``isinstance(small, type(model))``;
- ``err_x``: float64 max abs error of ``small`` vs the pruned GraphModule on the
  example inputs; ``err_batch``: on a fresh batch twice as large (the GraphModule is
  run on each half where it was captured for one batch size, as torch.export graphs
  are); ``err_res``: on another resolution where the original model accepts one (vision
  models, symbolic-trace graphs only). ``f32`` marks graphs that only run in float32;
- ``train``: ``small.train()`` forward + backward on the example inputs runs and gives
  finite gradients;
- ``s``: wall seconds for the model.

Models over ``--max-params`` (40M) are skipped (memory, two-core machine); each model
has ``--timeout`` seconds (SIGALRM; reported as ``timeout``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "zoo")]

import fxprune  # noqa: E402
from fxprune.core.errors import FxpruneError, LiteralSizeError  # noqa: E402

RATIO = 0.3
QUICK = {"torchvision": ["resnet18"], "timm": ["mobilenetv3_small_050"], "hf": ["gpt2"]}


class ModelTimeout(Exception):
    pass


# ----------------------------------------------------------------------------- models
# Input sizes other than the zoo tests' smallest eval-mode size, where the module's
# train mode needs more: Inception-v3's AuxLogits (avg_pool2d(5, stride 3), then a 5x5
# conv) runs only from 299x299; at 75x75 the original cannot run in train mode, its
# train path cannot be analysed and compile(output="module") refuses (fail closed).
TRAIN_SIZES = {"inception_v3": 299}


def torchvision_models() -> dict[str, Callable]:
    import test_torchvision as tv

    def factory(name: str) -> Callable:
        def make() -> tuple[torch.nn.Module, tuple, dict, int | None]:
            kwargs, size, batch = tv.model_config(name)
            size = TRAIN_SIZES.get(name, size)
            torch.manual_seed(0)
            model = tv.torchvision.models.get_model(name, weights=None, **kwargs).eval()
            return model, (torch.randn(batch, 3, size, size),), {}, size
        return make
    return {n: factory(n) for n in tv.MODELS}


def timm_models() -> dict[str, Callable]:
    import test_timm_zoo as tz

    def factory(name: str) -> Callable:
        def make() -> tuple[torch.nn.Module, tuple, dict, int | None]:
            model, x = tz.make(name, 0)
            return model, (x,), {}, x.shape[-1]
        return make
    return {n: factory(n) for n in tz.ARCHS}


def hf_models() -> dict[str, Callable]:
    import test_hf as th

    def factory(name: str) -> Callable:
        def make() -> tuple[torch.nn.Module, tuple, dict, int | None]:
            case = th.build(name)
            return case.model, tuple(case.inputs), {"frontend": "export"}, None
        return make
    return {n: factory(n) for n in th.MODELS}


FAMILIES = {"torchvision": torchvision_models, "timm": timm_models, "hf": hf_models}


# ------------------------------------------------------------------------- measuring
def _flat(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple") and not isinstance(out, torch.Tensor):
        out = out.to_tuple()  # Hugging Face ModelOutput
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _cast(t: Any, dtype: torch.dtype) -> Any:
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _fresh(x: tuple, seed: int, batch_factor: int = 1, size: int | None = None) -> tuple:
    """New inputs like ``x``: random floats / ids in the same range, batch scaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in x:
        shape = list(t.shape)
        shape[0] *= batch_factor
        if size is not None and t.dim() == 4:
            shape[-2:] = [size, size]
        if t.is_floating_point():
            new = torch.randn(shape, generator=g, dtype=t.dtype)
        elif t.numel() and int(t.min()) == int(t.max()):  # attention masks: all ones
            new = torch.full(shape, int(t.min()), dtype=t.dtype)
        else:
            lo, hi = int(t.min()), int(t.max()) + 1
            new = torch.randint(lo, max(hi, lo + 1), shape, generator=g, dtype=t.dtype)
        if not t.is_contiguous() and size is None:  # torch.export guards on strides
            new = torch.empty_strided(shape, t.stride(), dtype=t.dtype).copy_(new)
        out.append(new)
    return tuple(out)


def _run_graph(gm: torch.nn.Module, x: tuple, batch: int) -> list[torch.Tensor]:
    """``gm(*x)``; where the graph was captured for one batch size, half by half."""
    try:
        return _flat(gm(*x))
    except Exception:
        if x[0].shape[0] == batch:
            raise
    halves = [_flat(gm(*(t[i:i + batch] for t in x))) for i in range(0, x[0].shape[0], batch)]
    return [torch.cat(parts) for parts in zip(*halves)]


def _max_err(got: list, want: list) -> float:
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs vs the GraphModule's {len(want)}")
    err = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise AssertionError(f"shape {tuple(g.shape)} vs the GraphModule's {tuple(w.shape)}")
        if g.is_floating_point():
            err = max(err, float((g.double() - w.double()).abs().max()) if g.numel() else 0.0)
        elif not torch.equal(g, w):
            err = float("inf")
    return err


def _errors(model, small, gm, x: tuple, size: int | None, frontend: str) -> dict:
    """float64 max errors of ``small`` vs ``gm`` on x, a doubled fresh batch, a new size."""
    row: dict[str, Any] = {}
    dtype = torch.float64
    a, b = copy.deepcopy(small).eval().to(dtype), copy.deepcopy(gm).eval().to(dtype)
    with torch.no_grad():
        try:
            b(*(_cast(t, dtype) for t in x))
        except Exception:  # a torch.export graph is specialised to float32
            dtype, row["f32"] = torch.float32, True
            a, b = copy.deepcopy(small).eval(), copy.deepcopy(gm).eval()
        batch = x[0].shape[0]
        cases = {"err_x": x, "err_batch": _fresh(x, 1, batch_factor=2)}
        if size is not None and frontend != "export":
            new = size + 16 if size < 224 else size + 32
            try:
                model(*_fresh(x, 2, size=new))
                cases["err_res"] = _fresh(x, 2, size=new)
            except Exception:
                row["err_res"] = "n/a"  # the original model does not accept it
        for key, inputs in cases.items():
            xi = tuple(_cast(t, dtype) for t in inputs)
            try:
                row[key] = _max_err(_flat(a(*xi)), _run_graph(b, xi, batch))
            except Exception as exc:
                row[key] = f"FAIL {type(exc).__name__}: {_first(exc)}"
    return row


def _train(model: torch.nn.Module, small: torch.nn.Module, x: tuple) -> str:
    try:  # the original must run in train mode on these inputs for the check to mean much
        copy.deepcopy(model).train()(*x)
    except Exception as exc:
        return f"n/a (original: {type(exc).__name__})"
    m = copy.deepcopy(small).train()
    try:
        loss = sum(t.float().sum() for t in _flat(m(*x)) if t.is_floating_point())
        loss.backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        if not grads or any(g is None for g in grads[:1]):
            return "no grad"
        if not all(torch.isfinite(g).all() for g in grads if g is not None):
            return "non-finite grad"
        return "ok"
    except Exception as exc:
        return f"FAIL {type(exc).__name__}: {_first(exc)}"


def _first(exc: BaseException) -> str:
    """The first line, without the pipeline's and compile's prefixes."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = re.sub(r"^.*?step '[^']*' failed \(after: [^)]*\): ", "", lines[0] if lines else "")
    return text.replace('compile(output="module"): ', "")[:200]


def _wrapped(exc: BaseException) -> BaseException | None:
    """The untyped exception that ``fxprune.pipeline.run_steps`` wrapped into ``exc``
    (``raise error_type(... "ValueError: ...") from exc``), or None for a typed error
    raised by fxprune itself (re-raised by the pipeline from the original)."""
    while isinstance(exc.__cause__, FxpruneError):
        exc = exc.__cause__
    cause = exc.__cause__
    if cause is not None and re.search(r"failed \(after: [^)]*\): " + type(cause).__name__ + ": ",
                                       str(exc)):
        return cause
    return None


def sweep_one(name: str, make: Callable, *, max_params: float, timeout: int) -> dict:
    row: dict[str, Any] = {"model": name}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        model, x, kw, size = make()
        n = sum(p.numel() for p in model.parameters())
        row["params"] = n
        if n > max_params:
            row["outcome"] = f"skipped (> {max_params / 1e6:.0f}M params)"
            return row
        analysis = fxprune.analyze(model, x, **kw)
        plan = fxprune.Plan.from_ratio(analysis, RATIO, criterion="random", seed=0)
        scale = "original"
        try:
            small = fxprune.compile(model, plan, output="module")
        except LiteralSizeError as exc:  # the forward computes its softmax scale from the
            if 'attention_scale="recompute"' not in str(exc):  # kept width (Swin v1):
                raise  # the documented remedy, taken and reported as such
            scale = "recompute"
            small = fxprune.compile(model, plan, output="module", attention_scale=scale)
        gm = fxprune.compile(model, plan, attention_scale=scale)
        row["outcome"] = "ok" if scale == "original" else "ok (attention_scale=recompute)"
        row["class"] = isinstance(small, type(model))
        row.update(_errors(model, small, gm, x, size, kw.get("frontend", "fx")))
        row["train"] = _train(model, small, x)
    except ModelTimeout:
        row["outcome"] = f"timeout (> {timeout} s)"
    except FxpruneError as exc:
        cause = _wrapped(exc)
        if cause is None:
            row["outcome"] = f"refused {type(exc).__name__}"
        else:  # typed only by the pipeline's wrapper: the cause is a crash
            row["outcome"] = f"crash {type(cause).__name__} (in {type(exc).__name__})"
        row["error"] = _first(exc)
    except Exception as exc:
        row["outcome"] = f"crash {type(exc).__name__}"
        row["error"] = _first(exc)
    finally:
        signal.alarm(0)
        row["s"] = round(time.perf_counter() - start, 1)
        gc.collect()
    return row


def _alarm(signum, frame):
    raise ModelTimeout()


def verdict(row: dict) -> str:
    """ok: class kept, errors within tolerance, train mode runs; else the first problem."""
    out = row.get("outcome", "")
    if not out.startswith("ok"):
        return out.split(" ")[0]
    errs = [row.get(k) for k in ("err_x", "err_batch", "err_res") if k in row]
    tol = 1e-4 if row.get("f32") else 1e-6
    if not row.get("class") or not str(row.get("train")).startswith(("ok", "n/a")) or any(
            isinstance(e, str) and e != "n/a" or isinstance(e, float) and e > tol
            for e in errs):
        return "mismatch"
    return "ok"


def select(family: str | None, only: list[str] | None, quick: bool) -> list[tuple[str, str, Callable]]:
    out = []
    for fam, models in FAMILIES.items():
        if family and fam != family:
            continue
        table = models()
        names = QUICK[fam] if quick else list(table)
        if only:
            names = [n for n in table if n in only]
        out += [(fam, n, table[n]) for n in names]
    if only:
        missing = set(only) - {n for _, n, _ in out}
        if missing:
            raise SystemExit(f"unknown model(s): {', '.join(sorted(missing))}")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME")
    p.add_argument("--family", choices=sorted(FAMILIES))
    p.add_argument("--quick", action="store_true", help="one model per family")
    p.add_argument("--max-params", type=float, default=40e6)
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tabulate import tabulate  # inspection only

    rows = []
    for fam, name, make in select(args.family, args.only, args.quick):
        row = {"family": fam, **sweep_one(name, make, max_params=args.max_params,
                                           timeout=args.timeout)}
        row["verdict"] = verdict(row)
        rows.append(row)
        print(f"[{len(rows)}] {fam}/{name}: {row['verdict']} {row.get('error', '')}",
              file=sys.stderr, flush=True)
    cols = ["family", "model", "verdict", "outcome", "class", "err_x", "err_batch",
            "err_res", "train", "s", "error"]
    table = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    print(tabulate(table, headers=cols, tablefmt="github"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print("\nsummary: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
          + f" (of {len(rows)})")
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.1e}"
    return str(v)


if __name__ == "__main__":
    main()
