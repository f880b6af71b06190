"""What the real-ComfyUI check scripts share (imported from inside a ComfyUI checkout, next to the scripts)."""
import torch


def random_model(model_config, seed: int = 0, scale: float = 0.05):
    """(BaseModel, ModelPatcher) of a ``comfy.supported_models`` config with seeded random fp32 weights, on CPU."""
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(seed)
    m = model_config.get_model({}, "", device="cpu")
    with torch.no_grad():
        for p in m.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    cpu = torch.device("cpu")
    return m, comfy.model_patcher.ModelPatcher(m, load_device=cpu, offload_device=cpu)
