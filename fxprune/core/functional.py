"""Functions that pruned graphs call where the original derives sizes from its input.

torchvision's Swin ``shifted_window_attention`` computes ``head_dim = C // num_heads`` from
the *input* width and merges heads back to ``C``; once the residual stream or the heads
are pruned those counts are independent, so a pruned call is rewritten to
:func:`window_attention`, which takes them explicitly and keeps the original scale.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_attention", "with_sizes"]


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int],
                like: Tensor) -> Tensor:
    """-100 between tokens of a window that come from different pre-shift regions."""
    region = torch.zeros((pad_h, pad_w), dtype=like.dtype, device=like.device)
    bounds_h = (0, pad_h - window[0], pad_h - shift[0], pad_h)
    bounds_w = (0, pad_w - window[1], pad_w - shift[1], pad_w)
    label = 0
    for i in range(3):
        for j in range(3):
            region[bounds_h[i]:bounds_h[i + 1], bounds_w[j]:bounds_w[j + 1]] = label
            label += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))


def window_attention(x: Tensor, qkv_weight: Tensor, proj_weight: Tensor,
                     relative_position_bias: Tensor, window_size: list[int], num_heads: int,
                     shift_size: list[int], attention_dropout: float = 0.0,
                     dropout: float = 0.0, qkv_bias: Tensor | None = None,
                     proj_bias: Tensor | None = None, logit_scale: Tensor | None = None,
                     training: bool = True, *, head_dim: int | None = None,
                     scale: float | None = None) -> Tensor:
    """(Shifted) window multi-head self-attention on ``x`` of shape (B, H, W, C).

    Same computation as torchvision's Swin attention (v1 scaled dot product, or v2
    cosine attention when ``logit_scale`` is given), with ``head_dim`` and the softmax
    ``scale`` explicit instead of derived from ``C``.
    """
    batch, height, width, _ = x.shape
    inner = qkv_weight.shape[0] // 3
    head_dim = head_dim or inner // num_heads
    scale = scale if scale is not None else head_dim ** -0.5
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, channels = x.shape
    shift = [0 if window_size[0] >= pad_h else shift_size[0],
             0 if window_size[1] >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    tokens = window_size[0] * window_size[1]
    x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1],
               window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * n_windows, tokens, channels)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]),
                              qkv_bias[2 * inner:]])
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.shape[0], tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(pad_h, pad_w, window_size, shift, attn)
        attn = attn.view(batch, n_windows, num_heads, tokens, tokens)
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], tokens, num_heads * v.shape[-1])
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    out_channels = x.shape[-1]
    x = x.view(batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0],
               window_size[1], out_channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, out_channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


torch.fx.wrap("window_attention")


def with_sizes(sizes: tuple[int, ...], updates: dict[int, int]) -> tuple[int, ...]:
    """``sizes`` (a shape computed at run time, e.g. ``x.shape[:-1] + (-1,)``) with the
    entries at ``updates``' axes replaced by pruned channel counts; -1 stays inferred."""
    out = list(sizes)
    for axis, n in updates.items():
        if out[axis] != -1:
            out[axis] = n
    return tuple(out)


torch.fx.wrap("with_sizes")
