"""A pipeline is a short list of named steps; a failing step says where it failed.

    steps = [Step("trace", trace_fn), Step("propagate_shapes", prop_fn), ...]
    state = run_steps("analyze", steps, state)

Each step takes and returns the state. An ``FxpruneError`` raised by a step is re-raised
as the same type with ``"<pipeline>: step '<name>' failed (after: a, b): ..."``; any other
exception becomes the pipeline's ``error_type`` with the original chained. With
``debug=True`` (or ``FXPRUNE_DEBUG=1``) each step's ``check`` runs after it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fxprune.errors import FxpruneError

__all__ = ["Step", "run_steps"]


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Any], Any]
    check: Callable[[Any], None] | None = None


def run_steps(pipeline: str, steps: Sequence[Step], state: Any, *,
              error_type: type[FxpruneError] = FxpruneError, debug: bool | None = None) -> Any:
    debug = bool(os.environ.get("FXPRUNE_DEBUG")) if debug is None else debug
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
