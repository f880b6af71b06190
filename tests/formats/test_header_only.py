"""check_finite=False: the folder-scan path interprets a file from its header and scalars only."""
import pytest
import torch
from safetensors.torch import save_file

from lora_engine.library.summary import summarize
from lora_engine.errors import LoraFileError
from lora_engine.formats import load_lora


def _nan_file(path):
    up = torch.randn(8, 2)
    up[0, 0] = float("nan")
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": up,
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}, str(path))


def test_default_scan_flags_nan_and_header_only_does_not(tmp_path):
    p = tmp_path / "nan.safetensors"
    _nan_file(p)
    with pytest.raises(LoraFileError, match="NaN/Inf"):  # its only module is unusable
        load_lora(p)
    header = load_lora(p, check_finite=False)
    assert not header.warnings and list(header.modules) == ["lora_unet_mid_block_attentions_0_proj_in"]
    s = summarize(p, check_finite=False)
    assert s.error is None and s.format == "kohya" and s.modules == 1
