"""TransformerConfig from Hugging Face config.json dicts and files (transformers 4 and 5 spellings)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cudablocks as cb

# Abridged from the hub's config.json files (transformers 4 spelling: top-level rope_theta).
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 36,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": True, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16",
}
QWEN2_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": 32768, "tie_word_embeddings": True,
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": None,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": True,
}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
}
# Llama 3.2 1B: head_dim 64, factor 32.
LLAMA_3_2_1B = {**LLAMA, "rope_scaling": {**LLAMA3_SCALING, "factor": 32.0}}


def v5(config: dict[str, Any], key: str = "rope_parameters") -> dict[str, Any]:
    """The transformers 5 spelling: rope_theta inside rope_parameters (or rope_scaling)."""
    d = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    d[key] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    return d


@pytest.mark.parametrize("spelling", ["v4", "v5", "v5-rope_scaling"])
def test_three_model_types(spelling: str) -> None:
    convert = {"v4": lambda d: d, "v5": v5, "v5-rope_scaling": lambda d: v5(d, "rope_scaling")}[spelling]
    q3 = cb.TransformerConfig.from_dict(convert(QWEN3_4B))
    assert (q3.model_type, q3.hidden_size, q3.num_attention_heads, q3.num_key_value_heads, q3.head_dim) == (
        "qwen3", 2560, 32, 8, 128)
    assert (q3.intermediate_size, q3.num_hidden_layers, q3.vocab_size, q3.max_position_embeddings) == (
        9728, 36, 151936, 40960)
    assert q3.rope_theta == 1e6 and q3.rms_norm_eps == 1e-6 and q3.tie_word_embeddings
    assert q3.qk_norm and not q3.attention_bias and not q3.o_proj_bias

    q2 = cb.TransformerConfig.from_dict(convert(QWEN2_0_5B))
    assert q2.head_dim == 64 and q2.num_key_value_heads == 2 and q2.rope_theta == 1e6
    assert q2.attention_bias and not q2.o_proj_bias and not q2.qk_norm

    ll = cb.TransformerConfig.from_dict(convert(LLAMA))
    assert ll.head_dim == 64 and ll.rope_theta == 500000.0 and ll.rms_norm_eps == 1e-5
    assert not ll.attention_bias and not ll.o_proj_bias and not ll.qk_norm
    ll_bias = cb.TransformerConfig.from_dict({**convert(LLAMA), "attention_bias": True})
    assert ll_bias.attention_bias and ll_bias.o_proj_bias


def test_from_pretrained_reads_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(v5(QWEN3_4B)))
    cfg = cb.TransformerConfig.from_pretrained(tmp_path)
    assert cfg == cb.TransformerConfig.from_dict(QWEN3_4B)
    assert cb.TransformerConfig.from_pretrained(str(tmp_path / "config.json")) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert "head_dim=128" in repr(cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        cb.TransformerConfig.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(cb.InvalidArgumentError, match="not valid JSON"):
        cb.TransformerConfig.from_pretrained(tmp_path / "bad")


def test_head_dim_is_never_derived_when_given() -> None:
    # Qwen3-0.6B: hidden 1024 with 16 heads of 128 (not 64).
    cfg = cb.TransformerConfig.from_dict({**QWEN3_4B, "hidden_size": 1024, "num_attention_heads": 16,
                                          "head_dim": 128})
    assert cfg.head_dim == 128
    llama = cb.TransformerConfig.from_dict({**LLAMA, "head_dim": 96})
    assert llama.head_dim == 96
    # Absent: Qwen3 takes transformers' default 128; Qwen2/Llama hidden / heads.
    no_head_dim = {k: v for k, v in QWEN3_4B.items() if k != "head_dim"}
    assert cb.TransformerConfig.from_dict({**no_head_dim, "hidden_size": 1024}).head_dim == 128
    assert cb.TransformerConfig.from_dict({**LLAMA, "head_dim": None}).head_dim == 64


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"type": "linear", "factor": 2.0},
    {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "original_max_position_embeddings": 4096},
    {"rope_type": "dynamic", "factor": 2.0},
])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_is_refused(scaling: dict[str, Any], key: str) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(cb.UnsupportedOperationError, match=f"RoPE scaling type '{kind}'"):
        cb.TransformerConfig.from_dict({**LLAMA, key: {**scaling, "rope_theta": 10000.0}})


def test_unknown_and_unsupported_models_are_refused() -> None:
    with pytest.raises(cb.UnsupportedOperationError, match="model_type 'mistral'"):
        cb.TransformerConfig.from_dict({**LLAMA, "model_type": "mistral"})
    with pytest.raises(cb.UnsupportedOperationError, match="hidden_act 'gelu'"):
        cb.TransformerConfig.from_dict({**LLAMA, "hidden_act": "gelu"})
    with pytest.raises(cb.UnsupportedOperationError, match="mlp_bias"):
        cb.TransformerConfig.from_dict({**LLAMA, "mlp_bias": True})
    with pytest.raises(cb.UnsupportedOperationError, match="sliding"):
        cb.TransformerConfig.from_dict({**QWEN2_0_5B, "use_sliding_window": True})
    with pytest.raises(cb.UnsupportedOperationError, match="partial_rotary_factor"):
        cb.TransformerConfig.from_dict({**LLAMA, "partial_rotary_factor": 0.5})
    # model_type missing: taken from architectures, else an error.
    assert cb.TransformerConfig.from_dict({k: v for k, v in QWEN2_0_5B.items() if k != "model_type"}).model_type == "qwen2"
    with pytest.raises(cb.InvalidArgumentError, match="model_type"):
        cb.TransformerConfig.from_dict({k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures")})


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(cb.InvalidArgumentError, match="multiple of num_key_value_heads"):
        cb.TransformerConfig.from_dict({**QWEN3_4B, "num_key_value_heads": 5})
    with pytest.raises(cb.InvalidArgumentError, match="hidden_size must be positive"):
        cb.TransformerConfig.from_dict({**QWEN3_4B, "hidden_size": 0})
    with pytest.raises(cb.InvalidArgumentError, match="intermediate_size must be positive"):
        cb.TransformerConfig.from_dict({**QWEN3_4B, "intermediate_size": -4})
    with pytest.raises(cb.InvalidArgumentError, match="head_dim must be even"):
        cb.TransformerConfig.from_dict({**QWEN3_4B, "head_dim": 127})
    with pytest.raises(cb.InvalidArgumentError, match="missing 'hidden_size'"):
        cb.TransformerConfig.from_dict({k: v for k, v in QWEN3_4B.items() if k != "hidden_size"})
    with pytest.raises(cb.InvalidArgumentError, match="not a multiple"):
        cb.TransformerConfig.from_dict({**LLAMA, "hidden_size": 2050})
    with pytest.raises(cb.InvalidArgumentError, match="must be an integer"):
        cb.TransformerConfig.from_dict({**LLAMA, "hidden_size": "2048"})
    with pytest.raises(cb.InvalidArgumentError, match="rms_norm_eps"):
        cb.TransformerConfig.from_dict({**LLAMA, "rms_norm_eps": -1.0})
    with pytest.raises(cb.InvalidArgumentError, match="rope_theta"):
        cb.TransformerConfig.from_dict({**LLAMA, "rope_theta": 0})


def test_transformers_own_configs_round_trip() -> None:
    """Configs written by the installed transformers (its current spelling) read back the same."""
    transformers = pytest.importorskip("transformers")
    for cls, extra in ((transformers.Qwen3Config, {"head_dim": 48}), (transformers.Qwen2Config, {}),
                       (transformers.LlamaConfig, {"attention_bias": True})):
        hf = cls(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=3, vocab_size=1000, rms_norm_eps=1e-5, rope_theta=12345.0, **extra)
        cfg = cb.TransformerConfig.from_dict(hf.to_dict())
        assert cfg.rope_theta == 12345.0 and cfg.rms_norm_eps == 1e-5 and cfg.num_hidden_layers == 3
        assert cfg.head_dim == extra.get("head_dim", 32)
        assert cfg.o_proj_bias == bool(extra.get("attention_bias"))


# ---- llama3 RoPE scaling ------------------------------------------------------------------------------

def hf_inv_freq(config: Any) -> Any:
    """transformers' inverse frequencies (LlamaRotaryEmbedding's, float32) for a LlamaConfig or a config dict."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if isinstance(config, dict):
        config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    return LlamaRotaryEmbedding(config).inv_freq.numpy()


@pytest.mark.parametrize("spelling", ["v4", "v5"])
@pytest.mark.parametrize("config", [LLAMA_3_1_8B, LLAMA_3_2_1B], ids=["llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_scaling_parses_and_matches_transformers(config: dict[str, Any], spelling: str) -> None:
    d = dict(config)
    if spelling == "v5":  # transformers 5: rope_parameters with rope_theta inside
        d["rope_parameters"] = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}
    cfg = cb.TransformerConfig.from_dict(d)
    scaling = config["rope_scaling"]
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 500000.0, scaling["factor"])
    assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_position_embeddings) == (
        1.0, 4.0, 8192)
    inv_freq = cfg.rope_inv_freq()
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (cfg.head_dim // 2,)
    np.testing.assert_array_equal(inv_freq, hf_inv_freq(config))
    assert pickle.loads(pickle.dumps(cfg)) == cfg and cfg.to_dict()["rope_type"] == "llama3"
    assert cfg != cb.TransformerConfig.from_dict({**config, "rope_scaling": None})


def test_llama3_scaling_of_random_configs_matches_transformers(rng: np.random.Generator) -> None:
    """Random head dims, thetas and scalings. transformers takes theta ** x with torch's vectorised
    powf, which differs from the correctly rounded power by an ulp for a few (theta, head_dim); where
    the unscaled frequencies agree, the scaled ones must agree bit for bit, elsewhere within
    2 * factor ulp (the blend's s = original / wavelen - low cancels, amplifying the ulp by up to factor)."""
    agreed = 0
    for _ in range(40):
        head_dim = int(rng.choice([16, 64, 96, 128, 256]))
        scaling = {"rope_type": "llama3", "factor": float(rng.uniform(1, 40)),
                   "low_freq_factor": float(rng.uniform(0.5, 2)), "high_freq_factor": float(rng.uniform(2.5, 8)),
                   "original_max_position_embeddings": int(rng.integers(16, 20000))}
        base = {**LLAMA, "hidden_size": 2 * head_dim, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": head_dim, "rope_theta": float(rng.choice([10000.0, 500000.0, rng.uniform(100, 2e6)])),
                "max_position_embeddings": 10**6}
        scaled = {**base, "rope_scaling": scaling}
        ours, theirs = cb.TransformerConfig.from_dict(scaled).rope_inv_freq(), hf_inv_freq(scaled)
        same_base = cb.TransformerConfig.from_dict(base).rope_inv_freq() == hf_inv_freq(base)
        np.testing.assert_array_equal(ours[same_base], theirs[same_base])
        np.testing.assert_allclose(ours, theirs, rtol=2 * scaling["factor"] * 2.0**-23, atol=0)
        agreed += int(same_base.sum())
    assert agreed > 0.9 * 40 * 32


def test_bad_llama3_scaling_is_refused() -> None:
    with pytest.raises(cb.InvalidArgumentError, match="no low_freq_factor"):
        cb.TransformerConfig.from_dict({**LLAMA, "rope_scaling": {**LLAMA3_SCALING, "low_freq_factor": None}})
    with pytest.raises(cb.InvalidArgumentError, match="low_freq_factor < high_freq_factor"):
        cb.TransformerConfig.from_dict({**LLAMA, "rope_scaling": {**LLAMA3_SCALING, "high_freq_factor": 1.0}})
    with pytest.raises(cb.InvalidArgumentError, match="factor must be finite and >= 1"):
        cb.TransformerConfig.from_dict({**LLAMA, "rope_scaling": {**LLAMA3_SCALING, "factor": 0.5}})
    with pytest.raises(cb.InvalidArgumentError, match="original_max_position_embeddings must be positive"):
        cb.TransformerConfig.from_dict({**LLAMA, "rope_scaling": {**LLAMA3_SCALING,
                                                                  "original_max_position_embeddings": 0}})
    with pytest.raises(cb.InvalidArgumentError, match="different llama3"):
        cb.TransformerConfig.from_dict({**LLAMA, "rope_scaling": LLAMA3_SCALING,
                                        "rope_parameters": {**LLAMA3_SCALING, "factor": 16.0}})
    with pytest.raises(cb.UnsupportedOperationError, match="rope_type 'yarn'"):
        cb.TransformerConfig(model_type="llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                             head_dim=32, intermediate_size=8, num_hidden_layers=1, vocab_size=8,
                             max_position_embeddings=64, rope_type="yarn")


def test_transformers_own_llama3_config_round_trips() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                                  vocab_size=100, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                                  max_position_embeddings=131072)
    cfg = cb.TransformerConfig.from_dict(hf.to_dict())
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0 and cfg.rope_factor == 8.0
    np.testing.assert_array_equal(cfg.rope_inv_freq(), hf_inv_freq(hf))
