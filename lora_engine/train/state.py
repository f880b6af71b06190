"""Resume state: one safetensors file, tensors in the body and JSON in the header (no pickle).

Holds the LoRA parameters, the optimiser state (any optimiser: its ``state_dict`` tree is
stored with tensors replaced by references), the global RNG states (torch CPU and CUDA, numpy,
python ``random``), the grad-scaler state, the step and batch position, loss history and the
config. Loading restores all of it, so the next step is the step the uninterrupted run takes.
"""
from __future__ import annotations

import json
import random

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..errors import TrainingError
from .save import atomic_write

KEY = "lora_engine_train_state"
VERSION = 1


def _encode(obj, tensors: dict, prefix: str, seen: dict | None = None):
    """JSON-able tree; tensors go to ``tensors`` under fresh keys; tuples and int keys kept. A tensor met
    twice (bitsandbytes' 8-bit optimisers share one quantisation map across parameters) is stored once and
    comes back as one tensor; other tensors sharing memory are copied (safetensors refuses shared memory)."""
    seen = {"ids": {}, "storage": set()} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen["ids"]:
            return {"__t": seen["ids"][id(obj)]}
        key = f"{prefix}{len(tensors)}"
        t = obj.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen["storage"]:
            t = t.clone()
        seen["storage"].add(t.untyped_storage().data_ptr())
        tensors[key], seen["ids"][id(obj)] = t, key
        return {"__t": key}
    if isinstance(obj, dict):
        return {"__d": [[_encode(k, tensors, prefix, seen), _encode(v, tensors, prefix, seen)]
                        for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple": [_encode(v, tensors, prefix, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, prefix, seen) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TrainingError(f"cannot store a {type(obj).__name__} in the training state")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__t" in obj:
            return tensors[obj["__t"]]
        if "__tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__d"]}
    return obj


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                       int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_state(path: str, network: torch.nn.Module, optimizer, info: dict, scaler=None, rng: dict | None = None) -> None:
    """``rng``: the RNG states to store (default: the current ones)."""
    tensors: dict[str, torch.Tensor] = {f"net/{k}": v.detach().cpu().contiguous()
                                        for k, v in network.state_dict().items()}
    tree = {"version": VERSION, "info": info, "optimizer": optimizer.state_dict(), "rng": rng or rng_state(),
            "scaler": scaler.state_dict() if scaler is not None else None}
    header = json.dumps(_encode(tree, tensors, "s/"))
    atomic_write(path, save(tensors, metadata={KEY: header}))


def load_state(path: str, network: torch.nn.Module, optimizer, scaler=None) -> dict:
    """Restore everything into the given objects; returns the ``info`` dict."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            header = (fh.metadata() or {}).get(KEY)
        tensors = load_file(path)
    except Exception as e:
        raise TrainingError(f"{path}: cannot read training state ({e})") from None
    if header is None:
        raise TrainingError(f"{path}: not a lora-engine training state (no {KEY} header)")
    tree = _decode(json.loads(header), tensors)
    if tree.get("version") != VERSION:
        raise TrainingError(f"{path}: training state version {tree.get('version')} is not {VERSION}")
    net = {k[4:]: v for k, v in tensors.items() if k.startswith("net/")}
    mine = network.state_dict()
    if set(net) != set(mine) or any(net[k].shape != mine[k].shape for k in mine):
        raise TrainingError(f"{path}: the saved LoRA does not match this network (other rank, targets or model)")
    network.load_state_dict(net)
    optimizer.load_state_dict(tree["optimizer"])
    if scaler is not None and tree["scaler"] is not None:
        scaler.load_state_dict(tree["scaler"])
    set_rng_state(tree["rng"])
    return tree["info"]
