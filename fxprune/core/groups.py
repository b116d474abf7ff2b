"""Analysis results: coupled groups of parameter slices (frozen, keyed by names)."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx

__all__ = ["Member", "ChannelGroup", "GroupAnalysis", "ModeAnalysis", "Pin", "SplitTie",
           "CountTie"]


@dataclass(frozen=True)
class Member:
    """One parameter (or buffer) dim that a group slices.

    ``units[i]`` is the group-local unit that index ``i`` along ``dim`` belongs to, or -1
    when that index belongs to another group or is never pruned (a concat consumer's
    columns span several groups).
    """

    fqn: str
    dim: int
    role: str  # "out": starts the space; "in": consumes it; "dep": follows it
    units: np.ndarray = field(repr=False, compare=False)

    def indices(self, unit: int) -> np.ndarray:
        """Indices along ``dim`` removed together with ``unit``."""
        return np.flatnonzero(self.units == unit)

    @property
    def index_map(self) -> str:
        """Short description: how units map to indices (identity, offset, xK, blocked)."""
        inside = np.flatnonzero(self.units >= 0)
        if not len(inside):
            return "-"
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        u = self.units[lo:hi]
        per = len(inside) // max(len(np.unique(u[u >= 0])), 1)
        span = f"[{lo}:{hi}]" if (lo, hi) != (0, len(self.units)) else ""
        contiguous = len(inside) == hi - lo
        if per == 1:
            kind = "identity" if contiguous and np.all(np.diff(u) >= 0) else "permuted"
        elif np.all(np.diff(u) >= 0):
            kind = f"x{per} blocks"
        else:
            kind = f"x{per} strided"
        return f"{kind}{span}" if contiguous else f"{kind}{span} (partial)"


@dataclass(frozen=True)
class ChannelGroup:
    """A coupled group: parameter slices that must be removed together.

    ``size`` prunable units, each covering ``granularity`` indices of the group's source
    weight (1 for channels, head_dim for heads). ``exact`` is False when the group passes
    a channel mixer (LayerNorm, softmax over channels): pruning it is legal, not exact.
    """

    id: int
    size: int
    granularity: int
    exact: bool
    members: tuple[Member, ...]
    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...] = field(repr=False)
    merged_by: tuple[str, ...] = field(repr=False)
    inexact_because: tuple[str, ...] = field(repr=False)
    pinned_because: tuple[str, ...] = field(repr=False)
    origin: str = ""
    # (slice key "fqn[dim]", FX node whose op uses that slice): a consumer conv's input
    # columns point at the conv, so a group graph is connected through its consumers
    slice_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # why inexact, by kind: "statistics" (LayerNorm/GroupNorm, mean/var over the units:
    # they stay features) and/or "softmax" (the units are normalised into a distribution:
    # default plans leave such groups whole)
    inexact_kinds: tuple[str, ...] = ()

    @property
    def inexact_kind(self) -> str:
        """The kinds of channel mixer ("softmax", "statistics"); empty for exact groups."""
        return "+".join(self.inexact_kinds) if not self.exact else ""

    @property
    def name(self) -> str:
        """Stable, readable key: the first source slice, e.g. ``layer1.0.conv1.weight[0]``."""
        for m in self.members:
            if m.role == "out":
                return f"{m.fqn}[{m.dim}]"
        return self.members[0].fqn + f"[{self.members[0].dim}]" if self.members else self.origin

    def to_networkx(self):
        """The group's channel space as a DiGraph: FX nodes, data edges, parameter slices."""
        from fxprune.core.report import group_graph

        return group_graph(self)

    def to_dot(self) -> str:
        from fxprune.core.report import group_dot

        return group_dot(self)

    def why(self) -> str:
        """Which coupling nodes merged this group's spaces (the answer to "why coupled?")."""
        from fxprune.core.report import explain

        return explain(self)


@dataclass(frozen=True)
class Pin:
    """A parameter dim whose indices (all, or ``pinned`` of ``size``) no plan may remove.

    ``reason`` is the first cause found (a barrier op, a model output, an op without a
    rule...), ``node`` the FX node that caused it ("" when no node did) and ``source``
    the user's source line of that node when the tracer recorded it. ``reasons`` lists
    every cause (a dim can reach several barriers).
    """

    fqn: str
    dim: int
    pinned: int
    size: int
    reason: str
    node: str = ""
    source: str = ""
    reasons: tuple[str, ...] = field(default=(), repr=False)

    @property
    def whole(self) -> bool:
        """True when no index of this dim can be removed."""
        return self.pinned == self.size


@dataclass(frozen=True)
class SplitTie:
    """A ``chunk(n)`` / ``split(int)`` along a channel dim: the forward cuts equal pieces
    (the last one shorter where the width is not a multiple), so a plan must keep the
    counts that chunk / split cuts from its kept width (``fxprune.core.ties``).

    ``pieces[k]`` holds the global unit label of every index of piece ``k`` along ``dim``
    (-1: never pruned); ``groups`` names the groups whose units the pieces hold; ``source``
    is the user's line of the node when the tracer recorded it; ``chunks`` is ``n`` of a
    ``chunk(n)`` (0 for ``split(int)``, whose int an attribute may hold).
    """

    node: str
    dim: int
    pieces: tuple[np.ndarray, ...] = field(repr=False, compare=False)
    groups: tuple[str, ...]
    source: str = ""
    chunks: int = 0

    @property
    def shortfall(self) -> int:
        """How many indices fewer the last piece holds than the others (0: all equal)."""
        return len(self.pieces[0]) - len(self.pieces[-1])

    @property
    def cut(self) -> str:
        """The pieces in words: "3 equal pieces", "3 pieces, the last 2 shorter"."""
        return f"{len(self.pieces)} " + (f"pieces, the last {self.shortfall} shorter"
                                         if self.shortfall else "equal pieces")

    def describe(self) -> str:
        return f"{self.node} ({self.cut}" + \
            (f" at {self.source})" if self.source else ")")


@dataclass(frozen=True)
class ModeAnalysis:
    """The model's graph in another mode (``mode``: "train"), analysed with the same unit
    labels as the analysis that holds it: ``analysis.gm`` is that mode's graph,
    ``modules`` the submodules with parameters that only it runs."""

    mode: str
    analysis: GroupAnalysis = field(repr=False)
    modules: tuple[str, ...]

    @property
    def note(self) -> str:
        shown = ", ".join(self.modules[:4]) + (" ..." if len(self.modules) > 4 else "")
        return (f"the {self.mode}-mode path was analysed too: {shown} run only in "
                f"{self.mode} mode; the channels they read are coupled with the groups, "
                f"their own channels are kept whole")


@dataclass(frozen=True)
class CountTie:
    """A reshape/view size computed from another tensor's prunable dim (torchvision's
    ``qkv.reshape(B, N, 3, num_heads, C // num_heads)`` with ``C = x.shape[-1]``): the
    forward derives the width of ``axis`` of ``node`` from the width of ``read``, so a
    plan must keep ``kept(labels) * den == kept(source_labels) * num`` (a tie of counts
    between two groups, ``fxprune.core.count_ties``).

    ``source_labels`` / ``labels``: the global unit label of every index of the read dim
    and of the reshaped dim (-1: never pruned); ``leader`` / ``follower``: the groups
    whose units they hold ("" when several do); ``why``: "" when a plan can keep the tie
    by the follower following the leader, else why not (default plans then hold both
    groups whole).
    """

    node: str
    axis: int
    read: str  # the size read, e.g. "norm.shape[2]"
    source_labels: np.ndarray = field(repr=False, compare=False)
    labels: np.ndarray = field(repr=False, compare=False)
    leader: str
    follower: str
    num: int
    den: int
    source: str = ""
    why: str = ""

    def describe(self) -> str:
        ratio = "" if self.num == self.den == 1 else \
            (f" // {self.den}" if self.num == 1 else f" * {self.num}/{self.den}")
        where = f"dim {self.axis}" if self.axis >= 0 else "its inner width"
        return (f"{self.node} ({where} = {self.read}{ratio}"
                + (f" at {self.source})" if self.source else ")"))


@dataclass(frozen=True)
class GroupAnalysis:
    """Result of ``find_groups``: groups plus the per-node unit labels the rewrites use.

    Labels are global prunable-unit ids: ``group_of[label]`` and ``local_of[label]`` give
    the group id and the unit's index inside it; -1 marks indices that are never pruned.
    """

    gm: torch.fx.GraphModule = field(repr=False, compare=False)
    groups: tuple[ChannelGroup, ...]
    fingerprint: str
    node_labels: Mapping[str, Any] = field(repr=False, compare=False)
    tensor_labels: Mapping[tuple[str, int], np.ndarray] = field(repr=False, compare=False)
    group_of: np.ndarray = field(repr=False, compare=False)
    local_of: np.ndarray = field(repr=False, compare=False)
    barriers: tuple[str, ...] = field(repr=False, default=())
    example_inputs: tuple = field(repr=False, compare=False, default=())
    module_notes: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    tensor_aliases: Mapping[str, tuple[str, ...]] = field(repr=False, compare=False,
                                                          default_factory=dict)
    pin_reasons: Mapping[tuple[str, int], tuple[str, ...]] = field(
        repr=False, compare=False, default_factory=dict)  # why a tensor dim is (partly) pinned
    # groups a uniform plan (``fxprune.plan(..., uniform=True)``) leaves whole, read from
    # the model's own config at analysis time: group name -> why
    uniform_whole: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)
    # group name -> (leader group name, units it loses per unit the leader's kind loses):
    # a hidden size that must shrink with the heads (head_dim = hidden_size // heads)
    uniform_links: Mapping[str, tuple[str, int]] = field(repr=False, compare=False,
                                                         default_factory=dict)
    # chunk / split(int) nodes whose equal pieces cut a group's channels: default plans
    # keep the same count in each piece (``fxprune.core.ties``)
    split_ties: tuple[SplitTie, ...] = field(repr=False, compare=False, default=())
    # reshape/view sizes computed from another group's width (``C // num_heads`` with C
    # read off the block input): default plans make the follower's count follow the
    # leader's (``fxprune.core.count_ties``)
    count_ties: tuple["CountTie", ...] = field(repr=False, compare=False, default=())
    # the model captured in another mode too (train: auxiliary heads), its couplings and
    # pins merged into these groups (``passes.find_groups``, ``other_modes=``)
    other_modes: tuple[ModeAnalysis, ...] = field(repr=False, compare=False, default=())

    @property
    def notes(self) -> tuple[str, ...]:
        """What the analysis did beyond the captured graph (other modes analysed)."""
        return tuple(m.note for m in self.other_modes)

    def group(self, key: int | str) -> ChannelGroup:
        """A group by id, by name (``"conv1.weight[0]"``), by any slice it holds
        (``"bn1.weight[0]"``, ``"conv2.weight[1]"``), or by a parameter or module whose
        output channels start it (``"conv1.weight"``, ``"conv1"``, a container such as
        timm's ``ConvNormAct`` when one group is produced inside it).

        Raises ``KeyError`` naming the nearest group names when nothing matches, and the
        candidates when a slice spans several groups (a concat consumer's columns: use
        ``groups_of``); ``TypeError`` for a key that is neither an int id nor a str."""
        if isinstance(key, bool) or not isinstance(key, (int, str, np.integer)):
            raise TypeError(f"a group key is an int id or a str name, got {type(key).__name__} "
                            f"{key!r}")
        found = self._by_key.get(int(key) if isinstance(key, np.integer) else key)
        if found is not None:
            return found
        if isinstance(key, str):
            keys = [key] if key.endswith("]") else [f"{key}[0]", f"{key}.weight[0]"]
            for k in keys:
                hits = self._by_slice.get(k, ())
                if len(hits) == 1:
                    return hits[0]
                if len(hits) > 1:
                    raise KeyError(f"{k!r} is sliced by {len(hits)} groups "
                                   f"({', '.join(g.name for g in hits[:4])}"
                                   f"{', ...' if len(hits) > 4 else ''}); pick one by name, "
                                   f"or list them with analysis.groups_of({key!r})")
        import difflib
        import re

        if isinstance(key, str) and not key.endswith("]"):  # a container module (timm's
            outs = [g for g in self.groups  # ConvNormAct): the groups produced inside it
                    if any(m.role == "out" and m.fqn.startswith(key + ".") for m in g.members)]
            if len(outs) == 1:
                return outs[0]
            if outs:
                raise KeyError(f"module {key!r} produces {len(outs)} groups "
                               f"({', '.join(g.name for g in outs[:4])}"
                               f"{', ...' if len(outs) > 4 else ''}); pick one by name, or "
                               f"list them with analysis.groups_of({key!r})")
        if isinstance(key, str):
            m = re.fullmatch(r"(.+)\[(\d+)\]", key)
            fqn, dim = (m.group(1), int(m.group(2))) if m else (key, 0)
            why = self.pin_reasons.get((fqn, dim)) or self.pin_reasons.get((f"{fqn}.weight", dim))
            if why:
                raise KeyError(f"{key!r} is in no group: it is left whole ({why[0]}); "
                               f"analysis.pins() lists every whole dim with its reason")
        names = [g.name for g in self.groups]
        near = difflib.get_close_matches(str(key), list(dict.fromkeys(names + list(self._by_slice))),
                                         n=3)
        raise KeyError(f"no group {key!r}" + (f"; did you mean {', '.join(map(repr, near))}?"
                                              if near else f"; groups are {names[:10]}..."))

    def groups_of(self, name: str) -> tuple[ChannelGroup, ...]:
        """Every group that slices parameter (or buffer) ``name``, or any parameter of
        module ``name``, on any dim, in group order (empty when none does); a slice key
        ``"fqn[dim]"`` (as ``group`` takes it) gives the groups holding part of that dim."""
        if not isinstance(name, str):
            raise TypeError(f"groups_of takes a parameter, module or slice name (str), not "
                            f"{type(name).__name__} {name!r}; by id: analysis.group({name!r})")
        if name.endswith("]"):
            return self._by_slice.get(name, ())
        seen: dict[int, ChannelGroup] = {}
        for g in self.groups:
            if any(m.fqn == name or m.fqn.startswith(name + ".") for m in g.members):
                seen[g.id] = g
        return tuple(seen.values())

    @functools.cached_property
    def _by_key(self) -> dict[int | str, ChannelGroup]:
        """Groups by id and by name, built on first lookup (a plan looks up every group)."""
        table: dict[int | str, ChannelGroup] = {}
        for g in reversed(self.groups):  # the first group wins a (never expected) tie
            table[g.name] = table[g.id] = g
        return table

    @functools.cached_property
    def _by_slice(self) -> dict[str, tuple[ChannelGroup, ...]]:
        """Slice key ``"fqn[dim]"`` -> the groups holding part of that dim."""
        table: dict[str, dict[int, ChannelGroup]] = {}
        for g in self.groups:
            for m in g.members:
                table.setdefault(f"{m.fqn}[{m.dim}]", {})[g.id] = g
        return {k: tuple(v.values()) for k, v in table.items()}

    @property
    def num_units(self) -> int:
        return int(len(self.group_of))

    def table(self, *, max_members: int = 4, tablefmt: str = "simple") -> str:
        from fxprune.core.report import analysis_table

        return analysis_table(self, max_members=max_members, tablefmt=tablefmt)

    def pins(self) -> tuple[Pin, ...]:
        """Every parameter dim left (partly) whole, with its reason, node and source line."""
        from fxprune.core.report import find_pins

        return find_pins(self)

    def pins_table(self, *, tablefmt: str = "simple") -> str:
        from fxprune.core.report import pins_table

        return pins_table(self, tablefmt=tablefmt)

    def to_networkx(self):
        from fxprune.core.report import analysis_graph

        return analysis_graph(self)
