"""Equal pieces of ``chunk(n)`` / ``split(int)``: which units a plan removes together.

The forward of ShuffleNetV2 (``x.chunk(2, dim=1)``) and CSPNet
(``x.split(self.expand_chs // 2, dim=1)``) cuts equal pieces from whatever width it
gets, so a plan must keep the same count in every piece (``GroupAnalysis.split_ties``
records where). Units are merged into *atoms* that keep every tie balanced: the atoms
inside one piece of a tie are ranked by their mean score and bundled so that each
bundle holds the same number of the tie's indices, and the j-th bundle of every piece
becomes one atom. Removing any set of whole atoms keeps every tie's pieces equal.
Ties are handled innermost first (ShuffleNet nests them: each block's chunk halves
the previous block's first piece). Units a piece cuts unevenly (a shuffled unit
straddling the cut) or of an unusual width join a core atom balanced with other units;
where even that fails, every unit the tie touches forms one atom, and a group left with
one atom (or unequal pinned counts in a tie) stays whole, with the reason (``held``).
Ties whose pieces hold units of several groups (GPT-2's ``split`` of a fused q/k/v) are
not balanced (plans count groups apart; ``untied_ties`` names them): the GraphModule
takes any plan, ``compile(output="module")`` refuses unequal pieces naming the line.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxprune.core.groups import GroupAnalysis, SplitTie

__all__ = ["TiedOrder", "tied_orders", "broken_ties", "untied_ties", "tie_atoms", "ties_meta",
           "chunk_sizes", "tie_holds"]


@dataclass(frozen=True)
class TiedOrder:
    """A tied group's removal order: ``order`` lists its local units lowest-scored atom
    first (each atom's units contiguous); ``cuts`` are the removal counts that remove
    whole atoms (0 first); ``atom`` is each local unit's atom id."""

    group: str
    order: np.ndarray = field(repr=False)
    cuts: np.ndarray = field(repr=False)
    atom: np.ndarray = field(repr=False)
    ties: tuple[str, ...] = ()  # the chunk / split nodes
    notes: tuple[str, ...] = ()  # ties whose units could only be merged whole

    def unit_scores(self, scores: np.ndarray) -> np.ndarray:
        """Each unit's score replaced by its atom's mean (+inf where a unit may never go,
        -inf where one went at an earlier step): an atom's units rank together."""
        return _atom_scores(self.atom, np.asarray(scores, dtype=float))[self.atom]

    def summary(self) -> str:
        """One line for a plan's meta: the ties, and the removal steps they allow."""
        steps = sorted({int(b - a) for a, b in zip(self.cuts[:-1], self.cuts[1:])})
        return (f"equal pieces at {', '.join(self.ties[:4])}"
                + (f" (+{len(self.ties) - 4})" if len(self.ties) > 4 else "")
                + f": units go in whole atoms of {steps}"
                + (f"; {'; '.join(self.notes[:2])}" if self.notes else ""))

    def removals(self, wanted: int, *, round_to: int = 1, size: int | None = None) -> int:
        """The largest whole-atom removal count <= ``wanted`` whose kept count is a
        multiple of ``round_to`` (0 when none is)."""
        size = int(self.cuts[-1]) if size is None else size
        ok = self.cuts[(self.cuts <= wanted) & ((size - self.cuts) % round_to == 0)]
        return int(ok.max()) if len(ok) else 0


def tied_orders(analysis: GroupAnalysis, scores: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, TiedOrder], dict[str, str]]:
    """(removal order of every tied group in ``scores``, groups to leave whole -> why)."""
    by_group: dict[str, list[SplitTie]] = {}
    held: dict[str, str] = {}
    for tie in analysis.split_ties:
        if len(tie.groups) == 1:  # pieces across groups (GPT-2's q/k/v split): untied,
            by_group.setdefault(tie.groups[0], []).append(tie)  # see untied_ties
    out = {}
    for name, ties in by_group.items():
        if name in held or name not in scores:
            continue
        g = analysis.group(name)
        atom, why, notes = tie_atoms(analysis, g.size, ties,
                                     np.asarray(scores[name], dtype=float))
        if why:
            held[name] = why
            continue
        if len(np.unique(atom)) == 1:
            held[name] = (f"equal pieces at {', '.join(t.node for t in ties[:4])} tie every unit "
                          f"to every other ({notes[0] if notes else 'one atom'})")
            continue
        score = _atom_scores(atom, np.asarray(scores[name], dtype=float))
        ids = np.unique(atom)
        ranked = ids[np.lexsort((ids, score[ids]))]
        order = np.concatenate([np.flatnonzero(atom == a) for a in ranked])
        cuts = np.concatenate([[0], np.cumsum([int((atom == a).sum()) for a in ranked])])
        cuts = _holding_cuts(analysis, ties, order, cuts.astype(np.int64))
        out[name] = TiedOrder(name, order, cuts, atom,
                              tuple(t.node for t in ties), notes)
    return out, held


def _atom_scores(atom: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mean unit score per atom id (+inf where a unit may never go, or the mean is nan)."""
    n = int(atom.max()) + 1 if len(atom) else 0
    total = np.zeros(n)
    with np.errstate(invalid="ignore"):
        np.add.at(total, atom, scores)
        mean = total / np.maximum(np.bincount(atom, minlength=n), 1)
    never = np.zeros(n, dtype=bool)
    never[atom[np.isposinf(scores)]] = True
    return np.where(never | np.isnan(mean), np.inf, mean)


def tie_atoms(analysis: GroupAnalysis, size: int, ties: list[SplitTie], scores: np.ndarray
              ) -> tuple[np.ndarray, str, tuple[str, ...]]:
    """Atom id per local unit of one group balancing every tie, "" (or why the group must
    stay whole) and notes on ties whose units were merged into one atom."""
    atom, notes = np.arange(size), []
    span = [len(np.unique(np.concatenate(t.pieces))) for t in ties]
    for i in sorted(range(len(ties)), key=lambda i: (span[i], i)):  # innermost first
        tie = ties[i]
        pieces = [analysis.local_of[lab[lab >= 0]] for lab in tie.pieces]
        pieces, why, note = _set_excess_apart(atom, tie, pieces, _atom_scores(atom, scores))
        if why:
            return atom, why, ()
        if note:
            notes.append(note)
        why = _merge(atom, pieces, _atom_scores(atom, scores))
        if why:
            notes.append(f"{tie.node}: {why}, so its units go (or stay) together")
    return atom, "", tuple(notes)


def _set_excess_apart(atom: np.ndarray, tie: SplitTie, pieces: list[np.ndarray],
                      score: np.ndarray) -> tuple[list[np.ndarray], str, str]:
    """A tie whose last piece is shorter (``chunk(3)`` of 88: 30 / 30 / 28) stays valid
    while every piece loses as many indices, and once the longer pieces' excess goes
    (then all equal): the lowest-scored atoms holding exactly that excess merge into
    one atom (in place), set apart from the balancing. (the pieces left to balance, why
    the group must stay whole or "", a note for the plan's meta)."""
    pinned = [int((lab < 0).sum()) for lab in tie.pieces]
    if not tie.shortfall:
        why = "" if len(set(pinned)) == 1 else \
            f"the pieces of {tie.describe()} hold unequal never-pruned counts"
        return pieces, why, ""
    excess = np.array([len(p) - len(pieces[-1]) for p in pieces[:-1]] + [0])
    long = len(tie.pieces[0])
    if len(set(pinned[:-1])) > 1 or excess[0] < 0 or \
            not tie_holds(tie, [long - excess[0]] * (len(pieces) - 1) + [long - tie.shortfall]):
        return pieces, f"the pieces of {tie.describe()} hold never-pruned counts that " \
                       f"no kept width cuts alike", ()
    if not excess.any():  # the shorter piece holds fewer never-pruned indices only
        return pieces, "", f"{tie.node}: the last piece keeps {tie.shortfall} fewer"
    weights, held, chosen = _weights(atom, pieces), np.zeros_like(excess), []
    for a in sorted((a for a, w in weights.items() if w[-1] == 0), key=lambda a: (score[a], a)):
        if (held == excess).all():
            break
        if (held + weights[a] <= excess).all():
            chosen.append(a)
            held = held + weights[a]
    if not (held == excess).all():
        return pieces, f"no units of {tie.describe()} make up the {tie.shortfall} indices " \
                       f"its longer pieces hold more", ""
    atom[np.isin(atom, chosen)] = min(chosen)
    note = f"{tie.node}: the last piece keeps {tie.shortfall} fewer, or as many once the " \
           f"{int(excess[0])} indices more of each other piece go (one atom)"
    return [p[atom[p] != min(chosen)] for p in pieces], "", note


def _holding_cuts(analysis: GroupAnalysis, ties: list[SplitTie], order: np.ndarray,
                  cuts: np.ndarray) -> np.ndarray:
    """``cuts`` without those that leave a tie's pieces other than chunk / split cuts them
    (a shorter last piece emptied while the others are not): only where a piece is shorter."""
    if not any(t.shortfall for t in ties):
        return cuts
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    ok = np.ones(len(cuts), dtype=bool)
    for tie in (t for t in ties if t.shortfall):
        ranks = [rank[analysis.local_of[lab[lab >= 0]]] for lab in tie.pieces]
        pinned = [int((lab < 0).sum()) for lab in tie.pieces]
        for j, cut in enumerate(cuts[1:-1].tolist(), start=1):
            ok[j] &= tie_holds(tie, [p + int((r >= cut).sum()) for p, r in zip(pinned, ranks)])
    return cuts[ok]


def chunk_sizes(total: int, *, chunks: int = 0, step: int = 0) -> list[int]:
    """The pieces ``chunk(chunks)`` (or, ``chunks=0``, ``split(step)``) cuts from
    ``total`` indices: ``ceil(total / chunks)`` (``step``) each, the last the rest."""
    step = -(-total // chunks) if chunks else step
    if total <= 0 or step <= 0:
        return []
    return [min(step, total - k * step) for k in range(-(-total // step))]


def tie_holds(tie: SplitTie, counts: list[int]) -> bool:
    """Whether kept ``counts`` per piece are what the tie's chunk / split(int) cuts from
    their total (a ``split(int)``'s int follows the first piece); an empty one holds."""
    total = sum(counts)
    return total == 0 or chunk_sizes(total, chunks=tie.chunks, step=counts[0]) == list(counts)


def _merge(atom: np.ndarray, pieces: list[np.ndarray], score: np.ndarray) -> str:
    """Merge ``atom`` (in place) so that one tie stays balanced: the finer of two ways
    (a balanced core, then bundles per piece; or greedy filling from the lowest-scored
    atom), else all atoms the tie touches into one (they go, or stay, together); "" or
    why neither way found atoms."""
    best, why = None, ""
    for way in (_core_then_bundles, _fill):
        trial = atom.copy()
        why = way(trial, pieces, score) or ""
        if not why and (best is None or len(np.unique(trial)) > len(np.unique(best))):
            best = trial
    if best is not None:
        atom[:] = best
        return ""
    touched = np.unique(atom[np.concatenate(pieces)])
    atom[np.isin(atom, touched)] = int(touched.min())
    return why


def _core_then_bundles(atom: np.ndarray, pieces: list[np.ndarray], score: np.ndarray) -> str:
    return _balance_straddlers(atom, pieces, score) or \
        _bundle(atom, pieces, _rescore(atom, score))


def _fill(atom: np.ndarray, pieces: list[np.ndarray], score: np.ndarray) -> str:
    """From the lowest-scored unbalanced atom, add the lowest-scored atoms that fill the
    piece it holds least of (an exact fill first, never past the fullest piece where one
    fits) until balanced; repeat (GPT-2's q/k/v split under split_policy="inner": a q-k
    unit pairs with a v unit)."""
    weights = _weights(atom, pieces)
    todo = sorted((a for a, w in weights.items() if not (w == w[0]).all()),
                  key=lambda a: (score[a], a))
    while todo:
        core = [todo.pop(0)]
        held = weights[core[0]].copy()
        while not (held == held[0]).all():
            top = held.max()
            k = int(np.argmax(top - held))
            need = top - held[k]
            room = [a for a in todo if weights[a][k] > 0 and (held + weights[a] <= top).all()]
            exact = [a for a in room if weights[a][k] == need]
            grow = [a for a in todo if weights[a][k] > 0]
            pick = (exact or room or grow or [None])[0]
            if pick is None:
                return "a piece's units cannot be balanced by the others"
            todo.remove(pick)
            core.append(pick)
            held = held + weights[pick]
        atom[np.isin(atom, core)] = min(core)
    return ""


def _weights(atom: np.ndarray, pieces: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Atom id -> how many indices of each piece it holds."""
    weights: dict[int, np.ndarray] = {}
    for k, local in enumerate(pieces):
        ids, counts = np.unique(atom[local], return_counts=True)
        for a, c in zip(ids.tolist(), counts.tolist()):
            weights.setdefault(a, np.zeros(len(pieces), dtype=np.int64))[k] = c
    return weights


def _balance_straddlers(atom: np.ndarray, pieces: list[np.ndarray], score: np.ndarray) -> str:
    """Atoms holding indices of several pieces unevenly (a shuffled unit cut by the chunk),
    and atoms of a width unusual in their piece, join one core atom with the lowest-scored
    atoms of the pieces it holds least of, until the core holds as many indices of every
    piece (in place); "" or why not."""
    weights = _weights(atom, pieces)
    core = [a for a, w in weights.items() if (w > 0).sum() > 1 and not (w == w[0]).all()]
    for k in range(len(pieces)):  # and atoms narrower or wider than most of their piece's
        own = [a for a, w in weights.items() if (w > 0).sum() == 1 and w[k] > 0]
        widths, counts = np.unique([weights[a][k] for a in own], return_counts=True)
        if len(widths) > 1:
            usual = widths[np.argmax(counts)]
            core += [a for a in own if weights[a][k] != usual]
    if not core:
        return ""
    held = sum(weights[a] for a in core)
    free = [sorted((a for a, w in weights.items() if a not in core and (w > 0).sum() == 1
                    and w[k] > 0), key=lambda a: (score[a], a)) for k in range(len(pieces))]
    while not (held == held[0]).all():
        k = int(np.argmax(held.max() - held))
        need = int(held.max() - held[k])
        if not free[k]:
            return "a unit spans several pieces unevenly"
        exact = [a for a in free[k] if weights[a][k] == need]
        pick = exact[0] if exact else min(free[k], key=lambda a: (weights[a][k], score[a], a))
        free[k].remove(pick)
        core.append(pick)
        held = held + weights[pick]
    atom[np.isin(atom, core)] = min(core)
    return ""


def _rescore(atom: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Atom scores after a merge: the merged atom (its smallest id) takes its members' mean."""
    out = score.copy()
    for a in np.unique(atom).tolist():
        members = np.flatnonzero(atom == a)
        if len(members) > 1 or members[0] != a:
            with np.errstate(invalid="ignore"):
                out[a] = np.inf if np.isposinf(score[members]).any() else score[members].mean()
    return out


def _bundle(atom: np.ndarray, pieces: list[np.ndarray], score: np.ndarray) -> str:
    """Bundle the atoms of every piece into balanced atoms (in place); "" or why not."""
    weights = _weights(atom, pieces)
    own: list[list[int]] = [[] for _ in pieces]
    for a, w in weights.items():
        if (w == w[0]).all():
            continue  # removes as many indices from every piece
        if (w > 0).sum() != 1:
            return "a unit spans several pieces unevenly"
        own[int(np.argmax(w > 0))].append(a)
    width = [{int(weights[a].max()) for a in atoms} for atoms in own]
    if not any(own):
        return ""
    if any(len(w) != 1 for w in width):
        return "a piece holds units of different widths"
    width = [w.pop() for w in width]
    lcm = math.lcm(*width)
    per = [lcm // w for w in width]
    if any(len(atoms) % b for atoms, b in zip(own, per)):
        return "the pieces cannot be cut into equal bundles"
    bundles = {len(atoms) // b for atoms, b in zip(own, per)}
    if len(bundles) != 1:
        return "the pieces hold different counts"
    m = bundles.pop()
    ranked = [sorted(atoms, key=lambda a: (score[a], a)) for atoms in own]
    for j in range(m):
        members = [a for atoms, b in zip(ranked, per) for a in atoms[j * b:(j + 1) * b]]
        atom[np.isin(atom, members)] = min(members)
    return ""


def untied_ties(analysis: GroupAnalysis) -> dict[str, str]:
    """Ties a plan does not balance (their pieces hold units of several groups, which
    plans count apart): node -> why. ``compile(output="module")`` refuses a plan that
    keeps such pieces unequal (``LiteralSizeError``); the GraphModule takes it."""
    return {t.node: f"{t.describe()}: its pieces hold units of {len(t.groups)} groups "
                    f"({', '.join(t.groups[:3])}), not tied"
            for t in analysis.split_ties if len(t.groups) > 1}


def broken_ties(analysis: GroupAnalysis, kept: np.ndarray) -> list[str]:
    """Ties whose pieces ``kept`` (a bool per global unit) leaves other than the forward's
    chunk / split(int) cuts them from their total, with counts."""
    out = []
    for tie in analysis.split_ties:
        if len(tie.groups) > 1:
            continue  # untied_ties
        counts = [int((lab < 0).sum() + kept[lab[lab >= 0]].sum()) for lab in tie.pieces]
        if not tie_holds(tie, counts):
            out.append(f"{tie.describe()}: kept {counts}")
    return out


def ties_meta(analysis: GroupAnalysis, tied: Mapping[str, "TiedOrder"],
              held: Mapping[str, str], enabled: bool = True) -> dict[str, Any]:
    """What a plan's meta says of the ties: ``split_ties`` (per tied group, its atoms;
    ``"off"`` when the caller turned the ties off), ``split_ties_whole`` (groups left
    whole -> why) and ``split_ties_untied`` (ties spanning groups); empty without ties."""
    if not analysis.split_ties:
        return {}
    if not enabled:
        return {"split_ties": "off"}
    meta: dict[str, Any] = {"split_ties": {n: t.summary() for n, t in tied.items()},
                            "split_ties_whole": dict(held)}
    untied = untied_ties(analysis)
    if untied:
        meta["split_ties_untied"] = untied
    return meta
