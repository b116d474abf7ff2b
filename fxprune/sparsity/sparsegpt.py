"""SparseGPT: mask selection and weight reconstruction by OBS, layer by layer.

    sparse, plan = fxprune.sparsify(model, x, 0.5, criterion="sparsegpt", data=calib)
    fxprune.verify_sparsity(model, sparse, plan, x)   # masks, pattern, untouched weights

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". For a layer ``y = W x`` with calibration inputs ``X`` the layer-wise loss
``||W X - W' X||^2`` has the Hessian ``H = 2 X X^T`` (one ``[cols, cols]`` matrix shared by
every row of ``W``). Columns are processed left to right; when column ``j`` is reached,
the free weights of a row are the columns ``F = {j, ..., cols-1}``. Removing ``w_j`` and
re-fitting the free ones (Optimal Brain Surgeon) costs ``w_j^2 / [H_F^-1]_jj`` and moves
the free weights by ``-w_j / [H_F^-1]_jj * [H_F^-1]_{:, j}``. The rows of the upper
Cholesky factor ``U`` of ``H^-1`` hold these quantities for every ``j`` at once
(``U_jj^2 = [H_F^-1]_jj``, ``U_{j, F} / U_jj = [H_F^-1]_{j, F} / [H_F^-1]_jj``), which is
what makes it one pass.

Masks are chosen adaptively: at the start of each block of ``blocksize`` columns the
saliency ``w^2 / U_jj^2`` of the (already updated) weights picks the block's zeros,
exactly ``round`` of the layer's budget spread over the blocks, so the layer's realised
fraction is the requested one to within one element. For ``N:M`` each run of ``M``
consecutive weights of the reduction dim keeps its ``N`` most salient (ties: the earlier
weight, as :func:`fxprune.sparsity.masks.nm_mask`). ``H`` is dampened by ``damp`` times
its mean diagonal. Layers are calibrated *sequentially*: the inputs of a layer come from
the model with every earlier layer already sparsified and reconstructed.

Unlike a score criterion, SparseGPT changes the weights it keeps, so the proof is not
``sparse == dense * mask``. ``verify_sparsity`` checks for such a plan that every masked
weight is exactly 0, the N:M pattern, and that every parameter outside the plan is
bit-identical to the dense model's; the plan's ``meta["reconstruction"]`` records each
layer's calibration error ``||W X - W' X||_F / ||W X||_F`` with SparseGPT's update and with
the same mask and no update.

Supported layers: ``nn.Linear`` / ``F.linear`` / ``aten.linear`` and ungrouped 1-D/2-D
convolutions with zero padding (im2col columns); anything else raises
:class:`~fxprune.errors.SparsityError` naming the layer (exclude it with ``ignore=`` or use
``criterion="wanda"``).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.errors import ImportanceError, SparsityError
from fxprune.sparsity.masks import check_fraction, parse_pattern, runs_view
from fxprune.sparsity.plan import PackedMask, SparsityPlan

__all__ = ["obs_prune", "sparsegpt", "layer_error"]


# ----------------------------------------------------------------------------------
# The per-layer solver
# ----------------------------------------------------------------------------------
def _block_budgets(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Zeros per column block: the layer's ``round(sparsity * rows * cols)`` spread so the
    running total stays the rounded running share (sums to the layer budget exactly)."""
    out, done = [], 0
    for i2 in range(blocksize, cols + blocksize, blocksize):
        upto = round(sparsity * rows * min(i2, cols))
        out.append(upto - done)
        done = upto
    return out


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, *,
              nm: tuple[int, int] | None = None, blocksize: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one matrix: ``(new_weight, keep)``, both ``[rows, cols]``.

    ``weight``: ``[rows, cols]`` (``cols`` the reduction dim); ``hessian``: ``[cols, cols]``,
    ``X X^T`` up to scale (any positive scale gives the same result). Computed in float64;
    ``new_weight`` is float64 with exact zeros where ``keep`` is False. ``nm``: ``(N, M)``
    keeps ``N`` of every ``M`` consecutive columns per row (``sparsity`` is then ignored).
    At ``sparsity == 0`` (and no ``nm``) the weight comes back unchanged.
    """
    w = weight.detach().to(torch.float64).clone()
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise SparsityError(f"hessian of shape {tuple(hessian.shape)} for a weight with "
                            f"{cols} columns")
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0                      # an input that was always 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                  upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise SparsityError(f"the calibration Hessian ({cols}x{cols}) is not positive "
                            f"definite even with damp={damp}: raise damp or give more "
                            "calibration data") from None
    keep = torch.ones(rows, cols, dtype=torch.bool)
    budgets = _block_budgets(rows, cols, blocksize, sparsity) if nm is None else None
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        k1 = torch.ones_like(w1, dtype=torch.bool)
        err = torch.zeros_like(w1)
        d = u1.diagonal()
        if nm is None and budgets[b]:
            sal = (w1 ** 2 / d ** 2).reshape(-1)
            k1.view(-1)[torch.argsort(sal, stable=True)[:budgets[b]]] = False
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                sal = w1[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]] ** 2
                order = torch.argsort(-sal, dim=1, stable=True)
                run = torch.zeros_like(sal, dtype=torch.bool)
                run.scatter_(1, order[:, :nm[0]], True)
                k1[:, j:j + nm[1]] = run
            col = w1[:, j]
            e = torch.where(k1[:, j], torch.zeros_like(col), col / d[j])
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w1[~k1] = 0.0
        w[:, i1:i2] = w1
        keep[:, i1:i2] = k1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, keep


def layer_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||_F / ||W X||_F`` from ``H = X X^T`` (``sqrt(tr(D H D^T))``)."""
    w, d = weight.double(), weight.double() - new_weight.double()
    h = hessian.double()
    den = float(torch.einsum("ij,jk,ik->", w, h, w))
    return (max(float(torch.einsum("ij,jk,ik->", d, h, d)), 0.0) / den) ** 0.5 if den > 0 else 0.0


# ----------------------------------------------------------------------------------
# Layers of a graph: geometry, Hessians from calibration inputs
# ----------------------------------------------------------------------------------
class _Layer:
    """One weight to reconstruct: how its input becomes the columns of ``W``."""

    def __init__(self, fqn: str, node: torch.fx.Node, input_node: str, conv: dict | None,
                 shape: tuple[int, ...]) -> None:
        self.fqn, self.node, self.input_node, self.conv, self.shape = \
            fqn, node, input_node, conv, shape

    @property
    def key(self) -> tuple:
        """Layers with one key share one Hessian (same input, same im2col)."""
        c = self.conv
        return (self.input_node,) if c is None else \
            (self.input_node, c["kernel"], c["stride"], c["padding"], c["dilation"])

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as ``[samples, cols]`` in the column order of ``W.reshape(out, -1)``."""
        x = x.detach().to(torch.float64)
        if self.conv is None:
            return x.reshape(-1, x.shape[-1])
        c = self.conv
        if len(c["kernel"]) == 1:  # conv1d as a conv2d of height 1
            x = x.unsqueeze(-2)
            geo = [(1,) + c[k] if k != "padding" else (0,) + c[k]
                   for k in ("kernel", "dilation", "padding", "stride")]
        else:
            geo = [c[k] for k in ("kernel", "dilation", "padding", "stride")]
        cols = F.unfold(x, *geo)                    # [B, C * prod(kernel), L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _conv_geometry(gm: torch.fx.GraphModule, node: torch.fx.Node, fqn: str,
                   weight: torch.Tensor) -> dict:
    dims = weight.dim() - 2
    remedy = (f"exclude it (ignore=[{fqn!r}]) or use criterion='wanda' for this model")
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "padding_mode", "zeros") != "zeros" or isinstance(m.padding, str):
            raise SparsityError(f"SparseGPT: conv {fqn!r} (node {node.name}) pads with "
                                f"{m.padding!r}/{m.padding_mode!r}, not explicit zeros; {remedy}")
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
    else:
        a = list(node.args) + [None] * 9
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__",
                       getattr(node.target, "__name__", ""))
        if name == "convolution":
            stride, padding, dilation, groups = a[3], a[4], a[5], a[8]
        else:
            stride, padding, dilation, groups = (a[3] or node.kwargs.get("stride", 1),
                                                 a[4] if a[4] is not None
                                                 else node.kwargs.get("padding", 0),
                                                 a[5] or node.kwargs.get("dilation", 1),
                                                 a[6] or node.kwargs.get("groups", 1))
        if isinstance(padding, str):
            raise SparsityError(f"SparseGPT: conv {fqn!r} (node {node.name}) uses padding="
                                f"{padding!r}; {remedy}")
    if groups != 1 or dims not in (1, 2):
        raise SparsityError(f"SparseGPT: conv {fqn!r} (node {node.name}) is a "
                            f"{dims}-D conv with groups={groups}; only ungrouped 1-D/2-D "
                            f"convolutions are reconstructed: {remedy}")
    return {"kernel": tuple(weight.shape[2:]), "stride": _tuple(stride, dims),
            "padding": _tuple(padding, dims), "dilation": _tuple(dilation, dims)}


class _Stop(Exception):
    pass


class _HessianRecorder(torch.fx.Interpreter):
    """Runs ``gm`` until ``node`` and adds ``X X^T`` of its value to ``sums`` per key."""

    def __init__(self, gm: torch.fx.GraphModule, node: str, layers: list[_Layer],
                 sums: dict[tuple, list]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.stop_at, self.layers, self.sums = node, layers, sums

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name == self.stop_at:
            for key, layer in {layer.key: layer for layer in self.layers}.items():
                cols = layer.columns(value)
                entry = self.sums.setdefault(key, [0, 0])
                entry[0] = entry[0] + cols.T @ cols
                entry[1] += cols.shape[0]
            raise _Stop
        return value


def _layers(gm: torch.fx.GraphModule, chosen: dict[str, Any]) -> list[_Layer]:
    params = dict(gm.named_parameters(remove_duplicate=False))
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for fqn, site in chosen.items():
        if site.kind not in ("linear", "conv", "head") or site.input_node is None:
            raise SparsityError(f"SparseGPT reconstructs linear and conv weights; {fqn!r} is "
                                f"a {site.kind} weight: drop it from kinds/include or "
                                "ignore=[...] it")
        node, w = nodes[site.node], params[fqn]
        conv = _conv_geometry(gm, node, fqn, w) if site.is_conv else None
        out.append(_Layer(fqn, node, site.input_node, conv, tuple(w.shape)))
    return out


def _nm_permutation(layer: _Layer) -> torch.Tensor | None:
    """For a conv, the column order putting each kernel position's channels side by side
    (the N:M runs of :mod:`fxprune.sparsity.masks` are input channels at one position)."""
    if layer.conv is None:
        return None
    cin, k = layer.shape[1], 1
    for s in layer.shape[2:]:
        k *= s
    return torch.arange(cin * k).reshape(cin, k).T.reshape(-1)  # new j -> old c*k + p


# ----------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------
def sparsegpt(model: nn.Module, example_inputs: Any, sparsity: float | None = None, *,
              pattern: str = "unstructured", scope: str = "layer", data: Any = None,
              batches: int = 8, blocksize: int = 128, damp: float = 0.01,
              kinds: Sequence[str] = ("linear", "conv"), include: Iterable[str] = (),
              ignore: Iterable[str] = (), analysis: Any = None, **unused: Any) -> Any:
    """SparseGPT on a copy of ``model``: ``Sparsified(model, plan)``, via
    ``fxprune.sparsify(..., criterion="sparsegpt")``.

    ``data``: calibration batches ``(inputs, target)`` (the target is ignored), the first
    ``batches`` of them. ``sparsity`` in [0, 1) per layer (``scope="layer"`` only: the
    Hessian is per layer); ``pattern``: ``"unstructured"`` or ``"N:M"``. ``blocksize``:
    columns per adaptive mask block (128 in the paper); ``damp``: fraction of the mean
    Hessian diagonal added to it (0.01 in the paper). Errors: ``ImportanceError`` (no
    data), ``SparsityError`` (scope, an unsupported layer: names it), ``PatternError``.
    ``model`` is not modified.
    """
    from fxprune.sparsity.api import Sparsified, _check_shared, select_weights
    from fxprune.sparsity.criteria import _calibration_inputs

    for key in unused:
        if key not in ("loss_fn", "closure", "probes", "eps", "seed", "previous"):
            raise TypeError(f"sparsegpt() got an unexpected keyword argument {key!r}")
    if unused.get("closure") is not None or unused.get("previous") is not None:
        raise SparsityError("criterion 'sparsegpt' takes data=<(inputs, None) batches> (no "
                            "closure) and makes one-shot plans (no previous=): for gradual "
                            "pruning use a score criterion such as 'wanda'")
    nm = parse_pattern(pattern)
    sparsity = (1.0 - nm[0] / nm[1]) if nm else (0.5 if sparsity is None else sparsity)
    check_fraction(sparsity)
    if scope != "layer" and nm is None:
        raise SparsityError(f"criterion 'sparsegpt' prunes each layer against its own "
                            f"Hessian: scope must be 'layer', not {scope!r}")
    if data is None:
        raise ImportanceError("criterion 'sparsegpt' is data-driven: pass data=<(inputs, "
                              "None) batches> of calibration inputs")
    if analysis is None:
        from fxprune.api import analyze

        analysis = analyze(model, example_inputs)
    chosen = select_weights(analysis.gm, kinds=kinds, include=include, ignore=ignore)
    if not chosen:
        raise SparsityError("no weight selected for SparseGPT: the model has no "
                            "nn.Linear/nn.Conv weight of those kinds")
    _check_shared(model, chosen)
    inputs = _calibration_inputs(data, batches)
    work = copy.deepcopy(analysis.gm).eval()
    params = dict(work.named_parameters(remove_duplicate=False))
    for fqn in chosen:
        if not params[fqn].is_floating_point():
            raise SparsityError(f"weight {fqn!r} has dtype {params[fqn].dtype}, not a float")
    layers = _layers(work, chosen)
    if nm is not None:
        for layer in layers:  # the pattern must fit before any work
            runs_view(params[layer.fqn].detach(), nm[1], layer.conv is not None, layer.fqn)
    order = {n.name: i for i, n in enumerate(work.graph.nodes)}
    by_input: dict[str, list[_Layer]] = {}
    for layer in sorted(layers, key=lambda l: order[l.input_node]):
        by_input.setdefault(layer.input_node, []).append(layer)
    device = next(iter(work.parameters()), torch.empty(0)).device
    masks, report = {}, {}
    for input_node, group in by_input.items():
        sums: dict[tuple, list] = {}
        with torch.no_grad():
            for batch in inputs:
                try:
                    _HessianRecorder(work, input_node, group, sums).run(
                        *(x.to(device) if isinstance(x, torch.Tensor) else x for x in batch))
                except _Stop:
                    pass
        for layer in group:
            if layer.key not in sums:
                raise SparsityError(f"SparseGPT: the input of {layer.fqn!r} (node "
                                    f"{input_node}) was never computed on the calibration "
                                    "data; ignore=[...] it")
            h = sums[layer.key][0] / max(sums[layer.key][1], 1)
            p = params[layer.fqn]
            w2 = p.detach().reshape(p.shape[0], -1)
            perm = _nm_permutation(layer) if nm is not None else None
            if perm is not None:
                new, keep = obs_prune(w2[:, perm], h[perm][:, perm], sparsity, nm=nm,
                                      blocksize=blocksize, damp=damp)
                inv = torch.argsort(perm)
                new, keep = new[:, inv], keep[:, inv]
            else:
                new, keep = obs_prune(w2, h, sparsity, nm=nm, blocksize=blocksize, damp=damp)
            report[layer.fqn] = {
                "error": layer_error(w2, new, h),
                "error_mask_only": layer_error(w2, w2.double() * keep, h)}
            with torch.no_grad():
                p.copy_(new.reshape(p.shape).to(p.dtype))
                p.masked_fill_(~keep.reshape(p.shape).to(p.device), 0.0)
            masks[layer.fqn] = PackedMask.from_tensor(keep.reshape(p.shape))
    meta = {"sparsity": sparsity, "pattern": pattern if nm else "unstructured",
            "scope": "layer" if nm is None else "run", "criterion": "sparsegpt",
            "conv": sorted(f for f, site in chosen.items() if site.is_conv),
            "reconstruction": {"method": "sparsegpt", "blocksize": blocksize, "damp": damp,
                               "batches": len(inputs), "layers": report}}
    plan = SparsityPlan(analysis.fingerprint, {f: masks[f] for f in chosen}, meta)
    out = copy.deepcopy(model)
    mine = dict(out.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for fqn in chosen:
            mine[fqn].copy_(params[fqn].detach().to(mine[fqn].device))
    return Sparsified(out, plan)
