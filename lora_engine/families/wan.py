"""Wan 2.1 / 2.2 video transformers (T2V, I2V, TI2V-5B; Wan 2.2 A14B as two experts).

Native (the Wan release, ComfyUI ``comfy/ldm/wan/model.py``) -> diffusers ``WanTransformer3DModel``; every
layer is one whole module in both trees (no fused rows):

- ``blocks.N.self_attn.{q,k,v,o}`` = ``blocks.N.attn1.{to_q,to_k,to_v,to_out.0}``, ``cross_attn.{q,k,v,o}`` =
  ``attn2.…``, I2V's ``cross_attn.{k_img,v_img}`` = ``attn2.{add_k_proj,add_v_proj}``; the q/k RMSNorms
  ``{self,cross}_attn.norm_{q,k}`` = ``attn{1,2}.norm_{q,k}``, ``cross_attn.norm_k_img`` = ``attn2.norm_added_k``;
- ``ffn.0`` / ``ffn.2`` = ``ffn.net.0.proj`` / ``ffn.net.2``; the cross-attention LayerNorm is ``norm3``
  natively and ``norm2`` in diffusers (the affine-free ``norm1``/``norm2`` hold no tensor);
- ``blocks.N.modulation`` = ``blocks.N.scale_shift_table``: an ``nn.Parameter`` (1, 6, h), no Linear; LoRA files
  patch it with a full ``diff`` (as ``head.modulation`` = ``scale_shift_table``, (1, 2, h));
- ``patch_embedding`` (Conv3d) same name, ``text_embedding.{0,2}`` / ``time_embedding.{0,2}`` =
  ``condition_embedder.{text,time}_embedder.linear_{1,2}``, ``time_projection.1`` = ``condition_embedder.time_proj``,
  ``head.head`` = ``proj_out``, I2V's ``img_emb.proj.{0,1,3,4}`` = ``condition_embedder.image_embedder.{norm1,
  ff.net.0.proj,ff.net.2,norm2}``.

Wan 2.2 A14B runs two experts of this tree: diffusers ``transformer`` for the high-noise steps and
``transformer_2`` for the low-noise ones; their LoRAs come in pairs. :func:`lora_expert` reads which one a
file was made for from its name, :func:`assign_experts` puts each LoRA of a stack on its expert.
Text encoder: UMT5-XXL; Wan trainers write transformer LoRAs only.
Facts from diffusers ``convert_wan_transformer_to_diffusers`` (the tests' oracle) and ComfyUI's model.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .base import Family, FamilyMismatch, Layer, count_blocks, rows_of, same

_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))
_I2V = (("k_img", "add_k_proj"), ("v_img", "add_v_proj"), ("norm_k_img", "norm_added_k"))
_CE = "condition_embedder."
_TOP = [("patch_embedding", "patch_embedding"), ("head.head", "proj_out"),
        ("text_embedding.0", _CE + "text_embedder.linear_1"), ("text_embedding.2", _CE + "text_embedder.linear_2"),
        ("time_embedding.0", _CE + "time_embedder.linear_1"), ("time_embedding.2", _CE + "time_embedder.linear_2"),
        ("time_projection.1", _CE + "time_proj"),
        ("img_emb.proj.0", _CE + "image_embedder.norm1"), ("img_emb.proj.1", _CE + "image_embedder.ff.net.0.proj"),
        ("img_emb.proj.3", _CE + "image_embedder.ff.net.2"), ("img_emb.proj.4", _CE + "image_embedder.norm2")]


def wan_config(shapes, naming: str) -> dict:
    inner = rows_of(shapes, "patch_embedding.weight")
    depth = count_blocks(shapes, "blocks")
    if inner is None or not depth:
        raise FamilyMismatch("no patch embedding or blocks: not a Wan tree")
    q = rows_of(shapes, "blocks.0.self_attn.q.weight" if naming == "native" else "blocks.0.attn1.to_q.weight")
    if q is not None and q != inner:
        raise FamilyMismatch(f"self-attention q has {q} rows, Wan's layout needs the model width {inner}")
    return {"inner": inner, "depth": depth}


def _block(i: int) -> list[Layer]:
    b = f"blocks.{i}."
    layers = [same(f"{b}self_attn.{n}", f"{b}attn1.{d}") for n, d in _ATTN]
    layers += [same(f"{b}cross_attn.{n}", f"{b}attn2.{d}") for n, d in _ATTN + _I2V]
    layers += [same(b + "norm3", b + "norm2"), same(b + "ffn.0", b + "ffn.net.0.proj"), same(b + "ffn.2", b + "ffn.net.2"),
               same(b + "modulation", b + "scale_shift_table", "", "")]
    return layers


def wan_layers(cfg: dict) -> list[Layer]:
    layers = [same(n, d) for n, d in _TOP] + [same("head.modulation", "scale_shift_table", "", "")]
    for i in range(cfg["depth"]):
        layers += _block(i)
    return layers


def wan_blocks(cfg: dict) -> list[str]:
    return [f"blocks.{i}" for i in range(cfg["depth"])]


_BLOCK = re.compile(r"^blocks[._](\d+)[._]")


def wan_block_of(path: str) -> str | None:
    m = _BLOCK.match(path)
    return None if m is None else f"blocks.{m.group(1)}"


WAN = Family(
    name="wan", label="Wan", markers={"blocks.0.self_attn.q.weight": "native", "blocks.0.attn1.to_q.weight": "diffusers"},
    config=wan_config, layer_list=wan_layers, text_encoders=(), blocks=wan_blocks, block_of=wan_block_of,
    requires={"native": ("head.head.",), "diffusers": (_CE,)},
    lora_patterns=(re.compile(r"^lora_unet_blocks_\d+_(self_attn|cross_attn|ffn|attn1|attn2|modulation)"),),
)

# Wan 2.2 A14B experts: diffusers component names
HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"
EXPERT_LABELS = {HIGH_NOISE: "high-noise", LOW_NOISE: "low-noise"}
_EXPERT_NAMES = ((HIGH_NOISE, re.compile(r"(?i)high[\W_]?noise|(?:^|[\W_])(?:high|hn)(?:[\W_]|$)")),
                 (LOW_NOISE, re.compile(r"(?i)low[\W_]?noise|(?:^|[\W_])(?:low|ln)(?:[\W_]|$)")))


def lora_expert(name: str) -> str | None:
    """The Wan 2.2 expert a LoRA file's name says it was made for (``Wan2.2-Lightning_HIGH``, ``…_high_noise``,
    ``…-LN``): :data:`HIGH_NOISE` / :data:`LOW_NOISE`, or None when it names neither or both."""
    hits = [expert for expert, pattern in _EXPERT_NAMES if pattern.search(name)]
    return hits[0] if len(hits) == 1 else None


def assign_experts(loras: Iterable[tuple[str, str | None]]) -> tuple[dict[str, list[str]], list[str]]:
    """Put each LoRA of a Wan 2.2 stack on its expert(s). ``loras``: ``(file name, asked)`` where ``asked`` is
    :data:`HIGH_NOISE`, :data:`LOW_NOISE`, ``"both"`` or None (not said). A LoRA asked for one expert goes
    there; otherwise one whose name declares an expert goes to that one only, and is told in one line when it
    was asked for both; a LoRA declaring none (a Wan 2.1 LoRA, most style LoRAs) goes to both.
    Returns ``({expert: [file names]}, lines)``."""
    out: dict[str, list[str]] = {HIGH_NOISE: [], LOW_NOISE: []}
    lines = []
    for name, asked in loras:
        declared = lora_expert(name)
        if asked in out:
            out[asked].append(name)
            if declared is not None and declared != asked:
                lines.append(f"{name}: made for the {EXPERT_LABELS[declared]} expert, applied to the "
                             f"{EXPERT_LABELS[asked]} one as asked")
        elif declared is not None:
            out[declared].append(name)
            if asked == "both":
                lines.append(f"{name}: made for the {EXPERT_LABELS[declared]} expert; applied to that expert only, "
                             f"not to both")
        else:
            out[HIGH_NOISE].append(name)
            out[LOW_NOISE].append(name)
    return out, lines
