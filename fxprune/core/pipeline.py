"""A pipeline is a short list of named steps; a failing step says where it failed.

    steps = [Step("trace", trace_fn), Step("propagate_shapes", prop_fn), ...]
    state = run_steps("analyze", steps, state)

Each step takes and returns the state. An ``FxpruneError`` raised by a step is re-raised
as the same type with ``"<pipeline>: step '<name>' failed (after: a, b): ..."``; any other
exception becomes the pipeline's ``error_type`` with the original chained. With
``debug=True`` (or ``FXPRUNE_DEBUG=1``) each step's ``check`` runs after it.

Passes state what they require and ensure as code (in the spirit of torch.fx's
``PassBase.requires/ensures`` and TVM's well-formedness instrument): ``@checked_pass``
wraps a pass function so that, when ``FXPRUNE_DEBUG=1``, its ``requires(*args, **kw)``
runs before it and its ``ensures(result, *args, **kw)`` after it, also when the pass is
called directly (not through a pipeline). A failed check raises the pass's
``error_type`` naming the pass and the check. The test suite runs with the checks on.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fxprune.core.errors import FxpruneError

__all__ = ["Step", "run_steps", "Pass", "CheckedPass", "checked_pass", "debug_enabled",
           "ensure_new_module"]


def debug_enabled() -> bool:
    """True when ``FXPRUNE_DEBUG`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get("FXPRUNE_DEBUG", "") not in ("", "0")


@runtime_checkable
class Pass(Protocol):
    """A named pass with checks that run after it in debug mode."""

    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def requires(self, *args: Any, **kwargs: Any) -> None: ...

    def ensures(self, result: Any, *args: Any, **kwargs: Any) -> None: ...


class CheckedPass:
    """A pass function with its ``requires``/``ensures`` checks (see ``checked_pass``)."""

    def __init__(self, fn: Callable[..., Any], *, name: str,
                 requires: Callable[..., None] | None, ensures: Callable[..., None] | None,
                 error_type: type[FxpruneError]) -> None:
        functools.update_wrapper(self, fn)
        self.fn, self.name, self.error_type = fn, name, error_type
        self._requires, self._ensures = requires, ensures

    def requires(self, *args: Any, **kwargs: Any) -> None:
        if self._requires is not None:
            self._check("requires", self._requires, args, kwargs)

    def ensures(self, result: Any, *args: Any, **kwargs: Any) -> None:
        if self._ensures is not None:
            self._check("ensures", self._ensures, (result, *args), kwargs)

    def _check(self, what: str, check: Callable[..., None], args: tuple, kwargs: dict) -> None:
        try:
            check(*args, **kwargs)
        except FxpruneError as exc:
            raise type(exc)(f"{self.name}: {what} check {check.__name__} failed: {exc}") from exc
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise self.error_type(f"{self.name}: {what} check {check.__name__} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not debug_enabled():
            return self.fn(*args, **kwargs)
        self.requires(*args, **kwargs)
        result = self.fn(*args, **kwargs)
        self.ensures(result, *args, **kwargs)
        return result

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def checked_pass(*, requires: Callable[..., None] | None = None,
                 ensures: Callable[..., None] | None = None,
                 error_type: type[FxpruneError] = FxpruneError
                 ) -> Callable[[Callable[..., Any]], CheckedPass]:
    """Decorate a pass with checks run around it when ``FXPRUNE_DEBUG=1``:
    ``requires(*args, **kwargs)`` before, ``ensures(result, *args, **kwargs)`` after."""

    def wrap(fn: Callable[..., Any]) -> CheckedPass:
        return CheckedPass(fn, name=fn.__name__, requires=requires, ensures=ensures,
                           error_type=error_type)

    return wrap


def ensure_new_module(result: Any, source: Any) -> None:
    """A rewrite's result is a new, well-formed GraphModule that shares no parameter or
    buffer object with its source (rewrites never modify or alias the input)."""
    import torch.fx

    if not isinstance(result, torch.fx.GraphModule) or result is source:
        raise AssertionError(f"expected a new GraphModule, got {type(result).__name__}")
    result.graph.lint()
    theirs = {id(t) for t in (*source.parameters(), *source.buffers())}
    shared = [n for n, t in (*result.named_parameters(), *result.named_buffers())
              if id(t) in theirs]
    if shared:
        raise AssertionError(f"the result shares tensors with its source: {shared[:3]}")


@dataclass(frozen=True)
class Step:
    """One named step of a pipeline: ``run(state) -> state``; ``check(state)`` after it
    in debug mode. ``run`` is a named function or pass, not a lambda (tracebacks)."""

    name: str
    run: Callable[[Any], Any]
    check: Callable[[Any], None] | None = None


def run_steps(pipeline: str, steps: Sequence[Step], state: Any, *,
              error_type: type[FxpruneError] = FxpruneError, debug: bool | None = None) -> Any:
    debug = debug_enabled() if debug is None else debug
    done: list[str] = []
    for step in steps:
        try:
            state = step.run(state)
            if debug and step.check is not None:
                step.check(state)
        except FxpruneError as exc:
            raise type(exc)(_where(pipeline, step, done) + str(exc)) from exc
        except Exception as exc:
            raise error_type(_where(pipeline, step, done) + f"{type(exc).__name__}: {exc}") from exc
        done.append(step.name)
    return state


def _where(pipeline: str, step: Step, done: list[str]) -> str:
    return f"{pipeline}: step '{step.name}' failed (after: {', '.join(done) or 'nothing'}): "
