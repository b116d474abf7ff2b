"""Budget-driven planning: from importance scores and a cost target to a ``Plan``.

``plan(analysis, importance, target_macs=0.5)`` asks for half the MACs rather than a
per-layer ratio. The planner reduces every choice to *how many units each group
loses* (always its lowest-scored ones) and searches that count on the cost model
(``fxprune.cost``), so a target is met exactly as the cost model counts it:

* ``scope="local"``: every group loses the same fraction ``r``; ``r`` is bisected.
* ``scope="global"``: units of all groups are ranked by score (make the scores
  comparable with ``normalize=``/``layer_norm=``); the first ``k`` in the ranking go,
  ``k`` is bisected. Caps apply in both scopes: no group is emptied (at least
  ``round_to`` units stay), none loses more than ``max_ratio_per_group``, kept counts
  are multiples of ``round_to``, ``ignore``d groups stay whole, ``overrides`` fix a
  module's ratio, and units scored ``+inf`` are never removed.

With ``uniform=True`` every group of one *kind* (the same name once layer indices are
read as ``*``, the same size and granularity: every layer's attention heads, every
layer's MLP hidden units) loses the same number of units, so one number per kind (a
Hugging Face config's ``num_attention_heads``, ``intermediate_size``...) describes the
result; which units go in each layer still follows its scores. The search runs on one
count per kind (local: one ratio; global: kinds' units ranked by their mean score at
each rank). Groups the analysis marks ``uniform_whole`` (read from the model's config)
stay whole, ``uniform_links`` groups lose a fixed multiple of their leader kind's count
(a hidden size that shrinks with the heads); a kind some of whose groups cannot be pruned (``ignore``, caps) raises
``PlanError``.

With ``steps > 1`` the budget is reached through intermediate budgets (``schedule``:
``"linear"`` or ``fn(step, steps) -> fraction of the way``), re-scoring the model with
the units removed so far masked out (gates at 0) before each step.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fxprune.core.errors import BudgetError, PlanError
from fxprune.core.groups import ChannelGroup, GroupAnalysis
from fxprune.planning.importance import Importance
from fxprune.core.plan import DimGuard, Plan, require_analysis, resolve_ignore
from fxprune.core.count_ties import (CountLink, broken_count_ties, count_links,
                                     count_ties_meta, follow_counts, follower_cap, hold_links,
                                     leader_multiple)
from fxprune.core.ties import TiedOrder, broken_ties, ties_meta, tied_orders

__all__ = ["plan", "Budget", "SCHEDULES", "TOLERANCE", "group_kind", "check_uniform"]

TOLERANCE = 0.01
SCOPES = ("local", "global")
SCHEDULES: dict[str, Callable[[int, int], float]] = {}


def _schedule(name: str) -> Callable:
    def register(fn: Callable[[int, int], float]) -> Callable:
        SCHEDULES[name] = fn
        return fn
    return register


@_schedule("linear")
def linear_schedule(step: int, steps: int) -> float:
    """Equal shares of the budget per step."""
    return step / steps


@_schedule("cubic")
def cubic_schedule(step: int, steps: int) -> float:
    """Zhu & Gupta 2017 ("To prune, or not to prune"): ``1 - (1 - step/steps)^3``, large
    cuts first, gentle at the end."""
    return 1.0 - (1.0 - step / steps) ** 3


@_schedule("geometric")
def geometric_schedule(step: int, steps: int) -> float:
    """Larger cuts first: 1 - 2^-step, rescaled to end at 1."""
    return (1.0 - 0.5 ** step) / (1.0 - 0.5 ** steps)


# ----------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What to reach: ``kind`` is "ratio", "macs", "params" or "latency".

    For cost kinds ``value`` is absolute (MACs, parameters, milliseconds); ``dense`` is
    the unpruned model's cost, ``requested`` what the caller passed.
    """

    kind: str
    value: float
    dense: float = 0.0
    requested: float = 0.0

    def at(self, fraction: float) -> "Budget":
        """The intermediate budget ``fraction`` of the way from the dense model."""
        if self.kind == "ratio":
            return Budget("ratio", self.value * fraction, 0.0, self.requested)
        return Budget(self.kind, self.dense - fraction * (self.dense - self.value), self.dense,
                      self.requested)


def _parse_budget(ratio: float | None, targets: Mapping[str, float | None]) -> tuple[str, float]:
    given = {k: v for k, v in {"ratio": ratio, **targets}.items() if v is not None}
    if len(given) != 1:
        raise PlanError("give exactly one of ratio=, target_macs=, target_params=, "
                        f"target_latency= (got {sorted(given) or 'none'})")
    kind, value = next(iter(given.items()))
    value = float(value)
    if kind == "ratio" and not 0.0 <= value < 1.0:
        raise PlanError(f"ratio must lie in [0, 1), got {value}")
    if kind != "ratio" and not (value > 0 and math.isfinite(value)):
        raise PlanError(f"target_{kind} must be a positive number (a fraction <= 1 of the "
                        f"dense model, or an absolute count > 1), got {value}")
    return kind, value


# ----------------------------------------------------------------------------------
# Per-group bounds
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Bounds:
    """How many units a group may lose, and its fixed ratio if overridden."""

    name: str
    size: int
    labels: np.ndarray
    max_remove: int
    round_to: int
    fixed_ratio: float | None
    tied: TiedOrder | None = None  # equal chunk pieces: units go in whole atoms

    def removals(self, wanted: int) -> int:
        """Clamp ``wanted`` removals to the caps; round the kept count up to ``round_to``
        (a tied group: down to whole atoms whose kept count is a multiple)."""
        n = min(max(int(wanted), 0), self.max_remove)
        if n == 0:
            return 0
        if self.tied is not None:
            return self.tied.removals(n, round_to=self.round_to, size=self.size)
        keep = int(math.ceil((self.size - n) / self.round_to) * self.round_to)
        return self.size - min(keep, self.size)

    def at_ratio(self, ratio: float) -> int:
        """Removals for a uniform ratio (kept count rounded to the nearest multiple)."""
        keep = int(round(self.size * (1.0 - ratio) / self.round_to)) * self.round_to
        return self.removals(self.size - max(keep, self.round_to))


def _matches(fqn: str, prefix: str) -> bool:
    return fqn == prefix or fqn.startswith(prefix + ".")


def _override_for(group: ChannelGroup, overrides: Mapping[str, float]) -> float | None:
    """The override of the longest module prefix among the group's producers."""
    producers = [m.fqn for m in group.members if m.role == "out"] or [m.fqn for m in group.members]
    hits = [p for p in overrides if any(_matches(f, p) for f in producers)]
    return float(overrides[max(hits, key=len)]) if hits else None


def _bounds(analysis: GroupAnalysis, scores: Mapping[str, np.ndarray], *,
            round_to: int | Mapping[str, int],
            max_ratio: float, ignore: tuple[str, ...], overrides: Mapping[str, float],
            include_softmax: bool = False, whole: tuple[str, ...] = (),
            tied: Mapping[str, TiedOrder] | None = None) -> list[_Bounds]:
    out = []
    tied = tied or {}
    for g in analysis.groups:
        if g.name in whole:
            continue  # a uniform plan leaves it whole (the analysis says why, or the ties)
        multiple = round_to.get(g.name, 1) if isinstance(round_to, Mapping) else round_to
        if any(_matches(m.fqn, p) for m in g.members for p in ignore) or g.size < multiple:
            continue
        if "softmax" in g.inexact_kinds and not include_softmax:
            continue  # a distribution over the units: whole unless the user opts in
        removable = int((~np.isposinf(scores[g.name])).sum())  # +inf: never removed
        cap = min(int(math.floor(max_ratio * g.size + 1e-9)), g.size - multiple, removable)
        fixed = _override_for(g, overrides)
        if cap <= 0:
            continue
        out.append(_Bounds(g.name, g.size, np.flatnonzero(analysis.group_of == g.id), cap,
                           multiple, fixed, tied.get(g.name)))
    return out


# ----------------------------------------------------------------------------------
# Removal counts -> kept labels
# ----------------------------------------------------------------------------------
class _Search:
    """Removal counts per group as a monotone function of one knob, and their kept labels.

    ``bounds`` are what the search moves: groups, or (``uniform``) kinds whose ``ties``
    name the groups that lose the same count; counts are keyed by bound name."""

    def __init__(self, analysis: GroupAnalysis, bounds: list[_Bounds],
                 scores: Mapping[str, np.ndarray], scope: str,
                 ties: Mapping[str, tuple[_Bounds, ...]] | None = None,
                 links: Mapping[str, list[tuple[_Bounds, int]]] | None = None,
                 follow: Mapping[str, CountLink] | None = None) -> None:
        self.analysis, self.bounds, self.scope = analysis, bounds, scope
        self.follow, self.scores = dict(follow or {}), scores
        self.uniform = ties is not None
        self.ties = dict(ties) if ties is not None else {b.name: (b,) for b in bounds}
        self.links = dict(links or {})
        self.order = {g.name: g.tied.order if g.tied is not None else
                      np.argsort(scores[g.name], kind="stable")
                      for tied in self.ties.values() for g in tied}
        self.order.update({f.name: np.argsort(scores[f.name], kind="stable")
                           for linked in self.links.values() for f, _ in linked})
        free = [b for b in bounds if b.fixed_ratio is None]
        self.fixed = {b.name: b.at_ratio(b.fixed_ratio) for b in bounds if b.fixed_ratio is not None}
        if scope == "global" and free:
            values = np.concatenate([self._slot_scores(b, scores) for b in free])
            owner = np.concatenate([np.full(b.size, i) for i, b in enumerate(free)])
            rankable = ~np.isposinf(values)
            ranked = np.lexsort((owner[rankable], values[rankable]))
            self.ranked_owner = owner[rankable][ranked]
        else:
            self.ranked_owner = np.zeros(0, dtype=np.int64)
        self.free = free
        self.guard = DimGuard(analysis, scores, atoms=_atom_labels(
            analysis, [g for tied in self.ties.values() for g in tied]))

    def _slot_scores(self, b: _Bounds, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """A group's scores; for a kind, the mean over its groups of the j-th lowest score
        (+inf where any group's j-th unit may never go)."""
        tied = self.ties[b.name]
        if len(tied) == 1 and tied[0].name == b.name and b.tied is not None:
            return b.tied.unit_scores(scores[b.name])  # an atom's units rank together
        if len(tied) == 1 and tied[0].name == b.name:
            return scores[b.name]
        ranked = np.stack([np.sort(scores[g.name]) for g in tied])
        with np.errstate(invalid="ignore"):
            mean = ranked.mean(axis=0)
        return np.where(np.isposinf(ranked).any(axis=0) | np.isnan(mean), np.inf, mean)

    @property
    def knob_max(self) -> float:
        return float(len(self.ranked_owner)) if self.scope == "global" else 1.0

    def counts(self, knob: float) -> dict[str, int]:
        """Units each group loses at ``knob`` (a ratio, or a rank position when global)."""
        out = dict(self.fixed)
        if self.scope == "local":
            out.update({b.name: b.at_ratio(min(knob, 1.0)) for b in self.free})
        else:
            k = int(round(knob))
            per = np.bincount(self.ranked_owner[:k], minlength=len(self.free))
            out.update({b.name: b.removals(int(n)) for b, n in zip(self.free, per)})
        return out

    def global_moves(self, start: int, merged: Callable[[float], dict[str, int]]
                     ) -> Iterable[tuple[str, int]]:
        """Walk the ranking from position ``start``: each unit is its group's next move."""
        raw = np.bincount(self.ranked_owner[:start], minlength=len(self.free))
        base = merged(float(start))
        for owner in self.ranked_owner[start:].tolist():
            raw[owner] += 1
            b = self.free[owner]
            yield b.name, max(b.removals(int(raw[owner])), base.get(b.name, 0))

    def kept(self, counts: Mapping[str, int]) -> np.ndarray:
        """Kept labels: each group's lowest-scored units removed, no tensor dim emptied."""
        kept = np.ones(self.analysis.num_units, dtype=bool)
        for b in self.bounds:
            n = counts.get(b.name, 0)
            for g in self.ties[b.name]:
                kept[g.labels[self.order[g.name][:n]]] = False
            for f, factor in self.links.get(b.name, ()):
                kept[f.labels[self.order[f.name][:n * factor]]] = False
        if self.follow:  # count ties: followers keep what their leader's count implies
            kept = follow_counts(self.analysis, kept, self.follow, self.scores)
        return self.guard(kept)

    def keep_indices(self, counts: Mapping[str, int]) -> dict[str, list[int]]:
        kept = self.kept(counts)
        names = [g.name for tied in self.ties.values() for g in tied] + \
            [f.name for linked in self.links.values() for f, _ in linked] + \
            [f for link in self.follow.values() for f, _ in link.followers]
        out = {}
        for name in names:
            mine = kept[self.analysis.group_of == self.analysis.group(name).id]
            if not mine.all():
                out[name] = np.flatnonzero(mine).tolist()
        return out


def _atom_labels(analysis: GroupAnalysis, bounds: Iterable[_Bounds]) -> np.ndarray | None:
    """Atom id per global label (-1: untied), so that DimGuard puts back whole atoms."""
    tied = [b for b in bounds if b.tied is not None]
    if not tied:
        return None
    out = np.full(analysis.num_units, -1, dtype=np.int64)
    offset = 0
    for b in tied:
        out[b.labels] = b.tied.atom + offset
        offset += b.size
    return out


def _followed_scores(analysis: GroupAnalysis, scores: Mapping[str, np.ndarray],
                     links: Mapping[str, CountLink], imp: Importance, cost: Any
                     ) -> dict[str, np.ndarray]:
    """Scores divided by a unit's cost saving (``normalize="macs"|"params"|"memory"``)
    count, for a count-tie leader, what its followers then save too: a leader unit's
    score becomes ``raw / (own saving + sum(ratio x the follower's mean unit saving))``."""
    kind = imp.cost_kind
    if kind not in ("macs", "params", "memory") or cost is None:
        return dict(scores)
    out = dict(scores)
    for lead, link in links.items():
        own = cost.unit_cost(lead, kind)
        extra = sum(float(r) * float(np.mean(cost.unit_cost(f, kind))) for f, r in link.followers)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(own > 0, own / (own + extra), 1.0)
        out[lead] = np.asarray(scores[lead], dtype=float) * factor
    return out


def _follow_bounds(analysis: GroupAnalysis, bounds: list[_Bounds],
                   links: Mapping[str, CountLink], multiples: int | Mapping[str, int]
                   ) -> tuple[list[_Bounds], dict[str, CountLink], dict[str, str]]:
    """Bounds with count-tie followers taken out (they follow their leader) and each
    leader's removals in its ``leader_multiple``, capped so that no follower passes its
    own cap; the links kept, and the groups held whole -> why (a leader whose follower
    is left whole, or whose size no multiple fits)."""
    by = {b.name: b for b in bounds}
    held: dict[str, str] = {}
    rounding = multiples if isinstance(multiples, Mapping) else \
        {g.name: multiples for g in analysis.groups}
    sizes = {g.name: g.size for g in analysis.groups}
    adjusted: dict[str, _Bounds] = {}
    for lead, link in links.items():
        missing = [f for f, _ in link.followers if f not in by]
        if lead not in by:
            held[lead] = "it is left whole (ignore=, caps, softmax)"
            continue
        if missing:
            held[lead] = (f"its count tie's follower {missing[0]} is left whole (ignore=, "
                          f"caps, softmax), and it must follow this group's count")
            continue
        b = by[lead]
        multiple = leader_multiple(link, sizes, rounding, b.round_to)
        cap = min(b.max_remove, b.size - multiple,
                  follower_cap(link, {f: by[f].max_remove for f, _ in link.followers}))
        if multiple == 0 or cap < multiple:
            held[lead] = (f"its followers lose whole units only if it loses multiples of "
                          f"{multiple or link.step}, which its size {b.size} or caps do not allow")
            continue
        adjusted[lead] = _Bounds(b.name, b.size, b.labels, cap, multiple, b.fixed_ratio, b.tied)
    links, held = hold_links(links, held)
    followers = {f for link in links.values() for f, _ in link.followers}
    out = [adjusted.get(b.name, b) for b in bounds
           if b.name not in followers and b.name not in held]
    return out, links, held


# ----------------------------------------------------------------------------------
# Uniform plans: one removal count per kind of group
# ----------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def group_kind(group: ChannelGroup) -> str:
    """The group's kind: its name with layer indices read as ``*``, its size and
    granularity (``model.layers.*.mlp.gate_proj.weight[0] x48/1``)."""
    return f"{_LAYER_INDEX.sub('*', group.name)} x{group.size}/{group.granularity}"


def _uniform_ties(analysis: GroupAnalysis, bounds: list[_Bounds]
                  ) -> tuple[list[_Bounds], dict[str, tuple[_Bounds, ...]], dict]:
    """One bound per kind (the tightest cap of its groups), the groups it ties and the
    groups linked to it (``analysis.uniform_links``); ``PlanError`` when a kind is prunable
    in some layers only, overridden unevenly, or its linked group cannot follow it."""
    followers = {b.name: b for b in bounds if b.name in analysis.uniform_links}
    bounds = [b for b in bounds if b.name not in followers]
    lead: dict[str, list[tuple[_Bounds, int]]] = {}
    for name, (leader, factor) in analysis.uniform_links.items():
        kind = group_kind(analysis.group(leader))
        if name not in followers:
            raise PlanError(f"uniform=True: {name} must lose {factor} units per unit of "
                            f"{kind!r} ({analysis.uniform_whole.get(name, 'the config')}) but "
                            "is left whole (ignore=, caps): ignore that kind too")
        lead.setdefault(kind, []).append((followers[name], int(factor)))
    prunable = {b.name: b for b in bounds}
    kinds: dict[str, list[ChannelGroup]] = {}
    for g in analysis.groups:
        kinds.setdefault(group_kind(g), []).append(g)
    out, ties = [], {}
    for kind, groups in kinds.items():
        tied = tuple(prunable[g.name] for g in groups if g.name in prunable)
        if not tied:
            continue
        left = [g.name for g in groups if g.name not in prunable]
        if left:
            raise PlanError(
                f"uniform=True: groups of kind {kind!r} cannot all lose the same count: "
                f"{', '.join(left[:3])} stay whole (ignore=, max_ratio_per_group, round_to "
                f"or units scored +inf) while {tied[0].name} is prunable. Ignore that kind "
                "in every layer or in none, or plan without uniform=True")
        fixed = {b.fixed_ratio for b in tied}
        if len(fixed) > 1:
            raise PlanError(f"uniform=True: overrides give groups of kind {kind!r} different "
                            f"ratios {sorted(map(str, fixed))}; override every layer alike")
        first = tied[0]
        cap = min([b.max_remove for b in tied] + [f.max_remove // k for f, k in lead.get(kind, ())])
        if cap > 0:
            out.append(_Bounds(kind, first.size, first.labels, cap, first.round_to,
                               first.fixed_ratio, first.tied))
            ties[kind] = tied
    return out, ties, {k: v for k, v in lead.items() if k in ties}


def check_uniform(analysis: GroupAnalysis, keep: Mapping[str, Any]) -> None:
    """``PlanError`` unless every kind's groups keep the same number of units."""
    kinds: dict[str, dict[str, int]] = {}
    for g in analysis.groups:
        kinds.setdefault(group_kind(g), {})[g.name] = len(keep.get(g.name, range(g.size)))
    for kind, kept in kinds.items():
        if len(set(kept.values())) > 1:
            shown = ", ".join(f"{n}: {k}" for n, k in list(kept.items())[:4])
            raise PlanError(
                f"uniform=True: groups of kind {kind!r} keep different counts ({shown}): a "
                "tensor dim that holds only some of a group's units would have been emptied "
                "(DimGuard kept one back). Lower the budget, or plan without uniform=True")


# ----------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------
CostFn = Callable[[np.ndarray], float]


def plan(analysis: GroupAnalysis, importance: str | Importance | Callable = "l1", *,
         ratio: float | None = None, target_macs: float | None = None,
         target_params: float | None = None, target_latency: float | None = None,
         scope: str = "local", max_ratio_per_group: float = 1.0,
         round_to: int | str | None = None, rounding: Any = None,
         ignore: Iterable[str] = (), overrides: Mapping[str, float] | None = None,
         steps: int = 1, schedule: str | Callable[[int, int], float] = "linear",
         cost: Any = None, latency: Any = None, tolerance: float = TOLERANCE,
         include_softmax: bool = False, uniform: bool = False,
         split_ties: bool = True) -> Plan:
    """A ``Plan`` that meets one budget, removing the lowest-scored units.

    ``importance``: a criterion name (``fxprune.importance.CRITERIA``), an
    ``Importance`` (data-driven criteria need one, with data), or ``fn(analysis, group)
    -> scores``. Budgets (exactly one): ``ratio`` of units removed (per group when
    local, of all ranked units when global); ``target_macs``/``target_params``/
    ``target_latency``: a fraction (<= 1) of the dense model's cost or an absolute
    value (> 1: MACs, parameters, milliseconds). Targets are met from below, within
    ``tolerance`` (relative) where the units' granularity allows; otherwise a warning
    says by how much. ``cost``: a precomputed ``fxprune.cost.CostModel``; ``latency``: a
    precomputed ``fxprune.cost.LatencyTable`` (else measured now, on this device, and
    cached). Raises ``BudgetError`` when the target is below what the model costs with
    every prunable group at its minimum, ``PlanError`` for invalid arguments (an
    ``ignore`` name that matches nothing included; ``ignore`` also takes modules).
    Groups whose units a softmax normalises stay whole unless ``include_softmax``.
    ``uniform=True``: every kind of group (``group_kind``: the same module path up to
    layer indices, size and granularity) keeps the same count in every layer, so one
    config describes the result (``save_pretrained`` of a Hugging Face model); the
    budget is met by one count per kind. Groups in the analysis' ``uniform_whole`` stay
    whole; groups in ``uniform_links`` follow their leader's kind (BERT's hidden size loses
    head_dim units per head); a kind prunable in some layers only (``ignore``, caps,
    overrides), or a linked group left whole, raises ``PlanError``.
    ``split_ties`` (default True): a chunk / split that the forward cuts into equal pieces
    (``analysis.split_ties``: ShuffleNetV2's ``chunk(2)``, CSPNet's split) keeps equal
    counts in its pieces, units tied into atoms, so ``compile(output="module")`` can
    follow the plan; announced in ``meta["split_ties"]`` (``split_ties_whole``: groups the
    ties leave whole). It also keeps ``analysis.count_ties`` (a reshape size computed from
    another group's width, Swin's ``C // num_heads``): the follower group loses what its
    leader's count implies (``fxprune.core.count_ties``), announced in
    ``meta["count_ties"]`` / ``["count_ties_whole"]``. ``False``: any counts (the
    GraphModule takes them; the module output refuses such a plan),
    ``meta["split_ties"] == "off"`` (and ``meta["count_ties"]``).
    """
    require_analysis(analysis, "fxprune.plan")
    kind, value = _parse_budget(ratio, {"macs": target_macs, "params": target_params,
                                        "latency": target_latency})
    if scope not in SCOPES:
        raise PlanError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 < max_ratio_per_group <= 1.0:
        raise PlanError(f"max_ratio_per_group must lie in (0, 1], got {max_ratio_per_group}")
    if round_to is None:
        round_to = "auto" if kind == "latency" else 1
    multiples: int | dict[str, int]
    if round_to == "auto":
        from fxprune.planning.cost.rounding import auto_round_to, measure_rounding

        multiples = auto_round_to(analysis, rounding if rounding is not None
                                  else measure_rounding())
    elif isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PlanError(f"round_to must be an integer >= 1 or \"auto\", got {round_to!r}")
    else:
        multiples = round_to
    if not isinstance(steps, int) or steps < 1:
        raise PlanError(f"steps must be an integer >= 1, got {steps!r}")
    overrides = dict(overrides or {})
    for module, r in overrides.items():
        if not 0.0 <= float(r) < 1.0:
            raise PlanError(f"override for {module!r} must lie in [0, 1), got {r}")
    fraction_of = _schedule_fn(schedule)
    imp = _as_importance(importance)
    ignore = resolve_ignore(analysis, ignore)
    whole: tuple[str, ...] = ()
    if uniform:
        whole = tuple(analysis.uniform_whole)

    if cost is None and (kind != "ratio" or imp.cost_kind is not None):
        from fxprune.planning.cost import compute_cost

        cost = compute_cost(analysis)
    cost_fn = _cost_fn(kind, cost, latency)
    budget = _absolute(kind, value, cost_fn)

    kept = np.ones(analysis.num_units, dtype=bool)
    counts: dict[str, int] = {}
    search: _Search | None = None
    held: dict[str, str] = {}
    tied: dict[str, TiedOrder] = {}
    follow: dict[str, CountLink] = {}
    count_held: dict[str, str] = {}
    for step in range(1, steps + 1):
        fraction = 1.0 if step == steps else float(fraction_of(step, steps))
        if not 0.0 <= fraction <= 1.0:
            raise PlanError(f"schedule gave {fraction} at step {step}; fractions lie in [0, 1]")
        scores = _rescored(imp, analysis, kept, cost)
        tied, held = tied_orders(analysis, scores) if split_ties and analysis.split_ties \
            else ({}, {})  # equal chunk / split pieces
        follow, count_held = count_links(analysis) if split_ties and analysis.count_ties \
            else ({}, {})  # widths read off another group's width
        bounds = _bounds(analysis, scores, round_to=multiples, max_ratio=max_ratio_per_group,
                         ignore=ignore, overrides=overrides, include_softmax=include_softmax,
                         whole=whole + tuple(held) + tuple(count_held), tied=tied)
        if follow:
            bounds, follow, more = _follow_bounds(analysis, bounds, follow, multiples)
            count_held = {**count_held, **more}
        if follow:
            scores = _followed_scores(analysis, scores, follow, imp, cost)
        ties = links = None
        if uniform:
            bounds, ties, links = _uniform_ties(analysis, bounds)
        search = _Search(analysis, bounds, scores, scope, ties, links, follow)
        counts = _solve(search, budget.at(fraction), cost_fn, tolerance,
                        final=step == steps, previous=counts)
        kept = search.kept(counts)
    assert search is not None
    meta = {"criterion": imp.name, "scope": scope, "budget": kind, "requested": value,
            "steps": steps, "round_to": round_to, "uniform": bool(uniform)}
    if isinstance(multiples, dict):
        meta["round_to_groups"] = {n: m for n, m in multiples.items() if m > 1}
    if cost is not None:
        achieved = cost.evaluate(kept)
        meta.update({"macs": achieved.macs, "params": achieved.params,
                     "memory": achieved.memory, "dense_macs": cost.dense.macs,
                     "dense_params": cost.dense.params})
    if kind == "latency":
        meta["latency_ms"] = cost_fn(kept)
    meta.update(ties_meta(analysis, tied, held, split_ties))
    meta.update(count_ties_meta(analysis, follow, count_held, split_ties))
    broken = broken_ties(analysis, kept) + broken_count_ties(analysis, kept) \
        if split_ties else []
    if broken:
        raise PlanError("the plan keeps unequal counts in the pieces of a chunk/split the "
                        f"forward cuts equally: {'; '.join(broken[:3])}"
                        + (" (uniform=True ties groups whose atoms differ: plan without it)"
                           if uniform else ""))
    base = Plan.from_indices(analysis, search.keep_indices(counts))
    if uniform:
        check_uniform(analysis, base.keep)
    return Plan(base.fingerprint, base.keep, base.sizes, meta, analysis)


def _schedule_fn(schedule: str | Callable[[int, int], float]) -> Callable[[int, int], float]:
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise PlanError(f"schedule must be a callable or one of {sorted(SCHEDULES)}")
    return SCHEDULES[schedule]


def _as_importance(importance: str | Importance | Callable) -> Importance:
    if isinstance(importance, Importance):
        return importance
    return Importance(importance)


def _rescored(imp: Importance, analysis: GroupAnalysis, kept: np.ndarray, cost: Any
              ) -> dict[str, np.ndarray]:
    """Scores with the units removed so far first in every ranking (-inf)."""
    scores = imp.scores(analysis, kept=None if kept.all() else kept, cost=cost)
    if kept.all():
        return scores
    out = {}
    for g in analysis.groups:
        s = scores[g.name].copy()
        s[~kept[analysis.group_of == g.id]] = -np.inf
        out[g.name] = s
    return out


def _cost_fn(kind: str, cost: Any, latency: Any) -> CostFn | None:
    if kind == "ratio":
        return None
    if kind == "latency":
        if latency is None:
            from fxprune.planning.cost import measure_latency

            latency = measure_latency(cost)
        from fxprune.planning.cost.latency import latency_table_mismatch

        if latency_table_mismatch(latency, cost):
            raise PlanError(f"plan(target_latency=...): {latency_table_mismatch(latency, cost)}")
        return _LatencyCost(latency, cost)
    return _KindCost(cost, kind)


class _KindCost:
    """MACs or parameters of the model pruned to ``kept``."""

    def __init__(self, cost: Any, kind: str) -> None:
        self.cost, self.kind = cost, kind

    def __call__(self, kept: np.ndarray | None) -> float:
        return self.cost.evaluate(kept)[self.kind]


class _LatencyCost:
    """Predicted latency (ms) from the measured per-node table."""

    def __init__(self, table: Any, cost: Any) -> None:
        self.table, self.cost = table, cost

    def __call__(self, kept: np.ndarray | None) -> float:
        return self.table.predict(self.cost, kept)


def _absolute(kind: str, value: float, cost_fn: CostFn | None) -> Budget:
    if kind == "ratio":
        return Budget("ratio", value, 0.0, value)
    dense = cost_fn(None)
    target = value * dense if value <= 1.0 else value
    return Budget(kind, target, dense, value)


def _solve(search: _Search, budget: Budget, cost_fn: CostFn | None, tolerance: float, *,
           final: bool, previous: Mapping[str, int]) -> dict[str, int]:
    """Removal counts meeting ``budget``; never fewer than ``previous`` (earlier steps)."""
    def merged(knob: float) -> dict[str, int]:
        now = search.counts(knob)
        return {n: max(c, previous.get(n, 0)) for n, c in {**previous, **now}.items()}

    if budget.kind == "ratio":
        knob = budget.value if search.scope == "local" else budget.value * search.knob_max
        return merged(knob)

    def cost_at(knob: float) -> float:
        return cost_fn(search.kept(merged(knob)))

    if cost_at(0.0) <= budget.value:
        return merged(0.0)
    top = search.knob_max
    floor = cost_at(top)
    if floor > budget.value:
        raise BudgetError(_unreachable(search, budget, floor, cost_fn))
    lo, hi = 0.0, top
    if search.scope == "global":
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost_at(mid) <= budget.value else (mid, hi)
        moves = search.global_moves(int(lo), merged)
    else:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if cost_at(mid) <= budget.value else (mid, hi)
        over, under = merged(lo), merged(hi)
        sizes = {b.name: b.size for b in search.bounds}
        moves = ((n, under[n]) for n in sorted((n for n in under if under[n] > over.get(n, 0)),
                                               key=lambda n: (-sizes.get(n, 0), n)))
    counts = _refine(search, merged(lo), moves, budget.value, tolerance, cost_fn) or merged(hi)
    achieved = cost_fn(search.kept(counts))
    if final and achieved < budget.value * (1.0 - tolerance):
        warnings.warn(f"{budget.kind} target {budget.value:,.6g} met at {achieved:,.6g} "
                      f"({100 * (1 - achieved / budget.value):.2f}% below, tolerance "
                      f"{100 * tolerance:g}%): no removal step lands closer (units are coarse "
                      "at this model size, round_to, caps, or a local scope's uniform ratio)",
                      stacklevel=3)
    return counts


MAX_REFINE_STEPS = 4096


def _refine(search: _Search, counts: dict[str, int], moves: Iterable[tuple[str, int]],
            target: float, tolerance: float, cost_fn: CostFn) -> dict[str, int] | None:
    """From an over-budget plan, take moves (one group's next removal count) in order:
    keep a move while the cost stays above the target, stop at the first that lands in
    ``[target (1 - tolerance), target]``, skip one that overshoots below that window
    (a coarse rounding step) and go on with the next. None if no move lands."""
    counts = dict(counts)
    for step, (name, n) in enumerate(moves):
        if step >= MAX_REFINE_STEPS:
            break
        if n <= counts.get(name, 0):
            continue
        trial = {**counts, name: n}
        value = cost_fn(search.kept(trial))
        if value > target:
            counts = trial
        elif value >= target * (1.0 - tolerance):
            return trial
    return None


def _unreachable(search: _Search, budget: Budget, floor: float, cost_fn: CostFn) -> str:
    nothing = np.zeros(search.analysis.num_units, dtype=bool)
    fixed = cost_fn(nothing)
    unit = {"latency": " ms", "macs": " MACs", "params": " parameters"}.get(budget.kind, "")
    asked = (f"{budget.requested:g}, a fraction of dense" if unit and 0 < budget.requested <= 1
             else f"{budget.requested:g}{unit}")
    return (f"{budget.kind} target {budget.value:,.6g}{unit} (requested {asked}) cannot "
            f"be met: the smallest plan allowed costs {floor:,.6g}{unit} (dense "
            f"{budget.dense:,.6g}{unit}; "
            f"every group keeps at least one unit, or round_to, and ignored/capped groups "
            f"stay; of that floor, {fixed:,.6g} does not depend on any group). Raise the "
            "target, or relax max_ratio_per_group / round_to / ignore / overrides"
            + (f" (uniform=True leaves {len(search.analysis.uniform_whole)} groups whole "
               "where the model's config must describe the result, e.g. "
               f"{next(iter(search.analysis.uniform_whole.values()))})"
               if search.uniform and search.analysis.uniform_whole else ""))
