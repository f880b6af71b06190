"""An OpenCLIP text tower built from torch modules with the real names and layout.

As ldm/sgm hold it (``cond_stage_model.model``, ``conditioner.embedders.1.model``):
``token_embedding``, ``positional_embedding`` (a Parameter), ``transformer.resblocks[N]`` with
``ln_1``, ``attn`` (``nn.MultiheadAttention``: q/k/v fused in ``in_proj_weight``/``in_proj_bias``,
``out_proj``), ``ln_2``, ``mlp.c_fc``/``mlp.c_proj``, then ``ln_final`` and ``text_projection``
(a ``(width, proj)`` Parameter, i.e. the HF Linear weight transposed).

``from_hf`` copies an HF ``CLIPTextModel``'s weights into this layout (q, k, v stacked on dim 0),
so the two compute the same hidden states when the HF config uses ``hidden_act="gelu"``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_width, eps) for _ in range(layers))


class OpenCLIPText(nn.Module):
    def __init__(self, vocab: int, n_ctx: int, width: int, layers: int, heads: int, mlp_width: int,
                 proj_dim: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(n_ctx, width))
        self.transformer = Transformer(width, layers, heads, mlp_width, eps)
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Parameter(torch.zeros(width, proj_dim)) if proj_dim else None
        mask = torch.full((n_ctx, n_ctx), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last hidden state after ``ln_final``, ``(batch, tokens, width)``."""
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask[:n, :n])
        return self.ln_final(x)

    @classmethod
    def from_hf(cls, hf) -> "OpenCLIPText":
        """Copy an HF ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` into the OpenCLIP layout."""
        c = hf.config
        proj = getattr(hf, "text_projection", None)
        device = next(hf.parameters()).device
        with torch.device(device):  # "meta" too: full-size structure tests build no storage
            out = cls(c.vocab_size, c.max_position_embeddings, c.hidden_size, c.num_hidden_layers,
                      c.num_attention_heads, c.intermediate_size, proj.out_features if proj is not None else None,
                      c.layer_norm_eps)
        tm = getattr(hf, "text_model", hf)  # transformers>=5 CLIPTextModel has no text_model level
        with torch.no_grad():
            out.token_embedding.weight.copy_(tm.embeddings.token_embedding.weight)
            out.positional_embedding.copy_(tm.embeddings.position_embedding.weight)
            for block, layer in zip(out.transformer.resblocks, tm.encoder.layers):
                _copy_layer(block, layer)
            out.ln_final.load_state_dict(tm.final_layer_norm.state_dict())
            if proj is not None:
                out.text_projection.copy_(proj.weight.T)
        return out.to(next(hf.parameters()).dtype).eval()


def _copy_layer(block: ResidualAttentionBlock, layer) -> None:
    att = layer.self_attn
    block.attn.in_proj_weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    block.attn.in_proj_bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
    block.attn.out_proj.load_state_dict(att.out_proj.state_dict())
    block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
    block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
    block.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
    block.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())
