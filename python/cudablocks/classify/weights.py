"""Reading a Hugging Face decoder model directory: :class:`ModelFiles`.

A model directory holds ``config.json`` and its weights in safetensors form, either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Tensors are named as
transformers names them: ``model.embed_tokens.weight``, ``model.layers.<i>.<...>``,
``model.norm.weight``, plus ``lm_head.weight`` (causal LMs, absent when tied to the embedding) or
``score.weight`` (sequence classifiers). A bare base model (``Qwen3Model``) stores the same names
without the ``model.`` prefix; both spellings are read.

Float tensors may be bf16, fp16 or fp32. A bitsandbytes 4-bit (NF4) checkpoint stores each
quantized projection as the entries of bitsandbytes' state dict (``<proj>.weight`` packed uint8,
``<proj>.weight.absmax``, ``<proj>.weight.quant_map``, ``<proj>.weight.quant_state.bitsandbytes__nf4``,
and with double quantization ``<proj>.weight.nested_absmax`` / ``.nested_quant_map``); those are
handed on as they are, which is what :meth:`cudablocks.CudaBlock.nf4` accepts.

The files are memory-mapped by the ``safetensors`` library (whose numpy API reads bf16 as
``ml_dtypes.bfloat16``) and only the tensors asked for are read, so host memory peaks near one
layer, not the model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import safetensors

from cudablocks.config import TransformerConfig, config_from_dict
from cudablocks.errors import CheckpointError, InvalidArgumentError, UnsupportedOperationError

__all__ = [
    "CONFIG_FILE",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX_FILE",
    "BnbQuantization",
    "ModelFiles",
    "layer_tensor_shapes",
]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"

_FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names
_NF4_STATE = "quant_state.bitsandbytes__nf4"


@dataclass(frozen=True)
class BnbQuantization:
    """A bitsandbytes 4-bit checkpoint's ``quantization_config`` (only NF4 is read).

    ``double_quant`` is ``bnb_4bit_use_double_quant``; ``compute_dtype`` is
    ``bnb_4bit_compute_dtype`` (None when absent); ``skip_modules`` (``llm_int8_skip_modules``)
    lists the modules left unquantized.
    """

    quant_type: str
    double_quant: bool
    compute_dtype: str | None
    skip_modules: tuple[str, ...]


class _Entry(NamedTuple):
    """Where a tensor lies and what it is, from the safetensors header (no data read)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def layer_tensor_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The float tensors of one decoder layer, named relative to the layer, and their shapes."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if config.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if config.o_proj_bias:
        shapes["self_attn.o_proj.bias"] = (h,)
    if config.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    return shapes


def _read_json(file: Path) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None


def _quantization(raw: Mapping[str, Any], file: Path) -> BnbQuantization | None:
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise CheckpointError(f"{file}: 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise UnsupportedOperationError(
            f"{file}: quant_method {method!r} is not supported; cudablocks reads bitsandbytes 4-bit (NF4) "
            "checkpoints and unquantized bf16/fp16/fp32 ones"
        )
    if q.get("load_in_8bit"):
        raise UnsupportedOperationError(f"{file}: bitsandbytes 8-bit checkpoints are not supported, only 4-bit NF4")
    if not q.get("load_in_4bit"):
        raise CheckpointError(f"{file}: a bitsandbytes quantization_config without load_in_4bit or load_in_8bit")
    quant_type = q.get("bnb_4bit_quant_type", "fp4")  # transformers' default when absent
    if quant_type != "nf4":
        raise UnsupportedOperationError(
            f"{file}: bnb_4bit_quant_type {quant_type!r} is not supported; cudablocks implements NF4 only"
        )
    return BnbQuantization(
        quant_type=quant_type,
        double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=q.get("bnb_4bit_compute_dtype"),
        skip_modules=tuple(q.get("llm_int8_skip_modules") or ()),
    )


def _read_header(file: Path) -> dict[str, _Entry]:
    try:
        with safetensors.safe_open(str(file), framework="numpy") as f:
            entries = {}
            for name in f.keys():
                part = f.get_slice(name)
                entries[name] = _Entry(file, part.get_dtype(), tuple(part.get_shape()))
            return entries
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def _scan_weights(path: Path) -> dict[str, _Entry]:
    """Every tensor of the directory's safetensors file(s), by name."""
    index_file = path / SAFETENSORS_INDEX_FILE
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, Mapping):
            raise CheckpointError(f"{index_file} has no 'weight_map' object")
        entries: dict[str, _Entry] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{index_file} lists the shard {shard!r}, which is missing from {path}")
            entries.update(_read_header(path / shard))
        for name, shard in weight_map.items():
            if name not in entries or entries[name].file.name != shard:
                raise CheckpointError(f"{index_file} puts {name!r} in {shard!r}, which does not hold it")
        return entries
    if (path / SAFETENSORS_FILE).is_file():
        return _read_header(path / SAFETENSORS_FILE)
    hint = ""
    if any((path / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        hint = (" (found pytorch_model.bin: cudablocks reads safetensors only; re-save the model with "
                "transformers' save_pretrained, which writes safetensors)")
    raise CheckpointError(f"no weights in {path}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}{hint}")


class ModelFiles:
    """A Hugging Face decoder model directory, opened for reading tensor by tensor.

    Make one with :meth:`open`. Names given to :meth:`tensor` and :meth:`has` are the names
    stored in the files; the other readers take care of the ``model.`` prefix. Every tensor read
    through :meth:`layer_weights`, :meth:`embedding`, :meth:`final_norm` and :meth:`score` is
    checked against the config (:class:`CheckpointError` naming the tensor and its file).
    """

    def __init__(self, path: Path, raw_config: dict[str, Any], config: TransformerConfig,
                 quantization: BnbQuantization | None, entries: dict[str, _Entry], prefix: str) -> None:
        self._path = path
        self._raw_config = raw_config
        self._config = config
        self._quantization = quantization
        self._entries = entries
        self._prefix = prefix

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelFiles:
        """Opens the model directory ``path``: reads config.json and the safetensors headers.

        Raises CheckpointError for a missing or unreadable config.json or weights file (naming
        it), UnsupportedOperationError for a model_type or quantization cudablocks does not
        implement, InvalidArgumentError for a config missing a size it needs.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model directory {path} does not exist (or is not a directory)")
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f"no {CONFIG_FILE} in {path}: a Hugging Face model directory needs one")
        raw = _read_json(config_file)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_file} must hold a JSON object")
        try:
            config = config_from_dict(raw)
        except (InvalidArgumentError, UnsupportedOperationError) as e:
            # Same class as config_from_dict's own error, with the file it came from.
            raise type(e)(f"{config_file}: {e}") from None
        quantization = _quantization(raw, config_file)
        entries = _scan_weights(path)
        if "model.embed_tokens.weight" in entries:
            prefix = "model."
        elif "embed_tokens.weight" in entries:
            prefix = ""
        else:
            raise CheckpointError(f"the weights in {path} have no embedding (model.embed_tokens.weight)")
        return cls(path, raw, config, quantization, entries, prefix)

    @property
    def path(self) -> Path:
        """The model directory."""
        return self._path

    @property
    def config(self) -> TransformerConfig:
        """The decoder's configuration, from config.json."""
        return self._config

    @property
    def raw_config(self) -> dict[str, Any]:
        """config.json as parsed (a copy)."""
        return copy.deepcopy(self._raw_config)

    @property
    def quantization(self) -> BnbQuantization | None:
        """The bitsandbytes 4-bit quantization of the checkpoint, or None for float weights."""
        return self._quantization

    def tensor_names(self) -> list[str]:
        """Every stored tensor name, sorted."""
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        """Whether the files hold a tensor of this (stored) name."""
        return name in self._entries

    def tensor(self, name: str) -> np.ndarray:
        """The tensor of this stored name, as stored (bf16 as ``ml_dtypes.bfloat16``)."""
        return self._read([name])[name]

    def layer_weights(self, index: int) -> dict[str, np.ndarray]:
        """Decoder layer ``index``'s weights, named relative to the layer ("self_attn.q_proj.weight").

        Float tensors come as float32; the projections of a bitsandbytes 4-bit checkpoint come as
        their bitsandbytes entries ("self_attn.q_proj.weight" packed uint8,
        "self_attn.q_proj.weight.absmax", ...), as :meth:`cudablocks.CudaBlock.nf4` takes them.
        """
        layers = self._config.num_hidden_layers
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < layers:
            raise InvalidArgumentError(f"layer index must be an int in [0, {layers}), got {index!r}")
        base = f"{self._prefix}layers.{index}."
        floats: dict[str, tuple[int, ...]] = {}
        quantized: list[str] = []
        for rel, shape in layer_tensor_shapes(self._config).items():
            name = base + rel
            if self._quantization is not None and self._is_quantized(name, shape):
                quantized += [n for n in self._entries if n == name or n.startswith(f"{name}.")]
            else:
                floats[name] = shape
        for name, shape in floats.items():
            self._check(name, shape)
        arrays = self._read([*floats, *quantized])
        return {name[len(base):]: (self._float32(name, a) if name in floats else a) for name, a in arrays.items()}

    def embedding(self, dtype: str = "float32") -> np.ndarray:
        """The token embedding ``[vocab_size, hidden_size]`` as float32, or as ``ml_dtypes.bfloat16``
        with ``dtype="bfloat16"`` (read as it is from a bf16 file, rounded to nearest otherwise)."""
        if dtype not in ("float32", "bfloat16"):
            raise InvalidArgumentError(f"embedding dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        name = f"{self._prefix}embed_tokens.weight"
        self._check(name, (self._config.vocab_size, self._config.hidden_size))
        a = self.tensor(name)
        if dtype == "float32":
            return self._float32(name, a)
        return a if a.dtype == ml_dtypes.bfloat16 else a.astype(ml_dtypes.bfloat16)

    def embedding_dtype(self) -> str:
        """The :meth:`embedding` dtype that keeps the stored values exactly at the least memory:
        "bfloat16" for a bf16 file, else "float32"."""
        name = f"{self._prefix}embed_tokens.weight"
        return "bfloat16" if self._entries[name].dtype == "BF16" else "float32"

    def final_norm(self) -> np.ndarray:
        """The final RMSNorm weight ``[hidden_size]``, float32."""
        name = f"{self._prefix}norm.weight"
        self._check(name, (self._config.hidden_size,))
        return self._float32(name, self.tensor(name))

    def score(self) -> np.ndarray | None:
        """The classification head ``score.weight`` ``[num_labels, hidden_size]`` as float32, or
        None when the checkpoint has none (a base or causal-LM model)."""
        if not self.has("score.weight"):
            return None
        entry = self._entries["score.weight"]
        labels = self._raw_config.get("id2label")
        rows = len(labels) if isinstance(labels, Mapping) else entry.shape[0]
        self._check("score.weight", (rows, self._config.hidden_size))
        return self._float32("score.weight", self.tensor("score.weight"))

    def _is_quantized(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether ``name`` is stored in bitsandbytes 4-bit form; checks its quant state's shape."""
        states = [n for n in self._entries if n.startswith(f"{name}.quant_state.")]
        if not states:
            return False
        if states != [f"{name}.{_NF4_STATE}"]:
            raise UnsupportedOperationError(
                f"{self._entries[states[0]].file}: {states[0]!r} is not an NF4 quant state; only NF4 is supported"
            )
        state_name = states[0]
        raw = self.tensor(state_name)
        try:
            state = json.loads(bytes(raw.astype(np.uint8).ravel()).decode("utf-8"))
            stored = tuple(int(s) for s in state["shape"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self._entries[state_name].file}: {state_name!r} is not a readable "
                                  f"bitsandbytes quant state ({e})") from None
        if stored != shape:
            raise CheckpointError(f"{self._entries[state_name].file}: tensor {name!r} has shape {list(stored)} "
                                  f"(in its quant state), but {CONFIG_FILE} needs {list(shape)}")
        return True

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"the weights in {self._path} have no tensor {name!r}")
        if entry.shape != shape:
            raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, but "
                                  f"{CONFIG_FILE} needs {list(shape)}")

    def _float32(self, name: str, a: np.ndarray) -> np.ndarray:
        entry = self._entries[name]
        if entry.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{entry.file}: tensor {name!r} is {entry.dtype}, expected one of {_FLOAT_DTYPES}")
        return a.astype(np.float32, copy=False)

    def _read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The named tensors, opening each file once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._entries:
                raise CheckpointError(f"the weights in {self._path} have no tensor {name!r}")
            by_file.setdefault(self._entries[name].file, []).append(name)
        out: dict[str, np.ndarray] = {}
        for file, in_file in by_file.items():
            try:
                with safetensors.safe_open(str(file), framework="numpy") as f:
                    for name in in_file:
                        out[name] = f.get_tensor(name)
            except (OSError, safetensors.SafetensorError) as e:
                raise CheckpointError(f"cannot read {file}: {e}") from None
        return out
