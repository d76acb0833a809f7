"""Llama 3's RoPE scaling (rope_type "llama3") in blocks: the fp32 block's forward and backward
against transformers' LlamaDecoderLayer with the same rope_scaling, and the nf4 block against the
fp32 one. The scaling's inverse frequencies themselves are compared with transformers' in
test_config.py; here original_max_position_embeddings is small so that all three frequency bands
(kept, blended, divided by factor) show at test lengths."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import cudablocks as cb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_block_fp32 import SMALL, Rotary, hf_config, hf_layer, hf_reference, rel, run_block, weights_of  # noqa: E402
from test_block_nf4 import dequantized  # noqa: E402

LENS = [30, 1, 17]
# Frequencies of wavelength above 32 positions are divided by factor, below 32 / 4 kept, blended in between.
SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}


def llama3_config(**scaling: Any) -> Any:
    return hf_config("llama", **SMALL, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                     rope_scaling={**SCALING, **scaling})


def test_frequencies_cover_all_three_bands() -> None:
    """The test setup: transformers rescales some frequencies fully, blends some and keeps some."""
    config = llama3_config()
    scaled = Rotary(config, "cpu").module.inv_freq.numpy()
    plain = Rotary(hf_config("llama", **SMALL, head_dim=32, rope_theta=10000.0), "cpu").module.inv_freq.numpy()
    ratio = plain / scaled
    assert (ratio == 1).any() and np.isclose(ratio, 4).any() and ((ratio > 1.01) & (ratio < 3.99)).any()
    assert np.array_equal(cb.TransformerConfig.from_dict(config.to_dict()).rope_inv_freq(), scaled)


def test_fp32_block_matches_transformers(device: cb.Device, rng: np.random.Generator) -> None:
    config = llama3_config()
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    assert cfg.rope_type == "llama3"
    layer = hf_layer(config, rng)
    x = rng.standard_normal((sum(LENS), config.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)

    block = cb.CudaBlock.fp32(cfg, 0, weights_of(layer), device, max_tokens=sum(LENS))
    out, grad_in, grads = run_block(block, x, LENS, grad_out)
    ref_out, ref_in, ref_grads = hf_reference(layer, Rotary(config, "cpu"), x, LENS, grad_out)
    assert rel(out, ref_out) <= 1e-5
    assert rel(grad_in, ref_in) <= 1e-4
    for name, g in ref_grads.items():
        assert rel(grads[name], g) <= 1e-4, name

    # The scaling matters at these lengths: unscaled RoPE is far from the reference.
    unscaled = cb.TransformerConfig.from_dict({**config.to_dict(), "rope_parameters": None, "rope_scaling": None,
                                               "rope_theta": 10000.0})
    assert unscaled.rope_type == "default"
    plain_out, _, _ = run_block(cb.CudaBlock.fp32(unscaled, 0, weights_of(layer), device, max_tokens=sum(LENS)),
                                x, LENS, grad_out)
    assert rel(plain_out, ref_out) > 1e-3


def test_nf4_block_matches_fp32_block(device: cb.Device, rng: np.random.Generator) -> None:
    """The nf4 block rotates with the same frequencies: its forward equals the fp32 block's on the
    dequantized weights."""
    config = llama3_config()
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    weights = weights_of(hf_layer(config, rng))
    x = rng.standard_normal((sum(LENS), config.hidden_size)).astype(np.float32)
    nf4 = cb.CudaBlock.nf4(cfg, 0, weights, device, max_tokens=sum(LENS), compute="fp32")
    fp32 = cb.CudaBlock.fp32(cfg, 0, dequantized(weights), device, max_tokens=sum(LENS))
    outs = []
    for block in (nf4, fp32):
        out = cb.GpuBuffer.empty(x.shape, "float32", device)
        block.forward(cb.GpuBuffer.from_numpy(x, device), out, LENS)
        outs.append(out.to_numpy())
    assert rel(outs[0], outs[1]) <= 1e-5
