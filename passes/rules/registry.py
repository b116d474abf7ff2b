"""The rule table: one generic loop consumes small per-op rules registered here.

A value's *dims* map tensor axes to 1-D arrays of unit ids (``{1: units}`` for an NCHW
activation whose channels are tracked). Axes not in the map are untracked: batch,
spatial, tokens, or channels that nothing may prune. Non-tensor values have dims
``None``; tuple-valued nodes have a tuple of dims.

Analysis rules take a :class:`RuleContext` and set the node's output dims. Rewrite
fixups (``@fixup``) take a :class:`FixupContext` (see ``passes/slice_weights.py``) and
return new node args/kwargs after slicing. Module fixups set module attributes
(``in_channels``, ``num_features``...) from the sliced parameters.
"""
from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from passes.rules.meta import tensor_shapes
from passes.units import UnitStore

Dims = dict[int, np.ndarray]
Info = Any  # Dims | tuple[Info, ...] | None

AnalysisRule = Callable[["RuleContext"], None]
MacRule = Callable[["MacContext"], "Terms"]
# (input, axis) operand pairs summed over together: ((q, -1), (k, -1)) for q.k^T
Contractions = list[tuple[tuple[Any, int], ...]]
ContractionRule = Callable[["MacContext"], Contractions]
Terms = list[tuple[float, list[np.ndarray]]]  # (share, axes): share * prod(kept fraction)


@dataclass
class OpEntry:
    """Everything fxprune knows about one op, stored under its canonical key
    (``op_key(node)`` for functions and methods, the module type for ``call_module``).

    ``rule``: the analysis rule (sets the node's output dims from its inputs').
    ``fixup``: the rewrite fixup, ``fn(fctx)``, for literal sizes after slicing.
    ``module_fixup``: re-derives module attributes (``in_channels``...) after slicing.
    ``macs``: the MAC scaling rule of the cost model, ``fn(MacContext) -> Terms``.
    ``contractions``: the input axes the op sums over, ``fn(MacContext) -> Contractions``
    (each a tuple of ``(input node, axis)`` operands summed together); a unit there is
    consumed by this node even where the same units flow on through another input (a
    fused qkv under the head_dim policy); ``passes/gates.py`` gates one operand of each.
    ``stop``: a stop op (creates a channel space from sliceable weights); every stop op
    must have a ``macs`` rule (``tests/rules/test_op_entries.py``).
    """

    key: Any
    rule: AnalysisRule | None = None
    fixup: Callable[..., Any] | None = None
    module_fixup: Callable[..., Any] | None = None
    macs: MacRule | None = None
    contractions: ContractionRule | None = None
    stop: bool = False


OPS: dict[Any, OpEntry] = {}
_FIELDS = ("rule", "fixup", "module_fixup", "macs", "contractions")


def op_entry(key: Any) -> OpEntry:
    """The entry registered under ``key`` (created empty on first use)."""
    entry = OPS.get(key)
    if entry is None:
        entry = OPS[key] = OpEntry(key)
    return entry


class _FieldView(MutableMapping):
    """``OPS`` seen as ``{key: entry.<field>}`` for entries that set the field (the names
    ``ANALYSIS_RULES``, ``FIXUPS`` and ``MODULE_FIXUPS`` read and write through it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, key: Any) -> Any:
        entry = OPS.get(key)
        value = None if entry is None else getattr(entry, self.name)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        setattr(op_entry(key), self.name, value)

    def __delitem__(self, key: Any) -> None:
        self[key]  # KeyError when unset
        setattr(OPS[key], self.name, None)

    def __iter__(self) -> Iterator[Any]:
        return (k for k, e in list(OPS.items()) if getattr(e, self.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: Any) -> bool:
        try:
            return getattr(OPS.get(key), self.name, None) is not None
        except TypeError:  # unhashable target
            return False


ANALYSIS_RULES: MutableMapping[Any, AnalysisRule] = _FieldView("rule")
FIXUPS: MutableMapping[Any, Callable[..., Any]] = _FieldView("fixup")
MODULE_FIXUPS: MutableMapping[type, Callable[..., Any]] = _FieldView("module_fixup")
MAC_RULES: MutableMapping[Any, MacRule] = _FieldView("macs")
CONTRACTION_RULES: MutableMapping[Any, ContractionRule] = _FieldView("contractions")
_VIEWS = {"rule": ANALYSIS_RULES, "fixup": FIXUPS, "module_fixup": MODULE_FIXUPS,
          "macs": MAC_RULES, "contractions": CONTRACTION_RULES}

# Namespaces whose functions are canonicalised by name ("relu", "add"...).
_TORCH_NAMESPACES = (
    "torch", "torch.functional", "torch.nn.functional", "torch._C._nn",
    "torch._C._VariableFunctions", "torch._C._linalg", "torch._C._special",
    "_operator", "operator", "builtins", "math", "torch._tensor",
)
_ALIASES = {
    "iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div",
    "true_divide": "div", "multiply": "mul", "divide": "div", "subtract": "sub",
    "swapaxes": "transpose", "swapdims": "transpose", "concat": "cat", "concatenate": "cat",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose",
    "conv_transpose3d": "conv_transpose", "_unsafe_view": "view", "absolute": "abs",
    "clip": "clamp", "hardtanh": "hardtanh", "__getitem__": "getitem",
}


def canonical_name(name: str) -> str:
    """``relu_`` -> ``relu``, ``iadd`` -> ``add``, ``aten::conv2d`` -> ``conv``."""
    name = name.split("::")[-1].split(".")[0]
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return _ALIASES.get(name, name)


def op_key(node: torch.fx.Node) -> Any:
    """The key a node's rule is registered under (a name, a module type or a callable)."""
    if node.op == "call_method":
        return canonical_name(node.target)
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return canonical_name(target._schema.name if hasattr(target, "_schema") else target.__name__)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name and (module in _TORCH_NAMESPACES or module.startswith("torch.nn.functional")):
        return canonical_name(name)
    if target in (operator.getitem,):
        return "getitem"
    return target


def find_module_entry(table: Mapping[type, Any], module: torch.nn.Module) -> Any:
    """Entry for ``type(module)``, or for a base class whose ``forward`` it keeps."""
    cls = type(module)
    if cls in table:
        return table[cls]
    for base in cls.__mro__[1:]:
        if base in table and cls.forward is base.forward:
            return table[base]
    return None


def rule(*keys: Any, stop: bool = False) -> Callable[[AnalysisRule], AnalysisRule]:
    """Register an analysis rule under op names, module types or callables (families
    welcome); ``stop=True`` marks stop ops (they must also get a ``@macs`` rule)."""
    return _register("rule", keys, stop=stop)


def macs(*keys: Any) -> Callable[[MacRule], MacRule]:
    """Register the MAC scaling rule of the cost model: ``fn(MacContext) -> Terms``,
    a list of ``(share, axes)``: the node's dense MACs times ``share / sum(shares)``
    shrink by the kept fraction of each axis (a multilinear model)."""
    return _register("macs", keys)


def contractions(*keys: Any) -> Callable[[ContractionRule], ContractionRule]:
    """Register which input axes an op sums over: ``fn(MacContext) -> Contractions``."""
    return _register("contractions", keys)


def _register(field_name: str, keys: Iterable[Any], *, stop: bool = False) -> Callable:
    flat = _flatten_keys(keys)

    def register(fn: Callable) -> Callable:
        for key in flat:
            entry = op_entry(key)
            setattr(entry, field_name, fn)
            entry.stop = entry.stop or stop
        return fn

    return register


ATTENTION_SCALES = ("original", "recompute")


def check_attention_scale(value: str) -> None:
    if value not in ATTENTION_SCALES:
        raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, not {value!r}")


@dataclass(frozen=True)
class RewriteOptions:
    """The options of one rewrite (``slice_weights``, ``slice_module``) that fixups read:
    ``FixupContext.options``, and ``options=`` for a module fixup that declares it.

    ``attention_scale``: ``"original"`` keeps the softmax scale of pruned heads at
    1/sqrt(original head_dim) (slice == mask); ``"recompute"`` uses the kept head_dim.
    Raises ``ValueError`` for any other value.
    """

    attention_scale: str = "original"

    def __post_init__(self) -> None:
        check_attention_scale(self.attention_scale)

    def softmax_scale(self, old_dim: int, new_dim: int) -> float:
        """The attention softmax scale once q/k keep ``new_dim`` of ``old_dim`` features."""
        return 1.0 / math.sqrt(new_dim if self.attention_scale == "recompute" else old_dim)


def apply_module_fixup(root: torch.nn.Module, path: str, note: Any,
                       options: RewriteOptions, *, inherited: bool = False) -> None:
    """Re-derive the attributes of ``root``'s submodule ``path`` with its module fixup,
    called as ``fix(module[, note][, options=options])`` (the note only when analysis left
    one, the options only when the fixup declares ``options``); a fixup that returns a
    new module replaces the old one in its parent. No fixup registered: nothing happens.

    ``inherited=True``: a subclass that overrides ``forward`` (torchvision's and timm's
    ``LayerNorm2d(nn.LayerNorm)``) still holds its base's attributes, which its forward
    reads (``self.normalized_shape``): the nearest base's fixup re-derives them, but a
    replacement module it returns is dropped (it would lose the subclass's forward). For
    the module output only, where ``check_module_output`` proves the result."""
    module = root.get_submodule(path) if path else root
    fix = find_module_entry(MODULE_FIXUPS, module)
    own = fix is not None
    if fix is None and inherited:
        fix = next((MODULE_FIXUPS[b] for b in type(module).__mro__[1:] if b in MODULE_FIXUPS),
                   None)
    if fix is None:
        return
    kwargs = {"options": options} if "options" in inspect.signature(fix).parameters else {}
    replacement = fix(module, **kwargs) if note is None else fix(module, note, **kwargs)
    if own and isinstance(replacement, torch.nn.Module) and replacement is not module:
        parent_path, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent_path) if parent_path else root, name, replacement)


def fixup(*keys: Any) -> Callable:
    """Register a rewrite fixup that returns new ``(args, kwargs)`` for a sliced node."""
    return _register("fixup", keys)


def module_fixup(*types: type) -> Callable:
    """Register a function that re-derives module attributes from sliced parameters."""
    return _register("module_fixup", types)


def _flatten_keys(keys: Iterable[Any]) -> list[Any]:
    flat: list[Any] = []
    for k in keys:
        if isinstance(k, (tuple, list, frozenset, set)):
            flat.extend(k)
        else:
            flat.append(k)
    return flat


def entry_key(node: torch.fx.Node, gm: torch.nn.Module) -> Any:
    """The canonical key of a node's entry: its module's type for ``call_module``,
    ``op_key(node)`` otherwise."""
    return type(gm.get_submodule(node.target)) if node.op == "call_module" else op_key(node)


def lookup(node: torch.fx.Node, gm: torch.nn.Module, field_name: str) -> Any:
    """``field_name`` of the node's op entry (``rule``, ``fixup``, ``module_fixup``,
    ``macs``, ``contractions``), or None. A module type without the field inherits it from a base class
    whose ``forward`` it keeps. No substring matching: one key per op."""
    if node.op == "call_module":
        return find_module_entry(_VIEWS[field_name], gm.get_submodule(node.target))
    try:
        entry = OPS.get(op_key(node))
    except TypeError:  # unhashable target
        return None
    return None if entry is None else getattr(entry, field_name)


def lookup_rule(node: torch.fx.Node, gm: torch.fx.GraphModule) -> AnalysisRule | None:
    return lookup(node, gm, "rule")


# ----------------------------------------------------------------------------------
# What MAC rules see
# ----------------------------------------------------------------------------------
class MacContext:
    """What a MAC (or contraction) rule sees: its node, the shapes, and the unit-label
    arrays of its axes (global unit labels of a ``GroupAnalysis``, -1 where never pruned)."""

    def __init__(self, analysis: Any, node: torch.fx.Node) -> None:
        self.analysis, self.node = analysis, node

    def arg(self, index: int, name: str | None = None) -> Any:
        """Positional arg ``index`` or keyword ``name``."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name) if name else None

    def shape(self, value: Any) -> Any:
        """Shape tuple of a node argument; constants: None."""
        return tensor_shapes(value) if isinstance(value, torch.fx.Node) else None

    def axis(self, value: Any, axis: int) -> np.ndarray | None:
        """Labels of ``axis`` of an input (negative axes count from the end)."""
        labels = self.analysis.node_labels.get(value.name) if isinstance(
            value, torch.fx.Node) else None
        shape = self.shape(value)
        if not isinstance(labels, dict) or not isinstance(shape, tuple):
            return None
        return labels.get(axis % len(shape)) if shape else None

    def out_axes(self) -> list[np.ndarray]:
        """Label arrays of every tracked axis of the (first) output."""
        labels = self.analysis.node_labels.get(self.node.name)
        if isinstance(labels, tuple):
            labels = labels[0] if labels and isinstance(labels[0], dict) else {}
        return list((labels or {}).values())

    def param_axis(self, fqn: str, dim: int) -> np.ndarray | None:
        """Labels of dim ``dim`` of the model tensor ``fqn``."""
        return self.analysis.tensor_labels.get((fqn, dim))

    def attr_axis(self, value: Any, dim: int) -> np.ndarray | None:
        """Labels of a weight argument's dim: its tensor's when read by get_attr."""
        if isinstance(value, torch.fx.Node) and value.op == "get_attr":
            return self.param_axis(value.target, dim)
        return self.axis(value, dim)

    @property
    def module(self) -> torch.nn.Module:
        return self.analysis.gm.get_submodule(self.node.target)


def present(*axes: np.ndarray | None) -> list[np.ndarray]:
    """The axes that are tracked (drops None)."""
    return [a for a in axes if a is not None]


# ----------------------------------------------------------------------------------
# Analysis state shared by the rules
# ----------------------------------------------------------------------------------
@dataclass
class AnalysisState:
    """Everything one ``find_groups`` run accumulates (mutable, private to the pass)."""

    gm: torch.fx.GraphModule
    store: UnitStore = field(default_factory=UnitStore)
    values: dict[str, Info] = field(default_factory=dict)
    tensors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    roles: dict[tuple[str, int], str] = field(default_factory=dict)
    split_policy: str = "inner"
    barriers: list[str] = field(default_factory=list)
    attr_born: list[tuple[str, int]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # FQN -> canonical FQN (ties)

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        named = list(self.gm.named_parameters(remove_duplicate=False)) + list(
            self.gm.named_buffers(remove_duplicate=False))
        for name, t in named:
            self.aliases[name] = seen.setdefault(id(t), name)
    module_notes: dict[str, dict] = field(default_factory=dict)
    # (canonical FQN, dim) -> the nodes whose rules use that tensor dim (for group graphs)
    tensor_users: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    # count ties a compound op's rule declares (its own ``C // num_heads``): (node, what
    # it reads, the read dim's unit ids, the sized dim's unit ids, num, den)
    count_ties: list[tuple] = field(default_factory=list)


class RuleContext:
    """What a rule sees: its node, its inputs' dims and shapes, and unit operations.

    A rule reads its inputs' *dims* (``{axis: unit ids}``) and shapes, and sets the node's
    output dims with ``set``. Unit ids are indices into one ``UnitStore``: ``fresh`` makes
    new ones (a stop op's output channels), ``union`` merges two arrays elementwise into
    one channel space (coupling), ``pin`` marks ids unprunable with a reason (barriers),
    ``inexact`` flags their group ``exact=False`` (channel mixers). Ids are never freed or
    renumbered during a run; ``GroupAnalysis`` relabels their classes at the end.
    """

    def __init__(self, state: AnalysisState, node: torch.fx.Node) -> None:
        self.state = state
        self.node = node
        self.store = state.store
        self.why = node.name
        self._call: NormalizedCall | None = None

    # -- inputs -----------------------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``index`` of the op's schema (or named ``name``), read from the call
        normalised once (``normalized_call``): positional, keyword and aliased spellings
        (``axis=``, ``keepdims=``, ``input=``...) all give the same value."""
        if self._call is None:
            self._call = normalized_call(self.node, self.state.gm)
        return self._call.get(index, name, default)

    def named(self, name: str, default: Any = None) -> Any:
        """Argument ``name`` only if the op's schema has it (forms whose parameters sit in
        different orders, ``F.embedding(input, weight)`` / ``aten.embedding(weight,
        indices)``, are told apart by name)."""
        if self._call is None:
            self._call = normalized_call(self.node, self.state.gm)
        return self._call.values.get(name, default) if self._call.names else \
            self.node.kwargs.get(name, default)

    def dims(self, value: Any) -> Info:
        """Dims of an argument (a Node); constants have none."""
        if isinstance(value, torch.fx.Node):
            return self.state.values.get(value.name)
        return None

    def shape(self, value: Any) -> Any:
        """Shape tuple of an argument (nested tuples for tuple values); constants: None."""
        if isinstance(value, torch.fx.Node):
            return tensor_shapes(value)
        return None

    @property
    def out_shape(self) -> Any:
        """Shape of this node's output (nested tuples for tuple outputs)."""
        return self.shape(self.node)

    @property
    def module(self) -> torch.nn.Module:
        """The called module of a ``call_module`` node."""
        return self.state.gm.get_submodule(self.node.target)

    # -- outputs ----------------------------------------------------------------------
    def set(self, info: Info) -> None:
        """Set this node's output dims (``{axis: ids}``, a tuple of them, or None); axes
        left out are untracked. Call it exactly once."""
        self.state.values[self.node.name] = info

    # -- units ------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        """``n`` new unit ids, one new channel space born at this node."""
        return self.store.fresh(n, self.node.name)

    def count_tie(self, source: np.ndarray | None, units: np.ndarray | None, read: str,
                  num: int = 1, den: int = 1) -> None:
        """Inside this op, a size computed from ``read`` (the width of ``source``) sizes
        the dim holding ``units``: a plan must keep ``kept(units) * den == kept(source) *
        num`` (``GroupAnalysis.count_ties``; torchvision Swin's ``C // num_heads``)."""
        if source is not None and units is not None and len(source) and len(units):
            self.state.count_ties.append((self.node.name, read, np.asarray(source),
                                          np.asarray(units), num, den))

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge ids ``a[i]`` and ``b[i]`` for every ``i`` (equal lengths, or broadcastable
        arrays): afterwards they are one unit, and their spaces one space."""
        self.store.union_arrays(a, b, self.why)

    def pin(self, units: np.ndarray | None, reason: str) -> None:
        """Mark ids unprunable (a barrier), recording ``reason`` with this node's name;
        pinning spreads to every id they are (or later get) merged with."""
        if units is not None and len(units):
            self.store.pin(units, f"{self.node.name}: {reason}")

    def pin_info(self, info: Info, reason: str) -> None:
        """Pin every unit reachable in a (possibly nested) value."""
        for units in iter_units(info):
            self.pin(units, reason)

    def inexact(self, units: np.ndarray, reason: str, kind: str = "statistics") -> None:
        """Flag the group of these ids ``exact=False``: this op mixes them. ``kind`` is
        "statistics" (a norm's mean/variance: pruning is legal, values shift) or "softmax"
        (a distribution over the units: default plans keep such groups whole)."""
        self.store.mark_inexact(units, f"{self.node.name}: {reason}", kind)

    def link(self, source: np.ndarray | None, target: np.ndarray, reason: str) -> None:
        """Couple ``target`` units to ``source``; pin ``target`` when source is untracked."""
        if source is None or len(source) != len(target):
            self.pin(target, reason)
            if source is not None:
                self.pin(source, reason)
        else:
            self.union(source, target)

    # -- parameters and buffers ---------------------------------------------------------
    def tensor_units(self, fqn: str, dim: int, role: str) -> np.ndarray | None:
        """Units of dim ``dim`` of the model tensor ``fqn`` (shared across uses: ties)."""
        fqn = self.state.aliases.get(fqn, fqn)
        key = (fqn, dim)
        units = self.state.tensors.get(key)
        if units is None and fqn not in self.state.aliases:  # not a parameter or buffer
            from passes.rules.parametrized import NOT_DERIVED, derived_units

            derived = derived_units(self, fqn, dim, role)
            if derived is not NOT_DERIVED:
                return derived
        if units is None:
            tensor = _get_tensor(self.state.gm, fqn)
            if tensor is None or tensor.dim() <= dim:
                return None
            units = self.store.fresh(int(tensor.shape[dim]), f"{fqn}[{dim}]")
            self.state.tensors[key] = units
        if role != "dep" or key not in self.state.roles:
            self.state.roles[key] = role
        users = self.state.tensor_users.setdefault(key, [])
        if not users or users[-1] != self.node.name:
            users.append(self.node.name)
        return units

    def module_tensor(self, name: str, dim: int, role: str) -> np.ndarray | None:
        """``tensor_units`` for a tensor attribute of this call_module's module."""
        if _get_tensor(self.module, name) is None:
            return None
        return self.tensor_units(f"{self.node.target}.{name}", dim, role)

    def fqn_of(self, value: Any) -> str | None:
        """FQN of a ``get_attr`` argument, else None."""
        if isinstance(value, torch.fx.Node) and value.op == "get_attr":
            return value.target
        return None


def _get_tensor(gm: torch.nn.Module, fqn: str) -> torch.Tensor | None:
    obj: Any = gm
    for part in fqn.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def iter_units(info: Info) -> Iterable[np.ndarray]:
    if info is None:
        return
    if isinstance(info, dict):
        yield from info.values()
    elif isinstance(info, (tuple, list)):
        for item in info:
            yield from iter_units(item)


# ----------------------------------------------------------------------------------
# Argument normalisation: one place where every spelling of a call is resolved
# ----------------------------------------------------------------------------------
# torch's Python arg parser accepts numpy-style names for these parameters
# (torch/csrc/utils/python_arg_parser.cpp, ``numpy_compatibility_arg_names``).
NUMPY_ALIASES = {"axis": "dim", "keepdims": "keepdim", "x": "input", "a": "input",
                 "x1": "input", "x2": "other"}


@dataclass(frozen=True)
class NormalizedCall:
    """A call's arguments by schema name, in schema order (defaults filled where torch's
    ``normalize_function`` resolved the overload). ``names`` is empty when no signature
    binds (user functions, varargs methods such as ``view(2, 3)``): lookups then read the
    raw ``args``/``kwargs``, positional first."""

    names: tuple[str, ...]
    values: Mapping[str, Any]
    args: tuple
    kwargs: Mapping[str, Any]

    def get(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if self.names:
            if name is not None and name in self.values:
                return self.values[name]
            if index < len(self.names):
                return self.values[self.names[index]]
            return default
        if index < len(self.args):
            return self.args[index]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    def position(self, name: str) -> int | None:
        """Schema position of parameter ``name`` (None when unknown)."""
        return self.names.index(name) if name in self.names else None


def _torch_callable(node: torch.fx.Node) -> Any:
    """The torch function whose signature a call follows (``x.softmax(1)`` follows
    ``torch.softmax(x, 1)``); None for modules, user functions and operator.*."""
    if node.op == "call_method":
        return getattr(torch, node.target, None)
    if node.op != "call_function" or not isinstance(op_key(node), str):
        return None
    if getattr(node.target, "__module__", None) in ("_operator", "operator", "builtins"):
        return None
    return node.target


def _signatures(fn: Any) -> list:
    import inspect

    from torch.fx.operator_schemas import get_signature_for_torch_op

    try:
        sigs = get_signature_for_torch_op(fn)
    except Exception:  # noqa: BLE001 - not an operator torch.jit knows
        sigs = None
    if sigs:
        return list(sigs)
    try:
        return [inspect.signature(fn)]
    except (TypeError, ValueError):
        return []


def _rename_aliases(kwargs: Mapping[str, Any], sigs: list) -> dict[str, Any]:
    """``axis=`` -> ``dim=`` etc., unless the op really has a parameter of that name."""
    params = {p for s in sigs for p in s.parameters}
    return {(NUMPY_ALIASES[k] if k in NUMPY_ALIASES and k not in params
             and NUMPY_ALIASES[k] in params else k): v for k, v in kwargs.items()}


_FORWARD_SIGNATURES: dict[type, inspect.Signature | None] = {}
_BINDABLE = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _bind_module_call(root: torch.nn.Module, node: torch.fx.Node) -> dict[str, Any] | None:
    """What ``node.normalized_arguments(root, normalize_to_only_use_kwargs=True)`` gives
    for a call_module (torch.nn classes only; None otherwise), with each class's forward
    signature read once, not per call (``inspect.signature`` per node was 5% of an
    analysis)."""
    module = root.get_submodule(node.target)
    cls = type(module)
    if "forward" in vars(module):  # an instance-level forward: torch's own path
        pair = node.normalized_arguments(root, normalize_to_only_use_kwargs=True)
        return None if pair is None else dict(pair.kwargs)
    if cls not in _FORWARD_SIGNATURES:
        sig = inspect.signature(inspect.unwrap(module.forward)) \
            if getattr(torch.nn, cls.__name__, None) is cls else None
        if sig is not None and any(p.kind not in _BINDABLE for p in sig.parameters.values()):
            sig = None  # torch.fx normalises only these kinds (no *args / **kwargs)
        _FORWARD_SIGNATURES[cls] = sig
    sig = _FORWARD_SIGNATURES[cls]
    if sig is None:
        return None
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return {name: bound.arguments[name] for name in sig.parameters}


def normalized_call(node: torch.fx.Node, root: torch.nn.Module | None = None) -> NormalizedCall:
    """Bind a call's args/kwargs to its op's schema once, before any rule or fixup reads
    them. Uses ``torch.fx.operator_schemas.normalize_function`` (and
    ``Node.normalized_arguments`` for modules) where they resolve the overload; otherwise
    the first torch signature that binds (overloads of one op share parameter names).
    Methods bind to the torch function of the same name. Unbindable calls keep their raw
    arguments."""
    from torch.fx.operator_schemas import normalize_function

    raw = NormalizedCall((), {}, tuple(node.args), dict(node.kwargs))
    if node.op == "call_module":
        if root is None:
            return raw
        try:
            values = _bind_module_call(root, node)
        except Exception:  # noqa: BLE001 - forward(*args) and friends
            values = None
        return raw if values is None else NormalizedCall(
            tuple(values), values, raw.args, raw.kwargs)
    fn = _torch_callable(node)
    if fn is None:
        return raw
    sigs = _signatures(fn)
    kwargs = _rename_aliases(node.kwargs, sigs)
    try:
        pair = normalize_function(fn, tuple(node.args), kwargs,
                                  normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - ambiguous overloads: bind below
        pair = None
    if pair is not None and not pair.args:
        return NormalizedCall(tuple(pair.kwargs), dict(pair.kwargs), raw.args, raw.kwargs)
    for sig in sigs:
        try:
            bound = sig.bind(*node.args, **kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        values = dict(bound.arguments)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            continue  # *args: positions are not names
        return NormalizedCall(tuple(values), values, raw.args, raw.kwargs)
    return raw
