"""Elementwise ops: unary pass-through and broadcasting coupling ops."""
from __future__ import annotations

import torch.nn as nn

import numpy as np

from passes.rules.dims import broadcast_merge
from passes.rules.registry import RuleContext, module_fixup, rule

UNARY_ELEMENTWISE = (
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "hardtanh",
    "clamp", "clamp_min", "clamp_max", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "square", "erf", "sin", "cos", "reciprocal", "sign", "logsigmoid", "tanhshrink",
    "hardshrink", "softshrink", "threshold", "gelu_tanh", "log1p", "expm1", "floor",
    "ceil", "round", "trunc", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "native_dropout", "contiguous", "clone",
    "detach", "float", "half", "bfloat16", "double", "to", "type", "type_as", "cpu",
    "cuda", "requires_grad", "alias", "lift_fresh_copy", "_to_copy", "zeros_like",
    "ones_like", "empty_like", "rand_like", "randn_like", "full_like", "nan_to_num",
    "bitwise_not", "logical_not", "isnan", "isinf", "isfinite", "stochastic_depth",
    "identity", "fill", "zero", "rrelu",
)
UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
    nn.Softsign, nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity, nn.LogSigmoid, nn.Tanhshrink,
    nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU,
)
BINARY_ELEMENTWISE = (
    "add", "sub", "rsub", "mul", "div", "floor_divide", "floordiv", "remainder", "fmod",
    "maximum", "minimum", "fmax", "fmin", "atan2", "where", "eq", "ne", "lt", "le", "gt",
    "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "addcmul", "addcdiv", "lerp", "hypot", "copysign", "mod", "pow", "xlogy", "masked_fill",
)

try:  # torchvision's fx-wrapped stochastic depth: per-sample scaling, channelwise identity
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
    from torchvision.ops.stochastic_depth import StochasticDepth as _TvStochasticDepth

    UNARY_ELEMENTWISE = UNARY_ELEMENTWISE + (_tv_stochastic_depth,)
    UNARY_MODULES = UNARY_MODULES + (_TvStochasticDepth,)
except ImportError:  # pragma: no cover - torchvision is optional at run time
    pass


@rule(UNARY_ELEMENTWISE, UNARY_MODULES)
def unary(ctx: RuleContext) -> None:
    """out[c] depends only on in[c] (first tensor argument)."""
    ctx.set(ctx.dims(ctx.arg(0, "input")))


@rule(BINARY_ELEMENTWISE)
def binary(ctx: RuleContext) -> None:
    """Broadcasting: inputs that line up on a channel dim must agree on it."""
    out_shape = ctx.out_shape
    if not _is_shape(out_shape):
        ctx.set(None)
        return
    operands = [(ctx.shape(a), ctx.dims(a)) for a in _tensor_args(ctx)]
    ctx.set(broadcast_merge(ctx, operands, out_shape))


@rule(nn.PReLU)
def prelu(ctx: RuleContext) -> None:
    """out[c] = prelu(in[c], w[c]); a single shared slope couples nothing."""
    dims = ctx.dims(ctx.arg(0))
    if ctx.module.num_parameters > 1:
        weight = ctx.module_tensor("weight", 0, "dep")
        ctx.link((dims or {}).get(1), weight, "PReLU slopes on an untracked dim")
    ctx.set(dims)


@module_fixup(nn.PReLU)
def fix_prelu(m: nn.Module) -> None:
    m.num_parameters = m.weight.numel()


def _is_shape(s: object) -> bool:
    return isinstance(s, tuple) and all(isinstance(x, int) for x in s)


def _tensor_args(ctx: RuleContext) -> list:
    values = list(ctx.node.args) + list(ctx.node.kwargs.values())
    return [a for a in values if _is_shape(ctx.shape(a))]


@rule("glu", nn.GLU)
def glu(ctx: RuleContext) -> None:
    """glu(x, dim) = a * sigmoid(b) for the halves (a, b) of ``dim``: out[c] reads in[c] and
    in[c + C/2], so the two halves are coupled (what chunk + mul does)."""
    x = ctx.arg(0, "input")
    rank = len(ctx.shape(x))
    dim = (ctx.module.dim if ctx.node.op == "call_module" else ctx.arg(1, "dim", -1)) % rank
    dims = dict(ctx.dims(x) or {})
    units = dims.pop(dim, None)
    if units is not None:
        half = len(units) // 2
        ctx.union(units[:half], units[half:])
        dims[dim] = np.ascontiguousarray(units[:half])
    ctx.set(dims)
