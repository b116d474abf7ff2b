"""Plans: for each group, the unit indices to keep. Serializable and graph-bound."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fxprune.core.errors import PlanError
from fxprune.core.groups import ChannelGroup, GroupAnalysis
from fxprune.core.count_ties import (count_links, count_ties_meta, follow_counts,
                                     hold_links, leader_multiple)
from fxprune.core.ties import ties_meta, tied_orders

__all__ = ["Plan", "magnitude_scores", "require_analysis"]

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """Kept unit indices per group, bound to one graph by ``fingerprint``.

    ``keep`` maps group names (``"layer1.0.conv1.weight[0]"``) to sorted unit indices;
    groups not named keep everything. ``sizes`` records each named group's size so that
    a plan is checked against the graph it is applied to.
    """

    fingerprint: str
    keep: Mapping[str, tuple[int, ...]]
    sizes: Mapping[str, int]
    meta: Mapping[str, Any] = field(default_factory=dict)
    analysis: GroupAnalysis | None = field(default=None, repr=False, compare=False)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def keep_all(cls, analysis: GroupAnalysis) -> "Plan":
        return cls.from_indices(analysis, {})

    @classmethod
    def from_indices(cls, analysis: GroupAnalysis, keep: Mapping[int | str, Iterable[int]],
                     *, remove: bool = False) -> "Plan":
        """From explicit unit indices per group (by id or name); ``remove=True`` inverts."""
        require_analysis(analysis, "Plan.from_indices")
        out: dict[str, tuple[int, ...]] = {}
        for key, idx in keep.items():
            g = analysis.group(key)
            chosen = sorted({int(i) for i in idx})
            if any(i < 0 or i >= g.size for i in chosen):
                raise PlanError(f"group {g.name}: unit indices must lie in [0, {g.size})")
            if remove:
                chosen = sorted(set(range(g.size)) - set(chosen))
            out[g.name] = tuple(chosen)
        return cls._make(analysis, out)

    @classmethod
    def from_tensor_indices(cls, analysis: GroupAnalysis,
                            keep: Mapping[str | tuple[str, int], Iterable[int]], *,
                            block: int = 1) -> "Plan":
        """From kept indices of parameter dims: ``{"l0.q_proj.weight": rows}`` (dim 0) or
        ``{(fqn, dim): indices}``; ``block`` counts in blocks (``block=head_dim``: heads).

        A unit may span several indices of several tensors (a key/value head with its
        query heads under GQA; a rotary pair ``(i, i + head_dim/2)`` in every head): a cut
        through one raises ``PlanError`` naming the module and the valid index sets.
        """
        removed: dict[str, set[int]] = {}
        kept_units: dict[str, set[int]] = {}
        for key, idx in keep.items():
            fqn, dim = (key, 0) if isinstance(key, str) else key
            labels, where = _tensor_labels(analysis, fqn, dim)
            mask = np.zeros(len(labels), dtype=bool)
            for i in {int(i) for i in idx}:
                if not 0 <= i * block < len(labels):
                    raise PlanError(f"{where}: index {i} out of range ({len(labels) // block} "
                                    f"{'blocks' if block > 1 else 'indices'})")
                mask[i * block:(i + 1) * block] = True
            pinned = ~mask & (labels < 0)
            if pinned.any():
                reasons = "; ".join(analysis.pin_reasons.get((fqn, dim), ())) or "never coupled"
                raise PlanError(f"{where}: indices {_ranges(np.flatnonzero(pinned) // block)} "
                                f"cannot be removed, they are pinned ({reasons})")
            split = np.intersect1d(labels[mask & (labels >= 0)], labels[~mask & (labels >= 0)])
            if len(split):
                raise PlanError(_split_message(analysis, where, labels, int(split[0]), block))
            for lab in np.unique(labels[labels >= 0]).tolist():
                g = analysis.groups[int(analysis.group_of[lab])]
                local = int(analysis.local_of[lab])
                side = kept_units if mask[labels == lab][0] else removed
                other = removed if side is kept_units else kept_units
                if local in other.get(g.name, ()):
                    raise PlanError(f"{where}: unit {local} of group {g.name} is kept by one "
                                    "entry and removed by another")
                side.setdefault(g.name, set()).add(local)
        out = {name: tuple(sorted(set(range(analysis.group(name).size)) - units))
               for name, units in removed.items()}
        return cls._make(analysis, out, meta={"from": "tensor_indices"})

    @classmethod
    def from_ratio(cls, analysis: GroupAnalysis, ratio: float, *,
                   criterion: str | Callable[[GroupAnalysis, ChannelGroup], np.ndarray] = "l1",
                   round_to: int = 1, ignore: Iterable[str | torch.nn.Module] = (),
                   exact_only: bool = False, seed: int = 0,
                   include_softmax: bool = False, split_ties: bool = True) -> "Plan":
        """Remove ``ratio`` of every group's units, lowest score first.

        ``criterion``: a name in ``fxprune.CRITERIA`` ("l1" / "l2" magnitude of every
        member slice, "random", "fpgm"...; data-driven ones need an ``Importance`` with
        data) or a callable ``(analysis, group) -> scores``; an unknown name raises
        ``ImportanceError``. ``round_to``: kept counts are multiples of it.
        ``ignore``: modules, or module / parameter name prefixes, whose groups stay whole
        (a name that matches nothing in the model raises ``PlanError``).
        ``include_softmax``: also prune groups whose units a softmax normalises (a
        distribution over the units, ``inexact_kind == "softmax"``); left whole by default,
        since removing units changes what the distribution can express.
        ``split_ties=False``: ignore the analysis' ``split_ties`` (a chunk / split the
        forward cuts into equal pieces keeps equal counts in them by default, so that
        ``compile(output="module")`` can follow it) and ``count_ties`` (a reshape size
        computed from another group's width, Swin's ``C // num_heads``: by default that
        group follows the width's group, ``fxprune.core.count_ties``); the GraphModule
        takes any counts, the module output then refuses the plan (``LiteralSizeError``).
        """
        require_analysis(analysis, "Plan.from_ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or \
                not 0.0 <= ratio < 1.0 or math.isnan(ratio):
            raise PlanError(f"ratio must lie in [0, 1), got {ratio!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)):
            raise PlanError(f"Plan.from_ratio: round_to must be an int >= 1, got {round_to!r}"
                            + ("; the measured multiples need the planner: fxprune.plan(analysis, "
                               "criterion, ratio=..., round_to='auto')" if round_to == "auto" else ""))
        if round_to < 1:
            raise PlanError("round_to must be >= 1")
        ignore = resolve_ignore(analysis, ignore)
        criterion = resolve_criterion(analysis, criterion)
        rng = np.random.default_rng(seed)
        out: dict[str, tuple[int, ...]] = {}
        scored: dict[str, np.ndarray] = {}
        power_sums: dict = {}  # per weight dim, shared by the groups on its two dims
        groups = [g for g in analysis.groups if not (exact_only and not g.exact)]
        ties = analysis.split_ties if split_ties else ()
        if any(len(t.groups) == 1 for t in ties):  # scores first: atoms
            scored = {g.name: _scores(analysis, g, criterion, rng, power_sums) for g in groups}
        tied, held = tied_orders(analysis, scored) if ties else ({}, {})
        links, count_held = count_links(analysis) if split_ties and analysis.count_ties \
            else ({}, {})  # widths read off another group's width: followers follow

        def prunable(g: ChannelGroup) -> bool:
            return g.name not in held and not ("softmax" in g.inexact_kinds and not
                                               include_softmax) and not any(
                m.fqn == p or m.fqn.startswith(p + ".") for m in g.members for p in ignore)

        eligible = {g.name for g in groups if prunable(g)}
        links, count_held, multiple, floor = _leaders(analysis, links, count_held, eligible,
                                                      round_to)
        followers = {f for link in links.values() for f, _ in link.followers}
        for g in groups:
            if g.name not in eligible or g.name in count_held or g.name in followers:
                continue
            step = multiple.get(g.name, round_to)
            n_keep = max(step, int(round(g.size * (1 - ratio) / step)) * step)
            n_keep = min(max(n_keep, floor.get(g.name, 0)), g.size)
            if g.name in tied:  # the nearest count of whole atoms (removed lowest first)
                t = tied[g.name]
                cuts = t.cuts[((g.size - t.cuts) % round_to == 0) & (t.cuts < g.size)]
                n_keep = g.size - int(cuts[np.argmin(np.abs(g.size - cuts - n_keep))]) \
                    if len(cuts) else g.size
            if n_keep >= g.size:
                continue
            if g.name not in scored:
                scored[g.name] = _scores(analysis, g, criterion, rng, power_sums)
            order = tied[g.name].order[::-1] if g.name in tied else \
                np.argsort(-scored[g.name], kind="stable")
            out[g.name] = tuple(sorted(order[:n_keep].tolist()))
        if links:
            out = _followed(analysis, out, links, {
                f: scored[f] if f in scored else _scores(analysis, analysis.group(f), criterion,
                                                         rng, power_sums) for f in followers})
        out = _guarded(analysis, out, scored, tied)
        meta = {"ratio": ratio, "criterion": criterion_name(criterion)}
        meta.update(ties_meta(analysis, tied, held, split_ties))
        meta.update(count_ties_meta(analysis, links, count_held, split_ties))
        return cls._make(analysis, out, meta=meta)

    @classmethod
    def from_counts(cls, analysis: GroupAnalysis, counts: Mapping[str | tuple[str, int], int],
                    *, criterion: str | Callable[[GroupAnalysis, ChannelGroup], np.ndarray]
                    = "l1", seed: int = 0) -> "Plan":
        """Keep ``n`` indices of parameter dims: ``{"blocks.0.attn.qkv.weight": 288}`` (dim
        0) or ``{(fqn, dim): n}``; which units stay is chosen by ``criterion`` (as in
        ``from_ratio``) within the dim's group.

        ``n`` must be reachable with whole units. On a head-structured dim a unit covers
        several indices (``split_policy="heads"``: one head's q, k and v rows;
        ``"head_dim"``: one index of every head), so a count that does not divide into
        whole units raises ``PlanError`` naming the module and the valid counts.
        """
        criterion = resolve_criterion(analysis, criterion)
        rng = np.random.default_rng(seed)
        out: dict[str, tuple[int, ...]] = {}
        for key, n in counts.items():
            fqn, dim = (key, 0) if isinstance(key, str) else key
            labels, where = _tensor_labels(analysis, fqn, dim)
            g, units, step, fixed = _dim_units(analysis, labels, where)
            valid = [fixed + step * j for j in range(1, len(units) + 1)]
            if n not in valid:
                raise PlanError(_count_message(where, n, len(labels), g, step, valid))
            n_units = (n - fixed) // step
            if g.name in out:
                kept = np.intersect1d(out[g.name], units)
                if len(kept) != n_units:
                    raise PlanError(f"{where}: {n} indices keep {n_units} units of group "
                                    f"{g.name}, another entry keeps {len(kept)} of them")
                continue
            scores = _scores(analysis, g, criterion, rng)
            chosen = units[np.argsort(-scores[units], kind="stable")[:n_units]]
            elsewhere = np.setdiff1d(np.arange(g.size), units)  # units not on this dim stay
            out[g.name] = tuple(sorted(np.concatenate([chosen, elsewhere]).tolist()))
        out = {name: keep for name, keep in out.items()
               if len(keep) < analysis.group(name).size}
        return cls._make(analysis, out, meta={"from": "counts",
                                              "criterion": criterion_name(criterion)})

    @classmethod
    def _make(cls, analysis: GroupAnalysis, keep: dict[str, tuple[int, ...]],
              meta: Mapping[str, Any] | None = None) -> "Plan":
        sizes = {name: analysis.group(name).size for name in keep}
        for name, idx in keep.items():
            if not idx:
                raise PlanError(f"plan removes every unit of group {name}: keep at least one "
                                "(removing whole layers is not supported by this plan)")
        _check_no_empty_slice(analysis, keep)
        return cls(analysis.fingerprint, keep, sizes, dict(meta or {}), analysis)

    # -- use -------------------------------------------------------------------------
    def check(self, analysis: GroupAnalysis) -> None:
        """Raise ``PlanError`` unless this plan was made for ``analysis``'s graph."""
        if self.fingerprint != analysis.fingerprint:
            raise PlanError(
                f"plan was made for graph {self.fingerprint}, not {analysis.fingerprint}: "
                "re-create the plan from fxprune.analyze() of this model and inputs")
        for name, size in self.sizes.items():
            g = analysis.group(name)
            if g.size != size:
                raise PlanError(f"group {name} has {g.size} units, plan expects {size}")
            if not self.keep[name]:
                raise PlanError(f"plan removes every unit of group {name}")
        _check_no_empty_slice(analysis, self.keep)

    def kept_labels(self, analysis: GroupAnalysis) -> np.ndarray:
        """Bool per global unit label: True where the unit is kept."""
        self.check(analysis)
        kept = np.ones(analysis.num_units, dtype=bool)
        for name, idx in self.keep.items():
            g = analysis.group(name)
            mine = analysis.group_of == g.id
            local = np.zeros(g.size, dtype=bool)
            local[list(idx)] = True
            kept[mine] = local[analysis.local_of[mine]]
        return kept

    def removed(self) -> dict[str, int]:
        return {n: self.sizes[n] - len(k) for n, k in self.keep.items()}

    # -- serialization -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": PLAN_VERSION, "fingerprint": self.fingerprint,
                           "groups": {n: {"size": self.sizes[n], "keep": list(k)}
                                      for n, k in self.keep.items()},
                           "meta": dict(self.meta)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"unsupported plan version {data.get('version')}")
        groups = data["groups"]
        return cls(data["fingerprint"], {n: tuple(g["keep"]) for n, g in groups.items()},
                   {n: int(g["size"]) for n, g in groups.items()}, data.get("meta", {}))


def _tensor_labels(analysis: GroupAnalysis, fqn: str, dim: int) -> tuple[np.ndarray, str]:
    """Unit labels of a parameter dim (through tied aliases) and a name for messages."""
    canonical = next((c for c, names in analysis.tensor_aliases.items() if fqn in names), fqn)
    where = f"module '{fqn.rpartition('.')[0]}': {fqn.rpartition('.')[2]} dim {dim}"
    labels = analysis.tensor_labels.get((canonical, dim))
    if labels is None:
        raise PlanError(f"{where} is not a tensor dim that the analysis tracks")
    if (labels < 0).all():
        reasons = "; ".join(analysis.pin_reasons.get((canonical, dim), ())) or "never coupled"
        raise PlanError(f"{where} cannot be pruned: every index is pinned ({reasons})")
    return labels, where


def _dim_units(analysis: GroupAnalysis, labels: np.ndarray, where: str):
    """(group, its units on this dim, indices per unit, pinned index count) of one dim."""
    inside = labels >= 0
    gids = np.unique(analysis.group_of[labels[inside]])
    if len(gids) != 1:
        raise PlanError(f"{where} spans {len(gids)} groups "
                        f"({', '.join(analysis.groups[int(i)].name for i in gids[:4])}): "
                        "give counts for each group's own source dim, or use "
                        "Plan.from_tensor_indices")
    g = analysis.groups[int(gids[0])]
    units, widths = np.unique(analysis.local_of[labels[inside]], return_counts=True)
    if (widths != widths[0]).any():
        raise PlanError(f"{where}: the units of group {g.name} cover unequal numbers of "
                        "indices here; use Plan.from_tensor_indices")
    return g, units, int(widths[0]), int((~inside).sum())


def _count_message(where: str, n: int, total: int, g: ChannelGroup, step: int,
                   valid: list[int]) -> str:
    shown = ", ".join(map(str, valid)) if len(valid) <= 8 else \
        f"{', '.join(map(str, valid[:4]))}, ..., {', '.join(map(str, valid[-2:]))}"
    why = (f"a unit of group {g.name} covers {step} indices here (attention heads are "
           "removed whole: with split_policy='heads' a unit is one head across q, k and v, "
           "with 'head_dim' one index of every head)" if step > 1 else
           f"{total - valid[-1]} indices are pinned")
    return f"{where}: cannot keep {n} of {total} indices: {why}; valid counts are {shown}"


def _split_message(analysis: GroupAnalysis, where: str, labels: np.ndarray, lab: int,
                   block: int) -> str:
    """A cut through unit ``lab``: every slice it spans, and this tensor's valid sets."""
    g = analysis.groups[int(analysis.group_of[lab])]
    local = int(analysis.local_of[lab])
    spans = [f"{m.fqn}[{m.dim}] {_ranges(m.indices(local))}" for m in g.members
             if len(m.indices(local))]
    units = np.unique(labels[labels >= 0])
    valid = [_ranges(np.unique(np.flatnonzero(labels == u) // block)) for u in units[:8]]
    unit_word = "blocks" if block > 1 else "indices"
    return (f"{where}: the kept {unit_word} cut through unit {local} of group {g.name}, which "
            f"spans {'; '.join(spans[:6])}. Keep or remove whole units; the valid sets of "
            f"{unit_word} here are {' | '.join(valid)}{' | ...' if len(units) > 8 else ''} "
            f"(a key/value head goes with the query heads that share it; a rotary pair "
            f"(i, i + head_dim/2) goes together)")


def _ranges(idx: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    idx = sorted(int(i) for i in idx)
    parts, start = [], None
    for a, b in zip(idx, idx[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ",".join(parts) if len(parts) <= 12 else ",".join(parts[:12]) + ",..."


def _leaders(analysis: GroupAnalysis, links: dict, held: dict, eligible: set[str],
             round_to: int) -> tuple[dict, dict, dict[str, int], dict[str, int]]:
    """Count-tie leaders of ``Plan.from_ratio``: (links kept, groups held whole -> why,
    each leader's kept-count multiple, the fewest units it keeps so that every follower
    keeps ``round_to``)."""
    sizes = {g.name: g.size for g in analysis.groups}
    multiple: dict[str, int] = {}
    floor: dict[str, int] = {}
    held = dict(held)
    for lead, link in links.items():
        blocked = [f for f, _ in [(lead, 1), *link.followers] if f not in eligible]
        m = leader_multiple(link, sizes, {n: round_to for n in sizes}, round_to)
        cap = min(int((sizes[f] - round_to) / r) for f, r in link.followers)
        if blocked:
            held[lead] = ("it is left whole (ignore=, softmax, exact_only)" if blocked[0] == lead
                          else f"its count-tie follower {blocked[0]} is left whole (ignore=, "
                          f"softmax, exact_only), and it must follow this group's count")
        elif m == 0 or cap < m:
            held[lead] = (f"its followers lose whole units only if it loses multiples of "
                          f"{m or link.step}, which its size {sizes[lead]} does not allow")
        else:
            multiple[lead] = m
            floor[lead] = -(-(sizes[lead] - cap) // m) * m
    links, held = hold_links(links, held)
    return links, held, {n: m for n, m in multiple.items() if n in links}, floor


def _followed(analysis: GroupAnalysis, keep: Mapping[str, tuple[int, ...]], links: Mapping,
              scores: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """``keep`` with every count-tie follower keeping what its leader's count implies."""
    kept = np.ones(analysis.num_units, dtype=bool)
    for name, idx in keep.items():
        mine = np.flatnonzero(analysis.group_of == analysis.group(name).id)
        kept[mine] = False
        kept[mine[list(idx)]] = True
    kept = follow_counts(analysis, kept, links, scores)
    out = dict(keep)
    for link in links.values():
        for name, _ in link.followers:
            mine = kept[analysis.group_of == analysis.group(name).id]
            if not mine.all():
                out[name] = tuple(np.flatnonzero(mine).tolist())
    return out


def _guarded(analysis: GroupAnalysis, keep: Mapping[str, tuple[int, ...]],
             scores: Mapping[str, np.ndarray], tied: Mapping[str, Any] | None = None
             ) -> dict[str, tuple[int, ...]]:
    """``keep`` with the best-scored unit (its atom, for ``tied`` groups) of every tensor
    dim it would empty put back."""
    kept = np.ones(analysis.num_units, dtype=bool)
    labels = {name: np.flatnonzero(analysis.group_of == analysis.group(name).id)
              for name in keep}
    for name, idx in keep.items():
        kept[labels[name]] = False
        kept[labels[name][list(idx)]] = True
    atoms = None
    if tied:
        atoms = np.full(analysis.num_units, -1, dtype=np.int64)
        offset = 0
        for name, t in tied.items():
            g = analysis.group(name)
            atoms[np.flatnonzero(analysis.group_of == g.id)] = t.atom + offset
            offset += g.size
    kept = DimGuard(analysis, scores, atoms)(kept)
    return {name: tuple(np.flatnonzero(kept[lab]).tolist()) for name, lab in labels.items()}


class DimGuard:
    """Puts back the best-scored unit of every tensor dim a removal set would empty.

    A unit set can cover a whole layer while its group survives: a concatenated branch
    (GoogLeNet, DenseNet) or a channel-shuffled half (ShuffleNet) holds only some of
    the group's units. Such a layer keeps one unit (the plan may then miss ``round_to``
    for that group by one), (``Plan.from_ratio`` and the planner
    both use it). ``scores``: group name -> per-unit scores (missing groups: none kept
    back from them). ``atoms``: an atom id per global label (-1: none) for units that go
    together (``fxprune.core.ties``): a unit put back brings its whole atom.
    """

    def __init__(self, analysis: GroupAnalysis, scores: Mapping[str, np.ndarray],
                 atoms: np.ndarray | None = None) -> None:
        self.atoms = atoms
        best = np.full(analysis.num_units, -np.inf)
        for g in analysis.groups:
            if g.name in scores:
                best[analysis.group_of == g.id] = scores[g.name]
        sizes = np.bincount(analysis.group_of, minlength=len(analysis.groups))
        self.pieces = []
        for lab in analysis.tensor_labels.values():
            if not len(lab) or lab[0] < 0:
                continue
            gs = analysis.group_of[lab] if len(lab) > 1 and (np.diff(lab) == 1).all() else None
            if gs is not None and (np.diff(gs) >= 0).all():  # a run of labels: no sort
                touched = gs[np.concatenate([[True], gs[1:] != gs[:-1]])]
                if len(lab) < sizes[touched].sum():
                    self.pieces.append(lab)
            elif (lab >= 0).all():
                piece = np.unique(lab)
                if len(piece) < self._group_size(analysis, piece, sizes):
                    self.pieces.append(piece)
        self.best = best
        lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)
        self.flat = np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths[:-1])]) if self.pieces else \
            np.zeros(0, np.int64)

    @staticmethod
    def _group_size(analysis: GroupAnalysis, labels: np.ndarray, sizes: np.ndarray) -> int:
        """Units of the groups ``labels`` touch: a dim holding all of them empties only
        with its group, which the caps already forbid. ``sizes``: units per group id
        (counted once, not by an ``isin`` over every unit per dim)."""
        return int(sizes[np.unique(analysis.group_of[labels])].sum())

    def __call__(self, kept: np.ndarray) -> np.ndarray:
        if not len(self.flat):
            return kept
        alive = np.add.reduceat(kept[self.flat].astype(np.int64), self.starts) > 0
        if alive.all():
            return kept
        kept = kept.copy()
        for i in np.flatnonzero(~alive):
            piece = self.pieces[i]
            unit = piece[np.argmax(self.best[piece])]
            kept[unit] = True
            if self.atoms is not None and self.atoms[unit] >= 0:
                kept[self.atoms == self.atoms[unit]] = True
        return kept


def _check_no_empty_slice(analysis: GroupAnalysis, keep: Mapping[str, Iterable[int]]) -> None:
    """A tensor dim may not lose every index (a cat input or a split piece whose units are
    all removed would leave a layer with no channel, which torch cannot run)."""
    removed: dict[tuple[str, int], np.ndarray] = {}
    for name, idx in keep.items():
        g = analysis.group(name)
        gone = np.ones(g.size + 1, dtype=bool)  # by local unit; the extra slot: -1 (pinned)
        idx = np.asarray(list(idx), dtype=np.int64)
        gone[idx[(idx >= 0) & (idx < g.size)]] = False
        gone[-1] = False
        for m in g.members:
            hit = removed.setdefault((m.fqn, m.dim), np.zeros(len(m.units), dtype=bool))
            hit |= gone[m.units]
    for (fqn, dim), hit in removed.items():
        if len(hit) and hit.all():
            raise PlanError(f"plan removes every index of {fqn} dim {dim}: keep at least one "
                            "of its units (removing a whole branch is not supported), or "
                            "leave its group whole with ignore=...")


def magnitude_scores(analysis: GroupAnalysis, group: ChannelGroup, *, p: int = 1,
                     cache: dict | None = None) -> np.ndarray:
    """The L``p`` norm of each unit's parameters (buffers such as running statistics are
    not weights and do not count), every member slice of the group together: ``sum |w|`` (p=1), ``sqrt(sum w^2)`` (p=2, the standard L2 norm, as
    ``fxprune.importance.l2`` for one member). Shape ``(group.size,)``; meta tensors: zeros.
    ``cache``: a dict shared by the calls of one plan (a weight's dim-0 and dim-1 sums
    come from one pass over it, and the group on its other dim reads them back).
    Raises ``PlanError`` for another ``p``."""
    if p not in (1, 2):
        raise PlanError(f"magnitude_scores: p must be 1 or 2, got {p!r}")
    scores = np.zeros(group.size)
    gm = analysis.gm
    for m in group.members:
        t = _tensor(gm, m.fqn)
        if not isinstance(t, torch.nn.Parameter) or t.is_meta or not t.is_floating_point():
            continue
        per_index = _cached_power_sum(t, m.fqn, m.dim, p, cache)
        inside = m.units >= 0  # bincount, not np.add.at: same sums, ~10x less time
        scores += np.bincount(m.units[inside], weights=per_index[inside],
                              minlength=group.size)
    return np.sqrt(scores) if p == 2 else scores


def _cached_power_sum(t: torch.Tensor, fqn: str, dim: int, p: int,
                      cache: dict | None) -> np.ndarray:
    """``_per_index_power_sum`` as numpy; with ``cache``, dims 0 and 1 of a weight are
    summed together from one pass over ``|w|^p`` (half the time of two passes)."""
    if cache is None or t.dim() < 2 or dim > 1:
        return _per_index_power_sum(t.detach(), dim, p).cpu().numpy()
    key = (fqn, dim, p, t.data_ptr(), tuple(t.shape))
    if key not in cache:
        rows, cols = _row_col_power_sums(t.detach().float(), p)
        cache[(fqn, 0, p, t.data_ptr(), tuple(t.shape))] = rows
        cache[(fqn, 1, p, t.data_ptr(), tuple(t.shape))] = cols
    return cache[key]


_CHUNK = 1 << 18  # elements of |w|^p written at a time: a cache-sized scratch, reused


def _row_col_power_sums(w: torch.Tensor, p: int) -> tuple[np.ndarray, np.ndarray]:
    """``sum |w|^p`` over every dim but 0, and over every dim but 1, in float32.

    Rows are powered a block at a time into one small scratch buffer: a weight-sized
    temporary is fresh memory at every weight (page faults took 5 ms of a 9 MB ViT or
    ConvNeXt weight, against 1 ms for the arithmetic)."""
    w3 = w.reshape(w.shape[0], w.shape[1], -1)
    n_out, n_in, k = w3.shape
    step = max(1, _CHUNK // max(1, n_in * k))
    scratch = torch.empty(min(step, n_out) * n_in * k, dtype=w.dtype, device=w.device)
    rows = torch.empty(n_out, dtype=w.dtype, device=w.device)
    cols = torch.zeros(n_in, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        for start in range(0, n_out, step):
            block = w3[start:start + step]
            out = scratch[:block.numel()].view(block.shape)
            torch.abs(block, out=out) if p == 1 else torch.mul(block, block, out=out)
            pairs = out.sum(2) if k > 1 else out[:, :, 0]  # (out, in): kernel summed
            rows[start:start + len(block)] = pairs.sum(1)
            cols += pairs.sum(0)
    return rows.cpu().numpy(), cols.cpu().numpy()


def _per_index_power_sum(t: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """``sum |w|^p`` over every dim but ``dim``, in float32, with at most one temporary
    and no transposed copy of the weight (0.3 s of a ResNet-50 plan went to three
    temporaries per weight)."""
    t = t.float()
    if t.dim() == 1:
        return t.abs() if p == 1 else t * t
    if dim == 0 and p == 1:  # rows are contiguous: one fused sum |w|, no temporary
        return torch.linalg.vector_norm(t.reshape(len(t), -1), 1, dim=1)
    powered = t.abs() if p == 1 else t * t
    if dim == 0:
        return powered.reshape(len(t), -1).sum(1)
    trailing = tuple(range(dim + 1, t.dim()))
    if trailing:  # contiguous inner dims first: a strided reduction over all is ~1.5x slower
        powered = powered.sum(trailing)
    return powered.sum(tuple(range(dim)))


def _tensor(gm: torch.nn.Module, fqn: str) -> torch.Tensor | None:
    obj: Any = gm
    for part in fqn.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


#: How a criterion *name* becomes a scoring callable. Core code imports no planning
#: module, so the planning layer installs its resolver here when it loads
#: (``fxprune.importance.resolve_criterion``: one registry, unknown names raise); until
#: then only the built-in magnitude/random names and callables are accepted.
criterion_resolver: Callable[[GroupAnalysis, Any], Any] | None = None


def require_analysis(analysis: Any, where: str) -> None:
    """``PlanError`` unless ``analysis`` is a ``GroupAnalysis`` (a model passed where the
    analysis goes failed as ``AttributeError: ... no attribute 'gm'``)."""
    if not isinstance(analysis, GroupAnalysis):
        raise PlanError(f"{where} takes the GroupAnalysis of fxprune.analyze(model, "
                        f"example_inputs), not {type(analysis).__name__}: "
                        f"analysis = fxprune.analyze(model, (x,)); {where}(analysis, ...)")


def resolve_criterion(analysis: GroupAnalysis, criterion: Any) -> Any:
    """``criterion`` as a callable or a built-in name ("l1", "l2", "random"), through the
    installed resolver (the one criterion registry); an unknown name raises."""
    if criterion_resolver is not None:
        return criterion_resolver(analysis, criterion)
    if callable(criterion) or criterion in _MAGNITUDE_P or criterion == "random":
        return criterion
    raise PlanError(f"criterion {criterion!r}: the criterion registry is not loaded (use "
                    "fxprune.Plan, or import fxprune.planning.importance first); 'l1', 'l2', "
                    "'random' and callables work without it")


def criterion_name(criterion: Any) -> str:
    if isinstance(criterion, str):
        return criterion
    return getattr(criterion, "name", None) or getattr(criterion, "__name__", None) or \
        type(criterion).__name__


def resolve_ignore(analysis: GroupAnalysis, ignore: Iterable[Any]) -> tuple[str, ...]:
    """``ignore=`` entries as name prefixes: a module becomes its name in the analysed
    graph (found by identity, or by its parameters); a name must match some module,
    parameter or buffer of the model. Raises ``PlanError`` otherwise (a typo would
    silently prune what the user meant to protect)."""
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = (ignore,)
    gm = analysis.gm
    names = [n for n, _ in gm.named_modules()] + [n for n, _ in gm.named_parameters()] + \
        [n for n, _ in gm.named_buffers()]
    out: list[str] = []
    for entry in ignore:
        if isinstance(entry, torch.nn.Module):
            out.append(_module_name(gm, entry))
        elif isinstance(entry, str):
            if not any(n == entry or n.startswith(entry + ".") for n in names):
                close = sorted({n for n in names if entry.split(".")[-1] in n})[:5]
                raise PlanError(f"ignore={entry!r} matches no module, parameter or buffer of "
                                f"the analysed model" + (f" (similar: {close})" if close else
                                                         "") + "; pass a name from "
                                "model.named_modules() or the module itself")
            out.append(entry)
        else:
            raise PlanError(f"ignore= takes module names or modules, got {type(entry).__name__}")
    return tuple(out)


def _module_name(gm: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in gm.named_modules():
        if m is module:
            return name
    # torch.export copies modules but keeps parameter names: the longest common prefix
    own = {id(p) for p in module.parameters()}
    found = [n.split(".")[:-1] for n, p in gm.named_parameters() if id(p) in own]
    if found and len(found) == len(own):
        prefix = found[0]
        for parts in found[1:]:
            while parts[:len(prefix)] != prefix:
                prefix = prefix[:-1]
        if prefix:
            return ".".join(prefix)
    raise PlanError(f"ignore= got a {type(module).__name__} that is not part of the analysed "
                    "model; pass the model's own submodule, or its name")


def _scores(analysis: GroupAnalysis, g: ChannelGroup,
            criterion: str | Callable[[GroupAnalysis, ChannelGroup], np.ndarray],
            rng: np.random.Generator, cache: dict | None = None) -> np.ndarray:
    """One score per unit of ``g``: random, a user callable, or L1/L2 magnitude
    (``cache``: shared by one plan's calls, see ``magnitude_scores``)."""
    if criterion == "random":
        return rng.random(g.size)
    if callable(criterion):
        return np.asarray(criterion(analysis, g), dtype=np.float64)
    if criterion not in _MAGNITUDE_P:
        raise PlanError(f"unknown criterion {criterion!r} for Plan.from_ratio/from_counts: use "
                        f"'l1', 'l2', 'random' or a callable fn(analysis, group) -> scores "
                        "(data-driven criteria: fxprune.plan(analysis, name, ...))")
    return magnitude_scores(analysis, g, p=_MAGNITUDE_P[criterion], cache=cache)


_MAGNITUDE_P = {"l1": 1, "l2": 2}
