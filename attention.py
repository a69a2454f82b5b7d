"""Multi-head attention with pluggable projection modules.

nn.MultiheadAttention reads `in_proj_weight` and `out_proj.weight` functionally, so swapping its Linear
for a masked or block-sparse one has no effect. `ProjectedAttention` computes the same thing through two
ordinary modules, `in_proj` (q, k and v stacked, embed_dim -> 3 * embed_dim) and `out_proj`, so that
Supermask layers (training) and block-sparse layers (inference) can stand in for them. Its attention core, where
no mask, dropout or attention weights are asked for, is one of ``attention_core.CORES`` (``core``), which
``blocksparse.apply_bsr`` picks by timing them on the model's shape.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention_core
import timm_attention


def unsupported_attention_reason(mha):
    """Why `mha` cannot become a ProjectedAttention, or None when it can."""
    if not mha._qkv_same_embed_dim:
        return "key/value dimensions differ from embed_dim (separate q/k/v projection weights)"
    if mha.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _additive_mask(attn_mask, key_padding_mask, batch, num_heads, target_len, source_len, dtype):
    """One float mask (batch, heads, L, S) from nn.MultiheadAttention's masks, where True means 'do not attend'."""
    merged = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
        attn_mask = attn_mask.to(dtype)
        merged = attn_mask.view(-1, num_heads if attn_mask.dim() == 3 else 1, target_len, source_len)
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            key_padding_mask = torch.zeros_like(key_padding_mask, dtype=dtype).masked_fill(
                key_padding_mask, float("-inf"))
        padding = key_padding_mask.to(dtype).view(batch, 1, 1, source_len)
        merged = padding if merged is None else merged + padding
    return merged


class ProjectedAttention(nn.Module):
    """Drop-in for nn.MultiheadAttention (same call and outputs) whose projections are ordinary modules."""

    def __init__(self, in_proj, out_proj, *, embed_dim, num_heads, dropout=0.0, batch_first=False, core="sdpa"):
        super().__init__()
        if core not in attention_core.CORES:
            raise ValueError(f"unknown attention core {core!r}; choose one of {', '.join(attention_core.CORES)}")
        self.core = core
        self.query_tile = attention_core.QUERY_TILE  # the fused cores' queries per tile (apply_bsr measures it)
        self.in_proj = in_proj
        self.out_proj = out_proj
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = self.embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        # A dense nn.MultiheadAttention checkpoint stores in_proj_weight / in_proj_bias.
        self._register_load_state_dict_pre_hook(_rename_multihead_keys)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.core = attention_core.settled(self.core, self.head_dim)  # unpickled: a fresh process, or another CPU

    @classmethod
    def from_attention(cls, mha, convert):
        """Wrap `mha`'s weights: `convert(linear)` turns each projection (as an nn.Linear) into its module.

        The result, projections included, takes `mha`'s mode (train/eval): its dropout acts in training only."""
        reason = unsupported_attention_reason(mha)
        if reason is not None:
            raise ValueError(f"cannot replace this nn.MultiheadAttention: {reason}")
        in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None,
                            device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                in_proj.bias.copy_(mha.in_proj_bias)
        in_proj.train(mha.training)
        projected = cls(convert(in_proj), convert(mha.out_proj), embed_dim=mha.embed_dim, num_heads=mha.num_heads,
                        dropout=mha.dropout, batch_first=mha.batch_first)
        return projected.train(mha.training)

    def to_attention(self, in_proj_weight, out_proj_weight):
        """A plain nn.MultiheadAttention with the given projection weights, this module's biases and its mode."""
        in_bias, out_bias = getattr(self.in_proj, "bias", None), getattr(self.out_proj, "bias", None)
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=in_bias is not None,
            batch_first=self.batch_first, device=in_proj_weight.device, dtype=in_proj_weight.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(in_proj_weight)
            mha.out_proj.weight.copy_(out_proj_weight)
            if in_bias is not None:
                mha.in_proj_bias.copy_(in_bias)
                mha.out_proj.bias.copy_(out_bias)
        return mha.train(self.training)

    def _project_qkv(self, query, key, value, self_attention):
        if self_attention:  # one matmul for q, k and v
            return self.in_proj(query).chunk(3, dim=-1)
        # Separate inputs: run the stacked projection on each and keep its third.
        e = self.embed_dim
        return (self.in_proj(query)[..., :e], self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # Decided before any reshaping: views of one tensor are different Python objects.
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (N, L, E) from here on: torchvision's ViT is batch-first, so it pays no transposes.
        batch, target_len, _ = query.shape
        source_len = key.shape[1]
        q, k, v = self._project_qkv(query, key, value, self_attention)

        def heads(t, length):  # (N, len, E) -> (N, H, len, head_dim)
            return t.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(q, target_len), heads(k, source_len), heads(v, source_len)
        dropout = self.dropout if self.training else 0.0
        if (self.core != "sdpa" and not need_weights and attn_mask is None and key_padding_mask is None
                and not is_causal and dropout == 0.0):
            return self._finish(self.out_proj(attention_core.run(self.core, q, k, v, self.query_tile)), None,
                                unbatched, average_attn_weights)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, self.num_heads, target_len, source_len, q.dtype)
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
            if is_causal and mask is None:
                scores = scores.masked_fill(
                    torch.ones(target_len, source_len, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target_len, self.embed_dim))
        return self._finish(out, weights, unbatched, average_attn_weights)

    def _finish(self, out, weights, unbatched, average_attn_weights):
        """The (N, L, E) output and (N, H, L, S) weights in the caller's layout."""
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self):
        tile = f", query_tile={self.query_tile}" if self.core in attention_core.PRODUCTS else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"core={self.core}{tile}")


def restore_sdpa(model: nn.Module) -> None:
    """Undo ``blocksparse.apply_bsr``'s attention cores (in place): every ProjectedAttention and timm attention runs
    SDPA again, and ProjectedAttentions whose projections are plain Linears (made for their core alone) are
    nn.MultiheadAttention again. The model as it ran before the fused core, for before/after timings."""
    plain = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    for fqn, module in list(model.named_modules()):
        if isinstance(module, timm_attention.CoreAttention):
            module.core = "sdpa"
        if not isinstance(module, ProjectedAttention):
            continue
        module.core = "sdpa"
        if type(module.in_proj) in plain and type(module.out_proj) in plain:
            model.set_submodule(fqn, module.to_attention(module.in_proj.weight, module.out_proj.weight)
                                .requires_grad_(False))


def _rename_multihead_keys(state_dict, prefix, *args):
    for old, new in [("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")]:
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
