"""TransformerConfig from a Hugging Face ``config.json``.

``TransformerConfig.from_pretrained(path)`` and ``TransformerConfig.from_dict(d)`` land here. They
map the spellings of Qwen3, Qwen2 and Llama configs, from transformers 4 and 5, onto the native
struct (``cudablocks._core.TransformerConfig``):

* ``head_dim`` is taken from the config whenever it is there. When it is absent, Qwen3 uses
  transformers' default of 128 and Qwen2/Llama use ``hidden_size // num_attention_heads``.
* ``rope_theta`` is read top-level (transformers 4) or from the ``rope_parameters`` /
  ``rope_scaling`` dicts (transformers 5: ``{"rope_type": "default", "rope_theta": ...}``).
  RoPE types ``default`` and ``llama3`` (Llama 3.1 and later: ``factor``, ``low_freq_factor``,
  ``high_freq_factor``, ``original_max_position_embeddings``, all required) are implemented;
  any other (linear, dynamic, yarn, longrope, ...) or a ``partial_rotary_factor`` below 1 is
  refused with :class:`UnsupportedOperationError`. ``TransformerConfig.rope_inv_freq()`` gives
  the resulting inverse frequencies, as transformers computes them.
* Biases: Qwen2 always has q/k/v biases and no o_proj bias; Qwen3 and Llama have q/k/v *and*
  o_proj biases exactly when ``attention_bias`` is true. ``qk_norm`` is true for Qwen3 only.
* Refused (``UnsupportedOperationError``): unknown ``model_type``, ``hidden_act`` other than
  silu, Llama's ``mlp_bias``, ``use_sliding_window``.
* Missing or inconsistent sizes raise :class:`InvalidArgumentError` naming the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from cudablocks._core import TransformerConfig
from cudablocks.errors import InvalidArgumentError, UnsupportedOperationError

__all__ = ["TransformerConfig", "config_from_dict", "config_from_pretrained"]

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")

# transformers' defaults for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"vocab_size": 151936, "max_position_embeddings": 32768, "head_dim": 128},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768},
    "llama": {"vocab_size": 32000, "max_position_embeddings": 2048},
}

_ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3ForSequenceClassification": "qwen3",
    "Qwen3Model": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen2Model": "qwen2",
    "LlamaForCausalLM": "llama",
    "LlamaForSequenceClassification": "llama",
    "LlamaModel": "llama",
}


def _int(d: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = d.get(key, default)
    if value is None:
        raise InvalidArgumentError(f"config is missing {key!r}, which a {d.get('model_type')} decoder needs")
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidArgumentError(f"config {key!r} must be an integer, got {value!r}")
    return value


def _float(d: Mapping[str, Any], key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


# llama3's keys in a rope_scaling / rope_parameters dict, and the TransformerConfig fields they fill.
_LLAMA3_FIELDS = {
    "factor": "rope_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_position_embeddings",
}


def _llama3_scaling(params: Mapping[str, Any], key: str) -> dict[str, Any]:
    """TransformerConfig's rope_* fields from a llama3 ``rope_scaling`` dict (ranges: validate())."""
    missing = [name for name in _LLAMA3_FIELDS if params.get(name) is None]
    if missing:
        raise InvalidArgumentError(f"config {key!r} has rope_type 'llama3' but no {', '.join(missing)}")
    scaling: dict[str, Any] = {"rope_type": "llama3"}
    for name, field in _LLAMA3_FIELDS.items():
        if name == "original_max_position_embeddings":
            scaling[field] = _int(params, name)
        else:
            scaling[field] = _float(params, name, params[name])
    return scaling


def _rope(d: Mapping[str, Any]) -> dict[str, Any]:
    """TransformerConfig's RoPE fields: rope_theta, and rope_type with llama3's numbers when scaled."""
    theta = d.get("rope_theta")
    scaling: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise InvalidArgumentError(f"config {key!r} must be a dict or null, got {params!r}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise UnsupportedOperationError(
                f"config {key!r} gives RoPE parameters per layer type ({sorted(params)}); cudablocks implements "
                "one rotary embedding for every layer"
            )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "llama3":
            found = _llama3_scaling(params, key)
            if scaling and found != scaling:
                raise InvalidArgumentError("config 'rope_parameters' and 'rope_scaling' give different llama3 RoPE scalings")
            scaling = found
        elif rope_type not in (None, "default"):
            raise UnsupportedOperationError(
                f"RoPE scaling type {rope_type!r} ({key} = {dict(params)}) is not implemented: cudablocks supports "
                "the default rotary embedding and llama3's scaling (not linear, dynamic, yarn or longrope)"
            )
        factor = params.get("partial_rotary_factor", 1.0)
        if factor is not None and float(factor) != 1.0:
            raise UnsupportedOperationError(f"partial_rotary_factor {factor} is not implemented (only 1.0)")
        if params.get("rope_theta") is not None:
            theta = params["rope_theta"]
    if d.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise UnsupportedOperationError(f"partial_rotary_factor {d['partial_rotary_factor']} is not implemented (only 1.0)")
    return {"rope_theta": _float(d, "rope_theta", 10000.0 if theta is None else theta), **scaling}


def config_from_dict(config: Mapping[str, Any]) -> TransformerConfig:
    """A TransformerConfig from the dict of a Hugging Face config.json (see the module docstring)."""
    if not isinstance(config, Mapping):
        raise InvalidArgumentError(f"from_dict expects a dict (a parsed config.json), got {type(config).__name__}")
    d = dict(config)
    model_type = d.get("model_type")
    if model_type is None:
        for arch in d.get("architectures") or ():
            if arch in _ARCHITECTURES:
                model_type = _ARCHITECTURES[arch]
                break
    if model_type is None:
        raise InvalidArgumentError("config has no 'model_type' (expected one of: " + ", ".join(SUPPORTED_MODEL_TYPES) + ")")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedOperationError(
            f"model_type {model_type!r} is not supported: cudablocks implements "
            + ", ".join(SUPPORTED_MODEL_TYPES)
            + " decoder layers"
        )
    d["model_type"] = model_type
    defaults = _DEFAULTS[model_type]

    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedOperationError(f"hidden_act {act!r} is not implemented: cudablocks' MLP is SwiGLU (silu)")
    if d.get("mlp_bias", False):
        raise UnsupportedOperationError("mlp_bias = true is not implemented: cudablocks' MLP projections have no biases")
    if d.get("use_sliding_window", False):
        raise UnsupportedOperationError(
            "use_sliding_window = true is not implemented: cudablocks' attention is full causal attention"
        )

    hidden = _int(d, "hidden_size")
    heads = _int(d, "num_attention_heads")
    kv_heads = _int(d, "num_key_value_heads", heads)
    if d.get("head_dim") is not None:
        head_dim = _int(d, "head_dim")
    elif "head_dim" in defaults:
        head_dim = defaults["head_dim"]
    else:
        if heads <= 0 or hidden % heads != 0:
            raise InvalidArgumentError(
                f"config has no head_dim and hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )
        head_dim = hidden // heads

    attention_bias = bool(d.get("attention_bias", False))
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias, o_bias = attention_bias, attention_bias

    return TransformerConfig(
        model_type=model_type,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_int(d, "intermediate_size"),
        num_hidden_layers=_int(d, "num_hidden_layers"),
        vocab_size=_int(d, "vocab_size", defaults["vocab_size"]),
        max_position_embeddings=_int(d, "max_position_embeddings", defaults["max_position_embeddings"]),
        rms_norm_eps=_float(d, "rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
        **_rope(d),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def config_from_pretrained(path: str | os.PathLike[str]) -> TransformerConfig:
    """Reads ``path/config.json`` (or ``path`` itself when it is a file)."""
    path = os.fspath(path)
    file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path!r}: give a model directory (with config.json) or the file")
    with open(file, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{file} is not valid JSON: {e}") from None
    return config_from_dict(d)
