"""Modules that pruned graphs use where torch's own cannot express the pruned shape.

``nn.MultiheadAttention`` requires ``embed_dim == num_heads * head_dim`` for the
input, the attention and the output alike; after pruning the residual stream, the heads
or head_dim independently those counts differ, so a pruned MHA becomes
:class:`PrunedMultiheadAttention`: same parameter names (state-dict compatible), same
forward signature and semantics, independent sizes, and the original attention scale.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with independent input, head, head_dim and output sizes."""

    def __init__(self, source: nn.MultiheadAttention, *, num_heads: int, head_dim: int,
                 scale: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.batch_first, self.dropout = source.batch_first, source.dropout
        self._qkv_same_embed_dim = source._qkv_same_embed_dim
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias"):
            value = getattr(source, name, None)
            if value is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, value)
        self.out_proj = source.out_proj
        self.embed_dim = self.out_proj.weight.shape[0]

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"out={self.embed_dim}, scale={self.scale:.4g}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inner = self.num_heads * self.head_dim
        bias = self.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.split(inner)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        q, k, v = self._project(query, key, value)
        heads, hd = self.num_heads, self.head_dim
        q = q.reshape(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = k.reshape(src_len, bsz * heads, hd).transpose(0, 1)
        v = v.reshape(src_len, bsz * heads, v.shape[-1] // heads).transpose(0, 1)
        scores = torch.bmm(q * self.scale, k.transpose(1, 2))
        scores = scores + self._additive_mask(attn_mask, key_padding_mask, is_causal,
                                              bsz, tgt_len, src_len, scores)
        weights = F.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, -1)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights.squeeze(0) if unbatched else weights

    def _additive_mask(self, attn_mask, key_padding_mask, is_causal, bsz, tgt_len, src_len,
                       like: Tensor) -> Tensor:
        mask = torch.zeros((), dtype=like.dtype, device=like.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool,
                                   device=like.device).triu(1)
        if attn_mask is not None:
            mask = mask + _to_additive(attn_mask, like)
        if key_padding_mask is not None:
            kpm = _to_additive(key_padding_mask, like).view(bsz, 1, 1, src_len)
            kpm = kpm.expand(bsz, self.num_heads, 1, src_len).reshape(bsz * self.num_heads, 1, src_len)
            mask = mask + kpm
        return mask


def _to_additive(mask: Tensor, like: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)

