"""Writing checkpoints that Hugging Face ``transformers`` and ``peft`` load as they are.

* :func:`save_peft_adapter`: a PEFT LoRA adapter for sequence classification
  (``adapter_config.json``, ``adapter_model.safetensors``), with the trained ``score`` head.
  ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), dir)``
  loads it.
* :func:`export_classifier`: a complete ``<Arch>ForSequenceClassification`` directory
  (``config.json``, safetensors shards with their index, tokenizer files) for
  ``AutoModelForSequenceClassification.from_pretrained(dir)``.
* :func:`merge_lora`: folds LoRA adapters into the projections, for the full export.
* :func:`export_model` / :func:`export_run` (``cudablocks classify export``): a trained
  checkpoint as a full classifier, with the weights its blocks computed with.

Both directories also get ``label_map.json`` (the ``id2label`` / ``label2id`` of the labels), so
that a checkpoint of either kind tells which class each output is. Both are written through
:func:`~cudablocks.classify.atomic.atomic_directory`: an existing checkpoint is replaced only
once the new one is complete on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from cudablocks import nf4
from cudablocks.classify.atomic import atomic_directory
from cudablocks.classify.checkpoint import Checkpoint, is_checkpoint, read_checkpoint
from cudablocks.classify.loading import NF4_BLOCKSIZE, layer_tensors
from cudablocks.classify.settings import TrainSettings
from cudablocks.classify.weights import CONFIG_FILE, SAFETENSORS_INDEX_FILE, ModelFiles, layer_tensor_shapes
from cudablocks.config import config_from_dict
from cudablocks.errors import CheckpointError, DtypeError, InvalidArgumentError, ShapeError
from cudablocks.lora import LoraConfig

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "LABEL_MAP_FILE",
    "TOKENIZER_FILES",
    "export_classifier",
    "export_model",
    "export_run",
    "merge_lora",
    "save_peft_adapter",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LABEL_MAP_FILE = "label_map.json"
#: The tokenizer files copied into a full export when they exist; tokenizer.json must.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")

_ARCHITECTURES = {
    "qwen3": "Qwen3ForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}
# The dtypes a checkpoint may be written in, and safetensors' name of each.
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# PEFT saves a model wrapped as PeftModel -> LoraModel -> the transformers model.
_PEFT_PREFIX = "base_model.model."


def _save(path: Path, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """One safetensors file (transformers requires the "pt" format tag); returns its data bytes."""
    items = dict(tensors)
    save_file(items, str(path), metadata={"format": "pt"})
    return sum(a.nbytes for a in items.values())


def _as(a: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """``a`` as a C-ordered array of ``dtype`` (bfloat16: rounded to nearest even, as torch does)."""
    a = np.asarray(a)
    if a.dtype not in _DTYPES.values():
        raise DtypeError(f"{name} must be a float32, bfloat16 or float16 array, got {a.dtype}")
    return np.ascontiguousarray(a.astype(_DTYPES[dtype], copy=False))


def _check_shape(a: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(a.shape) != shape:
        raise ShapeError(f"{name} has shape {list(a.shape)}, expected {list(shape)}")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def merge_lora(weights: Mapping[str, np.ndarray], lora_weights: Mapping[str, np.ndarray],
               scale: float) -> dict[str, np.ndarray]:
    """A layer's weights with the adapters folded in: ``W + scale * B @ A`` for each adapted projection.

    ``weights`` are named relative to the layer ("self_attn.q_proj.weight"), ``lora_weights`` as
    PEFT names them ("self_attn.q_proj.lora_A.weight", "...lora_B.weight"); ``scale`` is
    :attr:`cudablocks.LoraConfig.scale`. Computed in float64 and rounded once to float32; the other
    entries are passed through unchanged.
    """
    suffixes = (".lora_A.weight", ".lora_B.weight")  # of the same length
    unexpected = [k for k in lora_weights if not k.endswith(suffixes)]
    if unexpected:
        raise InvalidArgumentError(f"not LoRA tensor names (expected '<module>.lora_A.weight' / "
                                   f"'<module>.lora_B.weight'): {sorted(unexpected)}")
    merged = dict(weights)
    for module in sorted({k[: -len(suffixes[0])] for k in lora_weights}):
        a_name, b_name, w_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.weight"
        for name in (a_name, b_name):
            if name not in lora_weights:
                raise InvalidArgumentError(f"LoRA weights have {module!r} adapters but no {name!r}")
        if w_name not in weights:
            raise InvalidArgumentError(f"LoRA weights adapt {module!r}, but the layer has no {w_name!r}")
        a, b, w = (np.asarray(x, dtype=np.float64)
                   for x in (lora_weights[a_name], lora_weights[b_name], weights[w_name]))
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or w.shape != (b.shape[0], a.shape[1]):
            raise ShapeError(f"{module}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} does not match the "
                             f"weight {list(w.shape)}")
        merged[w_name] = (w + scale * (b @ a)).astype(np.float32)
    return merged


def _label_map(label_map_json: Mapping[str, Any], num_labels: int) -> dict[str, Any]:
    """``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}``, checked against the head's rows."""
    id2label = label_map_json.get("id2label")
    label2id = label_map_json.get("label2id")
    if not isinstance(id2label, Mapping) or not isinstance(label2id, Mapping):
        raise InvalidArgumentError("label_map_json must hold 'id2label' and 'label2id' objects")
    id2label = {str(k): v for k, v in id2label.items()}
    if set(id2label) != {str(i) for i in range(num_labels)}:
        raise InvalidArgumentError(f"id2label must name the labels 0..{num_labels - 1} of the score head, "
                                   f"got keys {sorted(id2label)}")
    inverse = {name: int(i) for i, name in id2label.items()}
    if {str(k): int(v) for k, v in label2id.items()} != inverse:
        raise InvalidArgumentError(f"label2id {dict(label2id)} is not the inverse of id2label {id2label}")
    return {"id2label": id2label, "label2id": inverse}


def save_peft_adapter(
    directory: str | os.PathLike[str],
    *,
    lora_weights: Mapping[int, Mapping[str, np.ndarray]],
    lora: LoraConfig,
    score_weight: np.ndarray,
    base_model: str,
    label_map_json: Mapping[str, Any] | None,
) -> None:
    """Writes a PEFT LoRA adapter for sequence classification to ``directory`` (atomically).

    ``lora_weights`` maps a layer index to that layer's adapters named as PEFT names them relative
    to the layer ("self_attn.q_proj.lora_A.weight"), as :meth:`CudaBlock.download_lora_weights`
    returns them; ``score_weight`` is the head ``[num_labels, hidden]``; ``base_model`` goes to
    ``base_model_name_or_path``. The adapter is stored in float32 with the key names peft writes
    (``base_model.model.model.layers.<i>.<...>``, ``base_model.model.score.weight``).
    """
    score = _as(score_weight, "float32", "score_weight")
    if score.ndim != 2:
        raise ShapeError(f"score_weight must be [num_labels, hidden], got shape {list(score.shape)}")
    tensors: list[tuple[str, np.ndarray]] = []
    for layer in sorted(lora_weights):
        for rel, a in sorted(lora_weights[layer].items()):
            if not rel.endswith((".lora_A.weight", ".lora_B.weight")):
                raise InvalidArgumentError(f"layer {layer}: {rel!r} is not a LoRA tensor name "
                                           "('<module>.lora_A.weight' or '<module>.lora_B.weight')")
            tensors.append((f"{_PEFT_PREFIX}model.layers.{layer}.{rel}", _as(a, "float32", rel)))
    tensors.append((f"{_PEFT_PREFIX}score.weight", score))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets),
        "use_rslora": lora.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # What peft writes for SEQ_CLS: the head is trained in full, under either common name.
        "modules_to_save": ["classifier", "score"],
    }
    labels = None if label_map_json is None else _label_map(label_map_json, score.shape[0])
    with atomic_directory(directory) as tmp:
        _save(tmp / ADAPTER_WEIGHTS_FILE, tensors)
        _write_json(tmp / ADAPTER_CONFIG_FILE, adapter_config)
        if labels is not None:
            _write_json(tmp / LABEL_MAP_FILE, labels)


def export_classifier(
    directory: str | os.PathLike[str],
    *,
    config_dict: Mapping[str, Any],
    layers: Iterable[tuple[int, Mapping[str, np.ndarray]]],
    embedding: np.ndarray,
    final_norm: np.ndarray,
    score_weight: np.ndarray,
    label_map_json: Mapping[str, Any],
    dtype: str = "float32",
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Writes a complete ``<Arch>ForSequenceClassification`` model to ``directory`` (atomically).

    ``config_dict`` is the base model's config.json; the written one adds ``architectures``,
    ``num_labels``, ``id2label``/``label2id`` (from ``label_map_json``) and the dtype, keeps
    ``pad_token_id`` and drops any ``quantization_config`` (the weights written are floats).
    ``layers`` yields ``(index, weights)`` for every layer, weights named relative to the layer
    with LoRA already merged (:func:`merge_lora`); each is converted to ``dtype`` ("float32",
    "bfloat16" or "float16") and written to its own shard as it arrives, so memory holds about
    one layer (and the embedding) at a time. The
    tokenizer files of ``tokenizer_dir`` (:data:`TOKENIZER_FILES`) are copied when it is given.
    """
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"export dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    cfg = config_from_dict(config_dict)
    h = cfg.hidden_size

    embedding = _as(embedding, dtype, "embedding")
    _check_shape(embedding, (cfg.vocab_size, h), "embedding")
    final_norm = _as(final_norm, dtype, "final_norm")
    _check_shape(final_norm, (h,), "final_norm")
    score = _as(score_weight, dtype, "score_weight")
    if score.ndim != 2 or score.shape[1] != h:
        raise ShapeError(f"score_weight must be [num_labels, {h}], got shape {list(score.shape)}")
    labels = _label_map(label_map_json, score.shape[0])
    config = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    config.update(
        model_type=cfg.model_type,
        architectures=[_ARCHITECTURES[cfg.model_type]],
        num_labels=score.shape[0],
        torch_dtype=dtype,  # the key transformers 4 reads
        dtype=dtype,  # and the one transformers 5 reads
        **labels,
    )
    tokenizer_files: list[Path] = []
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"no tokenizer.json in {tokenizer_dir}")
        tokenizer_files = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]

    # One shard per layer (plus one for the rest), so memory holds one layer at a time.
    n_shards = cfg.num_hidden_layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def shard(k: int, tensors: list[tuple[str, np.ndarray]]) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        total += _save(tmp / name, tensors)
        weight_map.update({t: name for t, _ in tensors})

    expected = layer_tensor_shapes(cfg)
    seen: set[int] = set()
    with atomic_directory(directory) as tmp:
        shard(1, [("model.embed_tokens.weight", embedding), ("model.norm.weight", final_norm), ("score.weight", score)])
        for index, weights in layers:
            if index in seen or not 0 <= index < cfg.num_hidden_layers:
                raise InvalidArgumentError(f"layer index {index} repeated or outside [0, {cfg.num_hidden_layers})")
            seen.add(index)
            if set(weights) != set(expected):
                raise InvalidArgumentError(
                    f"layer {index}: missing {sorted(set(expected) - set(weights))}, unexpected "
                    f"{sorted(set(weights) - set(expected))} (merge LoRA adapters with merge_lora first)"
                )
            tensors = []
            for rel, shape in expected.items():
                a = _as(weights[rel], dtype, f"layer {index} {rel}")
                _check_shape(a, shape, f"layer {index} {rel}")
                tensors.append((f"model.layers.{index}.{rel}", a))
            shard(len(seen) + 1, tensors)
        if len(seen) != cfg.num_hidden_layers:
            missing = sorted(set(range(cfg.num_hidden_layers)) - seen)
            raise InvalidArgumentError(f"export_classifier got no weights for layers {missing}")
        _write_json(tmp / SAFETENSORS_INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / LABEL_MAP_FILE, labels)
        for file in tokenizer_files:
            shutil.copyfile(file, tmp / file.name)


# ---- a trained checkpoint as a full classifier -------------------------------------------------

def _nf4_round_trip(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The projection weights as the NF4 blocks compute with them (quantized as the blocks do)."""
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith("_proj.weight"):
            out[name] = nf4.dequantize(nf4.quantize(w, NF4_BLOCKSIZE), "float32").to_numpy()
    return out


def _dequantized(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A layer of a bitsandbytes 4-bit checkpoint with its projections dequantized to float32 (the
    values its NF4 blocks compute with) and the bitsandbytes entries dropped."""
    out = {name: w for name, w in weights.items() if not name.endswith("_proj.weight") and "_proj.weight." not in name}
    for name in weights:
        if name.endswith("_proj.weight"):
            t = nf4.Nf4Tensor.from_bnb_state_dict(weights, name[: -len("weight")])
            out[name] = nf4.dequantize(t, "float32").to_numpy()
    return out


def export_model(ckpt: Checkpoint, files: ModelFiles, directory: Path, lora: LoraConfig | None,
                 dtype: str = "float32") -> None:
    """A full ``...ForSequenceClassification`` directory of a checkpoint, in ``dtype``. Where the
    blocks were NF4 (lora mode, or a 4-bit checkpoint) the projections are the dequantized weights
    with the adapters merged, so the export computes what the trained model computed."""
    cfg = files.config
    quantized = files.quantization is not None

    def layers() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(cfg.num_hidden_layers):
            weights = files.layer_weights(i)
            ours = layer_tensors(ckpt.trainable, i)
            if quantized:
                weights = _dequantized(weights)
            elif lora is not None:
                weights = _nf4_round_trip(weights)
            if lora is not None:
                weights = merge_lora(weights, ours, lora.scale)
            else:
                weights.update(ours)
            yield i, weights

    config = files.raw_config
    config.pop("quantization_config", None)
    export_classifier(directory, config_dict=config, layers=layers(),
                      embedding=ckpt.trainable.get("model.embed_tokens.weight", files.embedding("float32")),
                      final_norm=ckpt.trainable.get("model.norm.weight", files.final_norm()),
                      score_weight=ckpt.trainable["score.weight"], label_map_json=ckpt.label_map,
                      dtype=dtype, tokenizer_dir=files.path)


def export_run(run: str | Path, directory: str | Path, dtype: str = "float32") -> Path:
    """``cudablocks classify export``: a full classifier directory from a run's best checkpoint
    (or from a checkpoint directory itself)."""
    run = Path(run)
    ckpt_dir = run / "best" if is_checkpoint(run / "best") else run
    if not is_checkpoint(ckpt_dir):
        raise CheckpointError(f"{run} is neither a classify run directory nor a checkpoint")
    ckpt = read_checkpoint(ckpt_dir, optimizer=False)
    s = TrainSettings(**ckpt.settings)
    export_model(ckpt, ModelFiles.open(s.model_dir()), Path(directory), s.lora_config(), dtype)
    return Path(directory)
