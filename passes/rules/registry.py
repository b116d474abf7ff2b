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

import contextlib
import contextvars
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from passes.units import UnitStore

Dims = dict[int, np.ndarray]
Info = Any  # Dims | tuple[Info, ...] | None

AnalysisRule = Callable[["RuleContext"], None]
ANALYSIS_RULES: dict[Any, AnalysisRule] = {}
FIXUPS: dict[Any, Callable[..., Any]] = {}
MODULE_FIXUPS: dict[type, Callable[[torch.nn.Module], None]] = {}

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
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
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


def rule(*keys: Any) -> Callable[[AnalysisRule], AnalysisRule]:
    """Register an analysis rule under op names, module types or callables (families welcome)."""
    flat = _flatten_keys(keys)

    def register(fn: AnalysisRule) -> AnalysisRule:
        for key in flat:
            ANALYSIS_RULES[key] = fn
        return fn

    return register


ATTENTION_SCALES = ("original", "recompute")
_REWRITE_OPTIONS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "fxprune_rewrite_options", default={})


def check_attention_scale(value: str) -> None:
    if value not in ATTENTION_SCALES:
        raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, not {value!r}")


@contextlib.contextmanager
def rewrite_options(**options: Any) -> Iterator[None]:
    """Options the fixups of one ``slice_weights`` call read (``attention_scale``)."""
    token = _REWRITE_OPTIONS.set(options)
    try:
        yield
    finally:
        _REWRITE_OPTIONS.reset(token)


def softmax_scale(old_dim: int, new_dim: int) -> float:
    """The attention softmax scale once q/k keep ``new_dim`` of ``old_dim`` features:
    ``1/sqrt(old_dim)`` by default, so the pruned model computes what the masked one does
    (slice == mask); ``1/sqrt(new_dim)`` with ``attention_scale="recompute"``."""
    recompute = _REWRITE_OPTIONS.get().get("attention_scale", "original") == "recompute"
    return 1.0 / math.sqrt(new_dim if recompute else old_dim)


def fixup(*keys: Any) -> Callable:
    """Register a rewrite fixup that returns new ``(args, kwargs)`` for a sliced node."""
    flat = _flatten_keys(keys)

    def register(fn: Callable) -> Callable:
        for key in flat:
            FIXUPS[key] = fn
        return fn

    return register


def module_fixup(*types: type) -> Callable:
    """Register a function that re-derives module attributes from sliced parameters."""

    def register(fn: Callable[[torch.nn.Module], None]) -> Callable:
        for t in types:
            MODULE_FIXUPS[t] = fn
        return fn

    return register


def _flatten_keys(keys: Iterable[Any]) -> list[Any]:
    flat: list[Any] = []
    for k in keys:
        if isinstance(k, (tuple, list, frozenset, set)):
            flat.extend(k)
        else:
            flat.append(k)
    return flat


def lookup_rule(node: torch.fx.Node, gm: torch.fx.GraphModule) -> AnalysisRule | None:
    if node.op == "call_module":
        return find_module_entry(ANALYSIS_RULES, gm.get_submodule(node.target))
    key = op_key(node)
    try:
        return ANALYSIS_RULES.get(key)
    except TypeError:  # unhashable target
        return None


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


class RuleContext:
    """What a rule sees: its node, its inputs' dims and shapes, and unit operations."""

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
        from passes.shape_prop import tensor_shapes

        if isinstance(value, torch.fx.Node):
            return tensor_shapes(value)
        return None

    @property
    def out_shape(self) -> Any:
        return self.shape(self.node)

    @property
    def module(self) -> torch.nn.Module:
        return self.state.gm.get_submodule(self.node.target)

    def input_nodes(self) -> list[torch.fx.Node]:
        return list(self.node.all_input_nodes)

    # -- outputs ----------------------------------------------------------------------
    def set(self, info: Info) -> None:
        self.state.values[self.node.name] = info

    # -- units ------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        return self.store.fresh(n, self.node.name)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.store.union_arrays(a, b, self.why)

    def pin(self, units: np.ndarray | None, reason: str) -> None:
        if units is not None and len(units):
            self.store.pin(units, f"{self.node.name}: {reason}")

    def pin_info(self, info: Info, reason: str) -> None:
        """Pin every unit reachable in a (possibly nested) value."""
        for units in iter_units(info):
            self.pin(units, reason)

    def inexact(self, units: np.ndarray, reason: str) -> None:
        self.store.mark_inexact(units, f"{self.node.name}: {reason}")

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
            pair = node.normalized_arguments(root, normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 - forward(*args) and friends
            pair = None
        return raw if pair is None else NormalizedCall(
            tuple(pair.kwargs), dict(pair.kwargs), raw.args, raw.kwargs)
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
