"""A1111 test extension for tests/hosts/a1111/real: ``POST /lora-engine-probe/dump?path=FILE[&every=N]`` writes the
current weights of the LoRA-targetable layers (attention, MLP, proj_in/out; UNet and text encoders)
of the loaded model to a safetensors file, so a check can compare them bit for bit.
Copy this folder to ``extensions/lora-engine-probe`` of a test A1111, never of one you use."""
import re

from safetensors.torch import save_file

from modules import script_callbacks, shared

TARGETS = re.compile(r"(transformer_blocks|encoder\.layers|resblocks|proj_in|proj_out)\..*weight$")


def dump(path: str, every: int = 1) -> dict:
    """``every``: keep one target tensor in that many (an SDXL dump of all of them is ~5 GB)."""
    sd, seen = {}, set()
    for k, v in shared.sd_model.state_dict(keep_vars=True).items():  # SDXL: cond_stage_model aliases conditioner
        if TARGETS.search(k) and "norm" not in k and ".ln_" not in k and v.is_floating_point() and id(v) not in seen:
            seen.add(id(v))
            if (len(seen) - 1) % every == 0:
                sd[k] = v.detach().to("cpu").contiguous().clone()
    save_file(sd, path)
    return {"tensors": len(sd), "dtype": str(next(iter(sd.values())).dtype)}


def registry() -> dict:
    from modules import extra_networks
    return {k: f"{type(v).__module__}.{type(v).__name__}" for k, v in extra_networks.extra_network_registry.items()}


def on_app_started(demo, app) -> None:
    app.add_api_route("/lora-engine-probe/dump", dump, methods=["POST"])
    app.add_api_route("/lora-engine-probe/registry", registry, methods=["GET"])


script_callbacks.on_app_started(on_app_started)
