"""The synthetic checkpoints for real-host runs have trained-like norms, so no host-side 0/0 (A1111's
emphasis divides by the conditioning's mean) can fake or mask a result."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.models.full_sd import randomize_norms

transformers = pytest.importorskip("transformers", reason="the CLIP text model comes from transformers")


def _clip():
    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77)
    torch.manual_seed(0)
    return transformers.CLIPTextModel(cfg).eval()


def test_randomized_norms_give_a_conditioning_with_a_nonzero_mean():
    model = _clip()
    ids = torch.randint(0, 99, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids).last_hidden_state
        randomize_norms(model, seed=3)
        trained_like = model(ids).last_hidden_state
    assert plain.mean(-1).abs().max() < 1e-5  # the library's init: every token's features average to 0
    assert trained_like.mean().abs() > 1e-3  # A1111's original_mean / new_mean is then well defined
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
