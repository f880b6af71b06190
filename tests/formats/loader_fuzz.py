"""Mutation fuzzing of the LoRA file loader, shared by ``test_loader_fuzz.py`` (a short seeded run) and
``bench/fuzz_loader.py`` (long runs).

Five valid files, written by the reference writer (``safetensors.torch.save_file``): a kohya LoRA (linear,
conv, Tucker, DoRA modules, kohya metadata), a LyCORIS file (LoHa, LoKr, IA3, full, norm, OFT, BOFT, GLoRA),
a diffusers file whose alpha comes from ``lora_adapter_metadata``, a PEFT folder (weights +
``adapter_config.json``, DoRA) and a misaligned file (header not padded, so fp32 data starts at an odd
offset). Variant ``i`` of a run with seed ``s`` uses ``random.Random(f"{s}:{i}")``, so one failing variant is
reproduced by its index alone (:func:`make_variant`). Each variant is one mutation kind:

- ``byte_flip``: 1-8 bits or bytes changed, mostly in the header;
- ``truncate``: cut in the length prefix, the header or the data;
- ``header_len``: the 8-byte header length changed (off by a few, 0, huge, the file size, ...);
- ``splice``: a range of header bytes deleted, doubled or replaced by JSON punctuation; bytes appended;
- ``dtype``, ``shape``, ``offsets``: one tensor entry's field replaced (wrong types, floats, booleans,
  strings, negative, huge, ``Infinity``, ``-0``, zero-element shapes that overflow, gaps, overlaps, ...);
- ``nesting``: deep brackets in an entry, an extra field, a metadata value, around the header, unbalanced;
- ``metadata``: ``__metadata__`` of the wrong type, non-string values, lone surrogates, duplicate keys,
  many keys, control characters, broken ``lora_adapter_metadata`` configs;
- ``keys``: duplicate, renamed (empty, surrogate, ``__metadata__``, very long, other role), deleted tensors;
- ``tensors``: a file the reference writer wrote, with one tensor replaced (0-d or 1-d factors,
  multi-element or empty or NaN alpha, other dtypes, zero-size dims), removed, or a stray one added;
- ``peft_config``: the PEFT folder's ``adapter_config.json`` damaged (bytes, types of alpha and patterns,
  invalid regular expressions, deep nesting, not UTF-8, too large).

:func:`check_variant` loads it with ``load_lora`` and sorts the outcome into ``loaded``, ``LoraFileError`` or
``other`` (anything else, a multi-line or file-less message, a summary that cannot be printed); it also asks
the reference reader (``safetensors.safe_open``) and our container reader whether the safetensors file opens.
"""
from __future__ import annotations

import json
import os
import random
import struct
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_engine.library.summary import format_summary, summarize, summary_json
from lora_engine.errors import LoraFileError
from lora_engine.formats import load_lora
from lora_engine.formats.safetensors_file import DTYPES, SafetensorsFile

KINDS = ("byte_flip", "truncate", "header_len", "splice", "dtype", "shape", "offsets", "nesting", "metadata", "keys",
         "tensors", "peft_config")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- the valid files

def _t(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 7 * len(shape)))


def _kohya() -> tuple[dict, dict]:
    u = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    sd = {
        f"{u}attn2_to_k.lora_down.weight": _t(4, 16, seed=1), f"{u}attn2_to_k.lora_up.weight": _t(8, 4, seed=2),
        f"{u}attn2_to_k.alpha": torch.tensor(2.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": _t(4, 8, 3, 3, seed=3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": _t(8, 4, 1, 1, seed=4),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(4.0),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight": _t(4, 8, 1, 1, seed=5),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_mid.weight": _t(4, 4, 3, 3, seed=6),
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_up.weight": _t(8, 4, 1, 1, seed=7),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _t(4, 16, seed=8).half(),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _t(16, 4, seed=9).half(),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0).half(),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": _t(16, 1, seed=10).half(),
    }
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_output_name": "fuzz_kohya",
            "ss_base_model_version": "sd_v1", "modelspec.title": "ノート — test",
            "ss_tag_frequency": json.dumps({"10_fuzz": {"1girl": 3, "solo": 2, "{braces}": 1, "\"q\"": 1}}),
            "ss_dataset_dirs": json.dumps({"C:\\data\\10_fuzz": {"n_repeats": 10, "img_count": 4}})}
    return sd, meta


def _lycoris() -> tuple[dict, dict]:
    p = "lora_unet_mid_block_attentions_0_"
    sd = {
        f"{p}proj_in.hada_w1_a": _t(8, 2, seed=1), f"{p}proj_in.hada_w1_b": _t(2, 16, seed=2),
        f"{p}proj_in.hada_w2_a": _t(8, 2, seed=3), f"{p}proj_in.hada_w2_b": _t(2, 16, seed=4),
        f"{p}proj_in.alpha": torch.tensor(1.0),
        f"{p}proj_out.lokr_w1": _t(2, 2, seed=5), f"{p}proj_out.lokr_w2_a": _t(4, 2, seed=6),
        f"{p}proj_out.lokr_w2_b": _t(2, 8, seed=7), f"{p}proj_out.alpha": torch.tensor(2.0),
        f"{p}transformer_blocks_0_attn1_to_q.weight": _t(8, seed=8),
        f"{p}transformer_blocks_0_attn1_to_q.on_input": torch.tensor(0),
        f"{p}transformer_blocks_0_attn1_to_k.diff": _t(8, 16, seed=9),
        f"{p}transformer_blocks_0_attn1_to_k.diff_b": _t(8, seed=10),
        f"{p}norm.w_norm": _t(16, seed=11), f"{p}norm.b_norm": _t(16, seed=12),
        f"{p}transformer_blocks_0_attn1_to_v.oft_blocks": _t(2, 4, 4, seed=13),
        f"{p}transformer_blocks_0_attn1_to_v.alpha": torch.tensor(0.5),
        f"{p}transformer_blocks_0_attn2_to_q.oft_blocks": _t(2, 2, 4, 4, seed=14),
        f"{p}transformer_blocks_0_ff_net_2.a1.weight": _t(16, 2, seed=15),
        f"{p}transformer_blocks_0_ff_net_2.a2.weight": _t(2, 16, seed=16),
        f"{p}transformer_blocks_0_ff_net_2.b1.weight": _t(8, 2, seed=17),
        f"{p}transformer_blocks_0_ff_net_2.b2.weight": _t(2, 16, seed=18),
        f"{p}transformer_blocks_0_ff_net_2.alpha": torch.tensor(2.0),
    }
    return sd, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "mixed"})}


def _diffusers() -> tuple[dict, dict]:
    a = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    sd = {f"{a}to_q.lora_A.weight": _t(4, 16, seed=1), f"{a}to_q.lora_B.weight": _t(16, 4, seed=2),
          f"{a}to_k.lora_A.weight": _t(4, 16, seed=3), f"{a}to_k.lora_B.weight": _t(16, 4, seed=4),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": _t(4, 16, seed=5),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": _t(16, 4, seed=6)}
    cfg = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 2}, "text_encoder.r": 4,
           "text_encoder.lora_alpha": 4}
    return sd, {"lora_adapter_metadata": json.dumps(cfg), "format": "pt"}


def _peft() -> tuple[dict, dict, dict]:
    a = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    sd = {f"{a}to_q.lora_A.weight": _t(4, 16, seed=1), f"{a}to_q.lora_B.weight": _t(16, 4, seed=2),
          f"{a}to_v.lora_A.weight": _t(4, 16, seed=3), f"{a}to_v.lora_B.weight": _t(16, 4, seed=4),
          f"{a}to_v.lora_magnitude_vector": _t(16, seed=5).abs() + 0.5}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"to_v": 4}, "use_rslora": False,
           "use_dora": True, "target_modules": ["to_q", "to_v"], "rank_pattern": {}}
    return sd, {"format": "pt"}, cfg


def _st_bytes(sd: dict, meta: dict) -> bytes:
    return _write_and_read(lambda p: save_file(sd, p, metadata=meta))


def _write_and_read(write) -> bytes:
    import tempfile

    fd, p = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        write(p)
        with open(p, "rb") as fh:
            return fh.read()
    finally:
        os.remove(p)


def _unpadded(raw: bytes) -> bytes:
    """The same file with its header's trailing padding removed: tensor data no longer 8-byte aligned."""
    (n,) = struct.unpack("<Q", raw[:8])
    head = raw[8:8 + n].rstrip(b" ")
    if len(head) % 4 == 0:
        head += b" "
    return struct.pack("<Q", len(head)) + head + raw[8 + n:]


@dataclass
class Base:
    name: str
    raw: bytes  # the safetensors bytes
    tensors: dict
    metadata: dict
    config: dict | None = None  # a PEFT folder's adapter_config.json
    n: int = 0
    header: dict = field(default_factory=dict)  # tensor entries (no __metadata__), in file order
    data: bytes = b""

    def __post_init__(self):
        (self.n,) = struct.unpack("<Q", self.raw[:8])
        h = json.loads(self.raw[8:8 + self.n])
        h.pop("__metadata__", None)
        self.header = h
        self.data = self.raw[8 + self.n:]


def make_bases() -> list[Base]:
    k, lyc, dif = _kohya(), _lycoris(), _diffusers()
    psd, pmeta, pcfg = _peft()
    raw_k = _st_bytes(*k)
    return [Base("kohya", raw_k, *k), Base("lycoris", _st_bytes(*lyc), *lyc), Base("diffusers", _st_bytes(*dif), *dif),
            Base("peft", _st_bytes(psd, pmeta), psd, pmeta, pcfg), Base("misaligned", _unpadded(raw_k), *k)]


# ---------------------------------------------------------------- building headers with exact text

class Raw:
    """JSON text placed as is (what ``json.dumps`` cannot write: ``-0``, raw control characters, deep nesting)."""

    def __init__(self, text: str):
        self.text = text


class Pairs(list):
    """An object written from (key, value) pairs, duplicates allowed."""


def enc(v) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        v = Pairs(v.items())
    if isinstance(v, Pairs):
        return "{" + ",".join(enc(k) + ":" + enc(x) for k, x in v) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(enc(x) for x in v) + "]"
    return json.dumps(v)  # str (lone surrogates as \\udXXX escapes), int, float (inf/nan as Infinity/NaN), bool, None


def assemble(header, data: bytes, rng: random.Random | None = None, n: int | None = None) -> bytes:
    text = enc(header).encode("utf-8", "surrogatepass")
    if rng is not None and rng.random() < 0.5:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def _entry_pairs(base: Base, meta=None) -> Pairs:
    out = Pairs()
    if meta is not None:
        out.append(("__metadata__", meta))
    out.extend((k, dict(v)) for k, v in base.header.items())
    return out


# ---------------------------------------------------------------- mutations

@dataclass
class Variant:
    index: int
    kind: str
    base: str
    desc: str
    weights: bytes  # the safetensors file (or the PEFT folder's weights)
    config: bytes | None = None  # the PEFT folder's adapter_config.json, None for a single file


def _pick_entry(base: Base, rng: random.Random) -> str:
    return rng.choice(list(base.header))


def _header_with(base: Base, rng: random.Random, key: str, field_name: str, value) -> bytes:
    pairs = _entry_pairs(base, base.metadata or None)
    for i, (k, e) in enumerate(pairs):
        if k == key:
            e = dict(e)
            e[field_name] = value
            pairs[i] = (k, e)
    return assemble(pairs, base.data, rng)


def m_byte_flip(base: Base, rng: random.Random):
    raw = bytearray(base.raw)
    k = rng.choice((1, 1, 2, 3, 8))
    where = []
    for _ in range(k):
        pos = rng.randrange(8, 8 + base.n) if rng.random() < 0.8 else rng.randrange(len(raw))
        if rng.random() < 0.5:
            raw[pos] ^= 1 << rng.randrange(8)
        else:
            raw[pos] = rng.randrange(256)
        where.append(pos)
    return bytes(raw), f"{k} byte(s) at {where}"


def m_truncate(base: Base, rng: random.Random):
    region = rng.choice(("prefix", "header", "header", "data"))
    cut = {"prefix": lambda: rng.randrange(0, 8), "header": lambda: rng.randrange(8, 8 + base.n),
           "data": lambda: rng.randrange(8 + base.n, len(base.raw))}[region]()
    return base.raw[:cut], f"cut at byte {cut} ({region})"


def m_header_len(base: Base, rng: random.Random):
    size = len(base.raw)
    n = rng.choice((base.n + rng.randint(-9, 9), 0, 1, 2, base.n // 2, base.n * 2, size - 8, size, size + 1,
                    100_000_001, 2**32 + base.n, 2**63, 2**64 - 1, rng.randrange(2**64)))
    n = max(0, min(n, 2**64 - 1))
    return struct.pack("<Q", n) + base.raw[8:], f"header length {base.n} -> {n}"


def m_splice(base: Base, rng: random.Random):
    head = bytearray(base.raw[8:8 + base.n])
    op = rng.choice(("delete", "double", "insert", "append", "whitespace"))
    a = rng.randrange(len(head))
    b = min(len(head), a + rng.randint(1, 40))
    if op == "delete":
        del head[a:b]
    elif op == "double":
        head[a:a] = head[a:b]
    elif op == "insert":
        head[a:a] = bytes(rng.choice(b'{}[]":,\\ 0123456789eE.-tfnu\x00\xff') for _ in range(rng.randint(1, 6)))
    elif op == "whitespace":
        head[0:0] = rng.choice((b" ", b"\t\n", b"\r\n  ", b"\xef\xbb\xbf", b"\x00"))
    data = base.data
    if op == "append":
        data = data + bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 100))))
    keep_n = rng.random() < 0.2
    n = base.n if keep_n else len(head)
    return struct.pack("<Q", n) + bytes(head) + data, f"{op} at {a}:{b}" + (" (length kept)" if keep_n else "")


def m_dtype(base: Base, rng: random.Random):
    key = _pick_entry(base, rng)
    value = rng.choice(list(DTYPES) + ["f32", "F4", "F6_E2M3", "F8_E8M0", "C64", "Q4_K", "", " F32", "F32\u0000",
                                       "\ud800", 3, 3.5, None, True, ["F32"], {"F32": 1}])
    return _header_with(base, rng, key, "dtype", value), f"{key}: dtype -> {value!r}"


def m_shape(base: Base, rng: random.Random):
    key = _pick_entry(base, rng)
    shape = list(base.header[key]["shape"])
    choices = [[], [0], shape + [1], shape[:-1], shape[::-1], [-1] + shape[1:], [2**62, 2**62], [0, 2**62, 2**10],
               [2**62, 2**10, 0], [0, 2**64 - 1], [2**64], [2**64 - 1, 1], [float(d) for d in shape],
               [True] + shape[1:],
               [str(d) for d in shape], None, {}, 4, [shape], Raw("[Infinity]"), Raw("[NaN, 2]"), Raw("[-0]"),
               Raw("[1e2]"), [1] * rng.choice((10, 100, 10_000)) + shape, shape + [0], [d * 2 for d in shape]]
    value = rng.choice(choices)
    return _header_with(base, rng, key, "shape", value), f"{key}: shape -> {enc(value)[:60]}"


def m_offsets(base: Base, rng: random.Random):
    key = _pick_entry(base, rng)
    b, e = base.header[key]["data_offsets"]
    other = base.header[_pick_entry(base, rng)]["data_offsets"]
    k = rng.choice((1, 2, 4, 8))
    choices = [[b + k, e + k], [b, e + k], [b - k, e], [e, b], [b, e, e], [b], [], list(other), [b + 0.0, e],
               [str(b), e], [True, e] if b == 1 else [b, True], None, Raw(f"[{b}, Infinity]"), [b, 2**64],
               [b, 2**64 + 5], Raw(f"[-0, {e}]") if b == 0 else Raw(f"[{b}, -0]"), [b, e - k], {"0": b, "1": e},
               Raw(f"[{b}.0, {e}]"), Raw(f"[{b}e0, {e}]")]
    value = rng.choice(choices)
    if rng.random() < 0.15:  # every tensor shifted by k bytes, k bytes added in front: contiguous but not from 0
        pairs = _entry_pairs(base, base.metadata or None)
        for _, ent in pairs[1 if base.metadata else 0:]:
            ent["data_offsets"] = [ent["data_offsets"][0] + k, ent["data_offsets"][1] + k]
        front = rng.random() < 0.5
        return assemble(pairs, (b"\0" * k if front else b"") + base.data, rng), f"all offsets +{k}, front pad {front}"
    return _header_with(base, rng, key, "data_offsets", value), f"{key}: data_offsets -> {enc(value)[:60]}"


def m_nesting(base: Base, rng: random.Random):
    d = rng.choice((2, 3, 5, 6, 7, 8, 9, 50, 127, 129, 1000, 5000, 100_000))
    deep = Raw("[" * d + "1" + "]" * d)
    where = rng.choice(("entry", "extra_field", "metadata_value", "header", "unbalanced", "metadata_string",
                        "adapter_metadata"))
    key = _pick_entry(base, rng)
    meta = dict(base.metadata)
    pairs = _entry_pairs(base)
    if where == "entry":
        pairs = Pairs((k, Raw("[" * d + enc(e) + "]" * d) if k == key else e) for k, e in pairs)
    elif where == "extra_field":
        pairs = Pairs((k, dict(e, extra=deep) if k == key else e) for k, e in pairs)
    elif where == "metadata_value":
        meta["nested"] = deep
    elif where in ("metadata_string", "adapter_metadata"):
        meta["lora_adapter_metadata" if where == "adapter_metadata" else "nested"] = "[" * d + "]" * d
    if meta:
        pairs.insert(0, ("__metadata__", meta))
    text = enc(pairs)
    if where == "header":
        text = "[" * d + text + "]" * d
    elif where == "unbalanced":
        text = text[:-1] + "[" * d + "}"
    head = text.encode("utf-8")
    return struct.pack("<Q", len(head)) + head + base.data, f"depth {d} in {where}"


_BAD_ADAPTER_CONFIGS = [
    {"unet.lora_alpha": "x"}, {"unet.alpha_pattern": {"(": 1}}, [1, 2], "1", {"unet.lora_alpha": None},
    {"unet.alpha_pattern": []}, {"unet.lora_alpha": True}, {"unet.alpha_pattern": {"to_q": "x"}},
    {"lora_alpha": 10**400}, {"unet.lora_alpha": 8, "unet.alpha_pattern": {"[": 2}}, {"unet.use_rslora": "maybe"},
    {"unet.lora_alpha": -4}, {"unet.lora_alpha": 0}, {"text_encoder.lora_alpha": [4]},
]


def m_metadata(base: Base, rng: random.Random):
    meta = Pairs(base.metadata.items())
    op = rng.choice(("not_object", "value_type", "surrogate_value", "surrogate_key", "pair", "duplicate", "many",
                     "huge_value", "control_char", "adapter_config", "arch_fields", "empty", "null"))
    k = rng.choice([k for k, _ in meta]) if meta else "x"
    desc = op
    if op == "not_object":
        meta = rng.choice(([], "x", 1, True, [["a", "b"]]))
    elif op == "value_type":
        v = rng.choice((1, None, [], {}, 1.5, True, {"a": "b"}, Raw("Infinity")))
        meta = Pairs((a, v if a == k else b) for a, b in meta)
        desc += f" {k}={enc(v)}"
    elif op == "surrogate_value":
        meta.append((rng.choice(("ss_output_name", "ss_network_dim", "modelspec.title", "ss_tag_frequency")),
                     rng.choice(("bad\ud800name", "\udcff", "a\udc80b\ud83d", "\ud83d\ude00\ud800"))))
    elif op == "surrogate_key":
        meta.append((rng.choice(("\ud800", "ss_\udcffx")), "v"))
    elif op == "pair":
        meta.append(("emoji", "\ud83d\ude00"))
    elif op == "duplicate":
        meta.append((k, "again"))
    elif op == "many":
        count = rng.choice((100, 1000, 20_000))
        meta.extend((f"k{i}", str(i)) for i in range(count))
        desc += f" {count}"
    elif op == "huge_value":
        meta.append(("big", "x" * rng.choice((10_000, 1_000_000))))
    elif op == "control_char":
        meta.append(("ctl", Raw('"a\x01b"')))
    elif op == "adapter_config":
        cfg = rng.choice(_BAD_ADAPTER_CONFIGS)
        text = json.dumps(cfg) if not isinstance(cfg, str) else cfg
        meta = Pairs([(a, b) for a, b in meta if a != "lora_adapter_metadata"] + [("lora_adapter_metadata", text)])
        desc += f" {text[:60]}"
    elif op == "arch_fields":
        field_name = rng.choice(("ss_base_model_version", "modelspec.architecture", "ss_v2"))
        meta.append((field_name, rng.choice(("sdxl_base_v1-0", "sd_v2_v", "", "True", "stable-diffusion-xl",
                                             "x" * 300, "\udcff"))))
    elif op == "empty":
        meta = {}
    elif op == "null":
        meta = None
    pairs = _entry_pairs(base)
    pairs.insert(0, ("__metadata__", meta))
    return assemble(pairs, base.data, rng), desc


def m_keys(base: Base, rng: random.Random):
    key = _pick_entry(base, rng)
    pairs = _entry_pairs(base, base.metadata or None)
    op = rng.choice(("duplicate_same", "duplicate_other", "rename", "delete", "delete_with_data"))
    idx = next(i for i, (k, _) in enumerate(pairs) if k == key)
    data = base.data
    if op == "duplicate_same":
        pairs.insert(idx, pairs[idx])
    elif op == "duplicate_other":
        other = rng.choice([k for k, _ in pairs if k != "__metadata__"])
        pairs.append((key, dict(base.header[other])))
    elif op == "rename":
        new = rng.choice(("", "\ud800", "__metadata__", key + "\udcff", "x" * 20_000, key.replace("down", "up"),
                          key.replace("lora_", "lora_lora_"), key.rsplit(".", 1)[0] + ".alpha", key.upper(),
                          key + ".weight", "\u0000" + key, key.replace("_", ".")))
        pairs[idx] = (new, pairs[idx][1])
        return assemble(pairs, data, rng), f"rename {key} -> {new[:60]!r}"
    elif op == "delete":
        del pairs[idx]
    else:  # remove the entry and its bytes, shifting the later offsets: a valid container without that tensor
        b, e = base.header[key]["data_offsets"]
        del pairs[idx]
        for _, ent in pairs:
            if isinstance(ent, dict) and "data_offsets" in ent and ent["data_offsets"][0] >= e:
                ent["data_offsets"] = [ent["data_offsets"][0] - (e - b), ent["data_offsets"][1] - (e - b)]
        data = data[:b] + data[e:]
    return assemble(pairs, data, rng), f"{op} {key}"


def _replacement(t: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, str]:
    choices = [
        ("0-d", lambda: torch.tensor(1.5)), ("empty", lambda: torch.zeros(0)), ("1-d", lambda: torch.randn(8)),
        ("3 elements", lambda: torch.randn(3)), ("2x3", lambda: torch.randn(2, 3)),
        ("3-d", lambda: torch.randn(2, 4, 4)),
        ("5-d", lambda: torch.randn(2, 2, 1, 1, 1)), ("int8", lambda: t.to(torch.int8)), ("bool", lambda: t > 0),
        ("bf16", lambda: t.to(torch.bfloat16)), ("NaN", lambda: torch.full_like(t.float(), float("nan"))),
        ("inf", lambda: torch.full_like(t.float(), float("inf"))), ("zero rows", lambda: torch.zeros(0, *t.shape[1:])),
        ("zero cols", lambda: torch.zeros(t.shape[0] if t.ndim else 1, 0)), ("transposed", lambda: t.T.contiguous()
                                                                              if t.ndim == 2 else t.reshape(-1)),
        ("huge value", lambda: torch.full_like(t.float(), 3e38)), ("long alpha", lambda: torch.tensor([4.0, 4.0])),
        ("uint8", lambda: t.to(torch.uint8)), ("square", lambda: torch.randn(4, 4)),
    ]
    if hasattr(torch, "float8_e4m3fn"):
        choices.append(("f8", lambda: t.float().to(torch.float8_e4m3fn)))
    name, make = rng.choice(choices)
    return make(), name


def m_tensors(base: Base, rng: random.Random):
    sd = {k: v.clone() for k, v in base.tensors.items()}
    op = rng.choice(("replace", "replace", "replace", "remove", "add", "move"))
    key = rng.choice(sorted(sd))
    if op == "replace":
        sd[key], what = _replacement(sd[key], rng)
        desc = f"{key} -> {what}"
    elif op == "remove":
        del sd[key]
        desc = f"remove {key}"
    elif op == "add":
        stem = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        new = stem + rng.choice((".alpha", ".scale", ".lora_mid.weight", ".dora_scale", ".on_input", ".hada_t1",
                                 ".lokr_t2", ".bias", ".weight", ".diff", ".oft_diag", ".rescale", ".unknown"))
        sd[new] = rng.choice((torch.randn(4), torch.tensor(2.0), torch.randn(4, 4), torch.randn(2, 2, 3, 3),
                              torch.randn(0)))
        desc = f"add {new}"
    else:
        other = rng.choice(sorted(sd))
        sd[key], sd[other] = sd[other], sd[key]
        desc = f"swap {key} and {other}"
    return _st_bytes(sd, base.metadata), desc


def _config_mutation(cfg: dict, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(("field", "field", "bytes", "truncate", "not_utf8", "nesting", "not_object", "empty", "huge"))
    text = json.dumps(cfg)
    if op == "field":
        name = rng.choice(("lora_alpha", "alpha", "alpha_pattern", "use_rslora", "r", "target_modules"))
        value = rng.choice(("x", None, [], {}, True, 10**400, -8, 0, 1e-300, {"(": 2}, {"to_v": "x"}, {"[a-": 1},
                            {"to_v": None}, Raw("Infinity"), Raw("NaN"), {"to_v": 10**400}, ["to_v"], "\ud800"))
        out = Pairs(cfg.items())
        out.append((name, value))
        return enc(out).encode("utf-8", "surrogatepass"), f"{name}={enc(value)[:40]}"
    raw = text.encode()
    if op == "bytes":
        b = bytearray(raw)
        for _ in range(rng.choice((1, 2, 4))):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), op
    if op == "truncate":
        return raw[:rng.randrange(len(raw))], op
    if op == "not_utf8":
        return raw[:-1] + b"\xff\xfe}", op
    if op == "nesting":
        d = rng.choice((10, 1000, 100_000))
        return (text[:-1] + ', "deep": ' + "[" * d + "]" * d + "}").encode(), f"{op} {d}"
    if op == "not_object":
        return rng.choice((b"[]", b"1", b'"cfg"', b"null")), op
    if op == "empty":
        return b"", op
    return b'{"r": 4, "pad": "' + b"x" * (5 * 2**20) + b'"}', op


def m_peft_config(base: Base, rng: random.Random):
    cfg, desc = _config_mutation(base.config, rng)
    return base.raw, cfg, desc


MUTATORS = {"byte_flip": m_byte_flip, "truncate": m_truncate, "header_len": m_header_len, "splice": m_splice,
            "dtype": m_dtype, "shape": m_shape, "offsets": m_offsets, "nesting": m_nesting, "metadata": m_metadata,
            "keys": m_keys, "tensors": m_tensors, "peft_config": m_peft_config}


def make_variant(bases: list[Base], seed: int, index: int) -> Variant:
    """Variant ``index`` of the run ``seed``: kinds in turn, bases in turn within a kind (``peft_config`` always
    on the PEFT folder); the PEFT folder's config is the valid one unless the kind damages it."""
    rng = random.Random(f"{seed}:{index}")
    kind = KINDS[index % len(KINDS)]
    peft = next(b for b in bases if b.config is not None)
    base = peft if kind == "peft_config" else bases[(index // len(KINDS)) % len(bases)]
    out = MUTATORS[kind](base, rng)
    if kind == "peft_config":
        weights, config, desc = out
    else:
        (weights, desc), config = out, None
        if base.config is not None:
            config = json.dumps(base.config).encode()
    return Variant(index, kind, base.name, desc, weights, config)


# ---------------------------------------------------------------- running one variant

@dataclass
class Outcome:
    variant: Variant
    result: str  # "loaded" | "LoraFileError" | "other"
    detail: str
    ours_opens: bool  # our container reader accepts the safetensors bytes
    ours_error: str  # its refusal, "" when it opens them
    reference_opens: bool  # safetensors.safe_open accepts them
    reference_error: str
    seconds: float


def _one_line_naming(e: LoraFileError, path: str) -> bool:
    msg = str(e)
    return "\n" not in msg and e.path is not None and msg.startswith(e.path + ": ") and e.path.startswith(path)


def _printable(*texts: str) -> bool:
    try:
        for t in texts:
            t.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_variant(v: Variant, folder: str) -> Outcome:
    """Write ``v`` under ``folder`` (a file, or a PEFT folder) and load it."""
    if v.config is None:
        target = weights = os.path.join(folder, "variant.safetensors")
    else:
        target = os.path.join(folder, "peft")
        os.makedirs(target, exist_ok=True)
        weights = os.path.join(target, WEIGHTS)
        with open(os.path.join(target, CONFIG), "wb") as fh:
            fh.write(v.config)
    with open(weights, "wb") as fh:
        fh.write(v.weights)
    t0 = time.perf_counter()
    try:
        lf = load_lora(target, check_finite=v.index % 2 == 0)
    except LoraFileError as e:
        result, detail = ("LoraFileError", e.problem) if _one_line_naming(e, target) else \
            ("other", f"LoraFileError with a bad message: {str(e)[:300]!r}")
        summary = summarize(target, check_finite=False)
        if summary.error is None and result == "LoraFileError" and v.index % 2 == 0:
            pass  # refused only for NaN/Inf, which the header-level summary does not scan
        elif summary.error is None:
            result, detail = "other", f"load refused ({detail}) but summarize read it"
    except Exception as e:  # noqa: BLE001 - what the fuzz is for
        result = "other"
        detail = f"{type(e).__name__}: {str(e)[:200]} | " + traceback.format_exc().strip().splitlines()[-3].strip()
        summary = None
    else:
        result, detail = "loaded", f"{len(lf.modules)} modules, {len(lf.problems)} problems"
        summary = summarize(lf)
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in lf.metadata.items()):
            result, detail = "other", "metadata holds a non-string"
    seconds = time.perf_counter() - t0
    if summary is not None and not _printable(format_summary(summary), summary_json(summary),
                                              json.dumps(summary.to_json(), ensure_ascii=False)):
        result, detail = "other", "summary cannot be printed as UTF-8"
    ours_error = ""
    try:
        SafetensorsFile(weights)
        ours = True
    except LoraFileError as e:
        ours, ours_error = False, e.problem
    except Exception as e:  # noqa: BLE001 - the container reader alone let something else out
        ours, ours_error = False, f"{type(e).__name__}: {e}"
        result, detail = "other", f"SafetensorsFile: {type(e).__name__}: {str(e)[:200]}"
    try:
        with safe_open(weights, framework="pt"):
            pass
        ref, ref_err = True, ""
    except Exception as e:  # noqa: BLE001 - the reference reader's refusals (SafetensorError, OSError, ...)
        ref, ref_err = False, str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return Outcome(v, result, detail, ours, ours_error, ref, ref_err, seconds)


def intentional_extra_acceptance(o: Outcome) -> bool:
    """We open and the reference does not: only for lone surrogates in metadata (read as U+FFFD)."""
    return "hex escape" in o.reference_error or "surrogate" in o.reference_error or "unicode" in o.reference_error


@dataclass
class Report:
    outcomes: list[Outcome]
    seconds: float

    def counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {k: Counter() for k in KINDS}
        for o in self.outcomes:
            out[o.variant.kind][o.result] += 1
        return out

    def others(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "other"]

    def reference_refused_we_opened(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ours_opens and not o.reference_opens]

    def table(self) -> str:
        lines = ["| kind | variants | loaded | LoraFileError | other | reference opens | we open | "
                 "only the reference opens | only we open |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        total = Counter()
        for kind in KINDS:
            os_ = [o for o in self.outcomes if o.variant.kind == kind]
            row = Counter(n=len(os_), loaded=sum(o.result == "loaded" for o in os_),
                          err=sum(o.result == "LoraFileError" for o in os_),
                          other=sum(o.result == "other" for o in os_),
                          ref=sum(o.reference_opens for o in os_), ours=sum(o.ours_opens for o in os_),
                          ref_only=sum(o.reference_opens and not o.ours_opens for o in os_),
                          ours_only=sum(o.ours_opens and not o.reference_opens for o in os_))
            total.update(row)
            lines.append(_row(kind, row))
        lines.append(_row("**all**", total))
        return "\n".join(lines)


def _row(name: str, c: Counter) -> str:
    return (f"| {name} | {c['n']} | {c['loaded']} | {c['err']} | {c['other']} | {c['ref']} | {c['ours']} | "
            f"{c['ref_only']} | {c['ours_only']} |")


def run(n: int, seed: int, folder: str, progress=None) -> Report:
    bases = make_bases()
    t0 = time.perf_counter()
    outcomes = []
    for i in range(n):
        outcomes.append(check_variant(make_variant(bases, seed, i), folder))
        outcomes[-1].variant.weights = outcomes[-1].variant.config = None  # a long run keeps the outcomes only
        if progress is not None:
            progress(i + 1, outcomes[-1])
    return Report(outcomes, time.perf_counter() - t0)
