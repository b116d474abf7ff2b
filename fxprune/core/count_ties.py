"""Counts one group's width dictates to another: the follower keeps what the leader's
kept count implies.

torchvision's ``shifted_window_attention`` (Swin), timm's CaiT ``ClassAttn``, DaViT,
EVA... read ``C`` off the block input (the residual stream, group A) and reshape the
attention's q/k/v with ``C // num_heads`` (a dim of the attention's inner group B), or
its output with ``reshape(B_, N, C)``. The GraphModule takes any counts (its reshape
sizes are rewritten), but the user's module computes them from ``C``: a plan that the
module can follow keeps ``kept(B's dim) * den == kept(A's dim) * num`` for every such
reshape (``GroupAnalysis.count_ties``).

Plans keep it by making B follow A: A's removals come in multiples of ``step`` (so that
every follower loses whole units, and its kept count stays a multiple of its
``round_to``), B loses ``removed(A) * ratio`` units, its lowest-scored (per head: a unit
of B is one index of every head). The cost model sees B's loss where it sees A's
(``fxprune.plan`` evaluates the followed kept set, and divides a leader unit's
cost-normalised score by what B then saves too). Where a tie cannot be followed (a
size reading several widths, dims holding several groups or parts of one, a follower
tied to two leaders or at two ratios, a leader that follows another, a follower left
whole by ``ignore`` / caps), both groups stay whole, with the reason (``held``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from fxprune.core.groups import CountTie, GroupAnalysis

__all__ = ["CountLink", "count_links", "hold_links", "follow_counts", "follower_cap",
           "broken_count_ties", "count_ties_meta", "leader_multiple"]


@dataclass(frozen=True)
class CountLink:
    """A leader group and the groups that follow its kept count: ``followers`` maps each
    to the units it loses per unit the leader loses (``Fraction``); ``step`` is the
    smallest leader removal every follower can follow with whole units."""

    leader: str
    followers: tuple[tuple[str, Fraction], ...]
    ties: tuple[str, ...]

    @property
    def step(self) -> int:
        return math.lcm(*(r.denominator for _, r in self.followers))

    def summary(self) -> str:
        """One line for a plan's meta: the followers, their ratios, the tied nodes."""
        shown = ", ".join(f"{name} (x{r})" for name, r in self.followers[:3])
        more = f" (+{len(self.followers) - 3})" if len(self.followers) > 3 else ""
        return (f"followed by {shown}{more} at {', '.join(self.ties[:3])}"
                + (f" (+{len(self.ties) - 3})" if len(self.ties) > 3 else "")
                + f": loses units in multiples of {self.step}")


def count_links(analysis: GroupAnalysis) -> tuple[dict[str, CountLink], dict[str, str]]:
    """(leader name -> its link, group name -> why it must stay whole)."""
    held: dict[str, str] = {}
    wanted: dict[str, dict[tuple[str, Fraction], list[str]]] = {}
    for tie in analysis.count_ties:
        why = tie.why or _uneven_units(analysis, tie)
        if why:
            for name in _groups_of(analysis, tie):
                held.setdefault(name, f"{tie.describe()}: {why}")
            continue
        mult_a = _multiplicity(analysis, tie.source_labels)
        mult_b = _multiplicity(analysis, tie.labels)
        ratio = Fraction(tie.num * mult_a, tie.den * mult_b)
        wanted.setdefault(tie.follower, {}).setdefault((tie.leader, ratio), []).append(tie.node)
    leaders = {lead for w in wanted.values() for lead, _ in w}
    for follower, ways in wanted.items():
        if len(ways) > 1:
            shown = "; ".join(f"{lead} x{r} at {nodes[0]}" for (lead, r), nodes in ways.items())
            why = f"{follower} would follow several counts ({shown})"
        elif follower in leaders:
            why = f"{follower} follows {next(iter(ways))[0]} and leads another group (a chain)"
        else:
            continue
        for name in [follower, *(lead for lead, _ in ways)]:
            held.setdefault(name, why)
    links: dict[str, CountLink] = {}
    for follower, ways in wanted.items():
        (lead, ratio), nodes = next(iter(ways.items()))
        link = links.get(lead) or CountLink(lead, (), ())
        links[lead] = CountLink(lead, link.followers + ((follower, ratio),),
                                tuple(dict.fromkeys(link.ties + tuple(nodes))))
    return hold_links(links, held)


def hold_links(links: Mapping[str, CountLink], held: Mapping[str, str]
               ) -> tuple[dict[str, CountLink], dict[str, str]]:
    """Links without the held groups: a held leader holds its followers, a held follower
    its leader (and so that leader's other followers), until nothing changes."""
    held, links = dict(held), dict(links)
    changed = True
    while changed:
        changed = False
        for lead, link in list(links.items()):
            blocked = [f for f, _ in link.followers if f in held]
            if lead not in held and not blocked:
                continue
            why = held.get(lead) or f"its follower {blocked[0]} stays whole ({held[blocked[0]]})"
            held.setdefault(lead, why)
            for f, _ in link.followers:
                held.setdefault(f, f"it follows {lead}, which stays whole ({held[lead]})")
            del links[lead]
            changed = True
    return links, held


def _groups_of(analysis: GroupAnalysis, tie: CountTie) -> list[str]:
    labels = np.concatenate([tie.source_labels, tie.labels])
    ids = np.unique(analysis.group_of[labels[labels >= 0]]).tolist()
    return [analysis.groups[i].name for i in ids]


def _multiplicity(analysis: GroupAnalysis, labels: np.ndarray) -> int:
    inside = labels[labels >= 0]
    return len(inside) // max(len(np.unique(inside)), 1)


def _uneven_units(analysis: GroupAnalysis, tie: CountTie) -> str:
    """Why removing a group's units does not change a tied dim by a fixed count per unit
    (a dim holding only some of the group's units, or some more often than others)."""
    for labels, name in ((tie.source_labels, tie.leader), (tie.labels, tie.follower)):
        inside = labels[labels >= 0]
        counts = np.bincount(analysis.local_of[inside], minlength=analysis.group(name).size)
        if (counts != counts[0]).any() or counts[0] == 0:
            return f"its dims hold only some units of {name}, or some more often than others"
    return ""


def leader_multiple(link: CountLink, sizes: Mapping[str, int], round_to: Mapping[str, int],
                    leader_round_to: int) -> int:
    """The multiple a leader's kept (and removed) count must be of: its own ``round_to``
    and, per follower losing ``p/q`` units per leader unit, ``q * m / gcd(p, m)`` (whole
    units, kept counts multiples of the follower's ``round_to`` ``m`` where its size is);
    0 when the leader's size is no multiple of it (it then stays whole)."""
    parts = [leader_round_to]
    for name, r in link.followers:
        m = round_to.get(name, 1)
        m = m if sizes[name] % m == 0 else 1
        parts.append(r.denominator * m // math.gcd(r.numerator, m))
    multiple = math.lcm(*parts)
    return multiple if sizes[link.leader] % multiple == 0 else 0


def follower_cap(link: CountLink, caps: Mapping[str, int]) -> int:
    """Most units the leader may lose so that no follower loses more than its cap."""
    return min((int(caps.get(f, 0) / r) for f, r in link.followers), default=0)


def follow_counts(analysis: GroupAnalysis, kept: np.ndarray, links: Mapping[str, CountLink],
                  scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """``kept`` (a bool per global unit) with every follower keeping what its leader's
    kept count implies: it loses ``removed(leader) * ratio`` units, its lowest-scored
    (ties broken by index; +inf never, at least one unit stays)."""
    kept = kept.copy()
    for lead, link in links.items():
        g = analysis.group(lead)
        removed = int((~kept[analysis.group_of == g.id]).sum())
        for name, r in link.followers:
            f = analysis.group(name)
            labels = np.flatnonzero(analysis.group_of == f.id)
            s = np.asarray(scores[name], dtype=float)
            n = min(int(removed * r), int((~np.isposinf(s)).sum()), f.size - 1)
            kept[labels] = True
            kept[labels[np.argsort(s, kind="stable")[:max(n, 0)]]] = False
    return kept


def broken_count_ties(analysis: GroupAnalysis, kept: np.ndarray) -> list[str]:
    """Ties whose counts ``kept`` (a bool per global unit) breaks, with both counts."""
    out = []
    for tie in analysis.count_ties:
        a = int((tie.source_labels < 0).sum() + kept[tie.source_labels[tie.source_labels >= 0]].sum())
        b = int((tie.labels < 0).sum() + kept[tie.labels[tie.labels >= 0]].sum())
        if b * tie.den != a * tie.num:
            out.append(f"{tie.describe()}: the plan keeps {b} of {len(tie.labels)} there but "
                       f"{a} of {len(tie.source_labels)} in {tie.read}")
    return out


def count_ties_meta(analysis: GroupAnalysis, links: Mapping[str, CountLink],
                    held: Mapping[str, str], enabled: bool = True) -> dict[str, Any]:
    """What a plan's meta says of the count ties: ``count_ties`` (per leader, its
    followers; ``"off"`` when the caller turned ties off) and ``count_ties_whole``
    (groups left whole -> why); empty without count ties."""
    if not analysis.count_ties:
        return {}
    if not enabled:
        return {"count_ties": "off"}
    return {"count_ties": {n: link.summary() for n, link in links.items()},
            "count_ties_whole": dict(held)}
