"""timm's ``Attention`` (ViT, DeiT) with its core on ``attention_core``: what ``blocksparse.apply_bsr`` puts in its place.

``CoreAttention`` holds the timm module's own children (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``,
``gate``, ``proj``, ``proj_drop``), so its state dict is the same, and computes timm's forward (its fused-attention
path) with one of ``attention_core.CORES`` where no mask, causal flag or dropout is asked for, SDPA otherwise.
Only timm's plain ``Attention`` is taken; its variants (rotary embeddings, windows) keep their own core.
"""

import torch.nn.functional as F
from torch import nn

import attention_core

_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop")


def unsupported_reason(module: nn.Module):
    """Why this timm ``Attention`` cannot become a ``CoreAttention``, or None when it can."""
    missing = [name for name in _CHILDREN + ("num_heads", "head_dim", "scale") if not hasattr(module, name)]
    if missing:
        return f"this timm version's Attention lacks {', '.join(missing)}"
    if abs(module.scale - module.head_dim ** -0.5) > 1e-12 * module.scale:
        return f"its scale {module.scale} is not head_dim ** -0.5"
    return None


class CoreAttention(nn.Module):
    """timm's ``Attention``, the same children, with its core one of ``attention_core.CORES`` (``core``)."""

    def __init__(self, timm_attention: nn.Module, core: str, query_tile: int = attention_core.QUERY_TILE):
        super().__init__()
        reason = unsupported_reason(timm_attention)
        if reason is not None:
            raise ValueError(f"cannot replace this timm Attention: {reason}")
        if core not in attention_core.CORES:
            raise ValueError(f"unknown attention core {core!r}; choose one of {', '.join(attention_core.CORES)}")
        for name in _CHILDREN:
            setattr(self, name, getattr(timm_attention, name))
        self.gate = getattr(timm_attention, "gate", None)
        self.num_heads, self.head_dim = timm_attention.num_heads, timm_attention.head_dim
        self.attn_dim = self.num_heads * self.head_dim
        self.core, self.query_tile = core, query_tile
        self.train(timm_attention.training)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.core = attention_core.settled(self.core, self.head_dim)  # unpickled: a fresh process, or another CPU

    def forward(self, x, attn_mask=None, is_causal=False):
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each, views of the projection
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and not is_causal and dropout == 0.0:
            x = attention_core.run(self.core, q, k, v, self.query_tile)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
            x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self):
        tile = f", query_tile={self.query_tile}" if self.core in attention_core.PRODUCTS else ""
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, core={self.core}{tile}"
