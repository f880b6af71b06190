"""ComfyUI nodes of lora-engine (category "lora-engine"); ids prefixed so none collides with a built-in.

Nothing here imports ComfyUI at import time: ``folder_paths``, ``comfy.weight_adapter`` and
``comfy.hooks`` are imported inside the functions that need them.
"""
from .hook_lora import LoraEngineHookLora
from .info import LoraEngineInfo
from .loader import LoraEngineLoader, LoraEngineLoaderModelOnly
from .prompt_tags import LoraEnginePromptTags
from .stack import LoraEngineStack

NODE_CLASS_MAPPINGS = {
    "LoraEngineLoader": LoraEngineLoader,
    "LoraEngineLoaderModelOnly": LoraEngineLoaderModelOnly,
    "LoraEngineStack": LoraEngineStack,
    "LoraEnginePromptTags": LoraEnginePromptTags,
    "LoraEngineInfo": LoraEngineInfo,
    "LoraEngineHookLora": LoraEngineHookLora,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraEngineLoader": "LoRA Loader (lora-engine)",
    "LoraEngineLoaderModelOnly": "LoRA Loader, model only (lora-engine)",
    "LoraEngineStack": "LoRA Stack (lora-engine)",
    "LoraEnginePromptTags": "Prompt with LoRA tags (lora-engine)",
    "LoraEngineInfo": "LoRA Info (lora-engine)",
    "LoraEngineHookLora": "Scheduled LoRA hooks (lora-engine)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
