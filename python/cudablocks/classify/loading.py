"""Putting a classifier on a device: the device choice, the head's initialisation, and the
model files read layer by layer into blocks (with a checkpoint's trained tensors in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import cudablocks
from cudablocks._core import BlockArena, CudaBlock, CudaStream, Device
from cudablocks.classify.model import LAYER_PREFIX, Classifier, Mode, Pooling
from cudablocks.classify.weights import ModelFiles
from cudablocks.errors import InvalidArgumentError
from cudablocks.lora import LoraConfig

__all__ = ["NF4_BLOCKSIZE", "build_classifier", "init_score", "layer_tensors", "progress_bar", "resolve_device"]

#: The block size NF4 blocks quantize float weights with (bitsandbytes' default).
NF4_BLOCKSIZE = 64


def resolve_device(spec: str) -> Device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return Device("cuda:0" if cudablocks.cuda_device_count() > 0 else "cpu")
    return Device(spec)


def progress_bar(items: Any, enabled: bool, desc: str, total: int | None = None, initial: int = 0) -> Any:
    """A tqdm bar over ``items`` (or of ``total`` steps), or ``items`` itself when disabled."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, initial=initial, dynamic_ncols=True, leave=False)


def init_score(num_labels: int, hidden: int, files: ModelFiles, seed: int) -> np.ndarray:
    """transformers' init of the ``score`` Linear: normal(0, initializer_range), seeded here."""
    std = float(files.raw_config.get("initializer_range", 0.02))
    return np.random.default_rng([seed, 1]).normal(0.0, std, (num_labels, hidden)).astype(np.float32)


def layer_tensors(trainable: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """The tensors of decoder layer ``layer`` in a state dict, named relative to the layer."""
    prefix = LAYER_PREFIX.format(layer)
    return {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)}


def build_classifier(
    files: ModelFiles,
    *,
    mode: Mode,
    num_labels: int,
    device: Device,
    stream: CudaStream,
    max_tokens: int,
    precision: str,
    pooling: Pooling,
    lora: LoraConfig | None,
    train_embedding: bool,
    seed: int,
    class_weights: np.ndarray | None = None,
    trained: dict[str, np.ndarray] | None = None,
    progress: bool = False,
    recompute: bool = False,
    trainable: bool = True,
) -> Classifier:
    """The model of ``files`` on ``device``, one layer at a time (host memory peaks near one
    layer). ``trained`` holds tensors of a checkpoint that replace the files' (and LoRA's init).
    The blocks share one arena for their transient memory and, with ``recompute``, their saved
    activations too (see :class:`Classifier`)."""
    cfg = files.config
    trained = trained or {}
    blocks: list[CudaBlock] = []
    memory: dict[str, Any] = dict(arena=BlockArena(device), share_activations=recompute)
    quantized = files.quantization is not None
    if quantized and mode is Mode.FULL:
        raise InvalidArgumentError(f"{files.path} is a 4-bit checkpoint: full mode needs float weights; use --mode lora or head")
    layers = range(cfg.num_hidden_layers)
    for i in progress_bar(layers, progress, "loading layers"):
        weights = files.layer_weights(i)
        ours = layer_tensors(trained, i)
        if mode is Mode.LORA or (mode is Mode.HEAD and quantized):
            compute = "fp32" if precision == "fp32" else precision
            block = CudaBlock.nf4(cfg, i, weights, device, max_tokens, lora=lora, compute=compute, **memory)
            lora_part = {k: v for k, v in ours.items() if ".lora_" in k}
            if lora_part:
                block.upload_lora_weights(lora_part, stream)
        else:
            weights.update(ours)
            block = CudaBlock.fp32(cfg, i, weights, device, max_tokens, precision=precision, **memory)
        blocks.append(block)
        del weights
    emb_name, norm_name = "model.embed_tokens.weight", "model.norm.weight"
    if emb_name in trained:
        embedding = trained[emb_name]
    else:
        embedding = files.embedding("float32" if train_embedding else files.embedding_dtype())
    final_norm = trained.get(norm_name, files.final_norm())
    if "score.weight" in trained:
        score = trained["score.weight"]
    else:
        existing = files.score()
        score = existing if existing is not None and existing.shape[0] == num_labels else init_score(
            num_labels, cfg.hidden_size, files, seed)
    return Classifier(blocks, embedding, final_norm, score, mode=mode, pooling=pooling, eps=cfg.rms_norm_eps,
                      device=device, stream=stream, train_embedding=train_embedding, class_weights=class_weights,
                      recompute=recompute, trainable=trainable)
