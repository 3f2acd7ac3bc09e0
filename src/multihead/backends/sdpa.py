"""torch.nn.functional.scaled_dot_product_attention, with multihead's semantics kept.

SDPA already speaks our boolean convention (True = may attend) and takes float
masks added to the scores. Two things differ and are fixed at this edge:
- its is_causal is aligned top-left; ours is bottom-right, so a causal call
  with T != S passes an explicit mask instead;
- a query row with no key to attend must give output 0 and gradient 0. Such
  rows are opened to every key before the kernel (so no NaN reaches the
  backward) and their output is then replaced by 0, which also zeroes their
  gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import masks


class SdpaBackend:
    name = "sdpa"
    priority = 20
    summary = "torch scaled_dot_product_attention (flash/efficient/math as torch picks)"

    def supports(self, q, k, v, *, attn_mask, causal, scale, dropout_p) -> str | None:
        if q.shape[-2] == 0 or k.shape[-2] == 0:
            return "zero-length T or S (chunked and reference handle it)"
        return None

    def forward(self, q, k, v, *, attn_mask, causal, scale, dropout_p) -> Tensor:
        T, S = q.shape[-2], k.shape[-2]
        is_causal = False
        if causal and attn_mask is None and T == S:
            is_causal = True  # top-left and bottom-right agree on a square
        elif causal and not (T == 1 and attn_mask is None):  # one query at the end sees every key
            attn_mask = masks.materialize(attn_mask, True, T, S, q.dtype, q.device)

        row_has_key = None
        if attn_mask is not None:
            row_has_key = masks.allowed(attn_mask).any(dim=-1, keepdim=True)  # (b, h, T, 1)
            if bool(row_has_key.all()):
                row_has_key = None
            else:
                open_row = True if attn_mask.dtype == torch.bool else 0.0
                attn_mask = attn_mask.masked_fill(~row_has_key, open_row)

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # (B, H, T, Dv)
        if row_has_key is not None:
            out = torch.where(row_has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out
