"""The whole classify training step at Qwen3-4B size (random weights, 2 labels, 8 x 512 tokens):

* lora mode: 36 NF4 layers with LoRA r=16, alpha=32 on q_proj, v_proj, bf16 compute, against
  transformers + peft + bitsandbytes QLoRA (Linear4bit nf4, bf16 compute) with torch.optim.AdamW;
* full mode: as many layers as fit both stacks (8), embeddings trained, against transformers full
  fine-tuning with torch.optim.AdamW at its defaults, in fp32 and in bf16.

A step is forward + backward + optimizer step + reading the loss (ours synchronises once). Rows:
step ms, tokens/s and peak device memory (ours: cudablocks' allocator; theirs: torch's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import torch

import cudablocks as cb
from cudablocks.classify.model import Classifier, Mode, OptimizerHyper, Pooling
from harness import Row, time_ms

# Peak GPU memory of transformers + peft + bitsandbytes QLoRA with Liger Kernel's patches, Qwen3-4B at
# 8x512 (shared/anchors.md): the memory budget of our lora mode.
LIGER_QLORA_PEAK_GB = 18.0

QWEN3_4B = dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, rms_norm_eps=1e-6, rope_theta=1_000_000.0, vocab_size=151936,
                max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
            rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=512, max_position_embeddings=256,
            tie_word_embeddings=True)


def _hf_config(dims: dict[str, Any], layers: int) -> Any:
    import transformers

    return transformers.Qwen3Config(**dims, num_hidden_layers=layers, num_labels=2, pad_token_id=0)


def _layer_weights(hf_config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One layer's random weights (HF names): projections ~N(0, 0.02), norms ~1 + N(0, 0.1)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3DecoderLayer(hf_config, layer_idx=0).state_dict().items()}
    return {k: ((1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)) if "norm" in k
                else 0.02 * rng.standard_normal(s, dtype=np.float32)).astype(np.float32) for k, s in shapes.items()}


def _batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    ids = rng.integers(1, vocab, batch * seq).astype(np.int32)
    cu = (np.arange(batch + 1) * seq).astype(np.int32)
    labels = rng.integers(0, 2, batch).astype(np.int32)
    return ids, [seq] * batch, cu, labels


def _ours(device: str, stream: cb.CudaStream, hf_config: Any, weights: dict[str, np.ndarray], mode: Mode,
          layers: int, tokens: int, precision: str, rng: np.random.Generator, recompute: bool) -> Classifier:
    """Our classifier as the pipeline builds it: blocks sharing one arena (and, with recompute,
    their saved activations)."""
    cfg = cb.TransformerConfig.from_dict(hf_config.to_dict())
    V, H = cfg.vocab_size, cfg.hidden_size
    memory = dict(arena=cb.BlockArena(device), share_activations=recompute)
    blocks = []
    for i in range(layers):
        if mode is Mode.LORA:
            lora = cb.LoraConfig(rank=16, alpha=32, targets=("q_proj", "v_proj"))
            blocks.append(cb.CudaBlock.nf4(cfg, i, weights, device, tokens, lora=lora, compute=precision, **memory))
        else:
            blocks.append(cb.CudaBlock.fp32(cfg, i, weights, device, tokens, precision=precision, **memory))
    embedding = (0.02 * rng.standard_normal((V, H), dtype=np.float32))
    if mode is Mode.LORA:
        embedding = embedding.astype(ml_dtypes.bfloat16)  # frozen: kept as the checkpoint stores it
    score = (0.02 * rng.standard_normal((2, H), dtype=np.float32)).astype(np.float32)
    return Classifier(blocks, embedding, np.ones(H, np.float32), score, mode=mode, pooling=Pooling.LAST,
                      eps=cfg.rms_norm_eps, device=cb.Device(device), stream=stream,
                      train_embedding=mode is Mode.FULL, recompute=recompute)


def _our_step(model: Classifier, batch: tuple[np.ndarray, list[int], np.ndarray, np.ndarray], step: list[int]) -> None:
    ids, lens, cu, labels = batch
    model.zero_grad()
    model.forward(ids, lens, cu, labels, train=True, grad_scale=1.0 / len(lens))
    model.backward(lens, _emb_index(model, ids))
    step[0] += 1
    model.optimizer_step(step[0], OptimizerHyper(lr=1e-5, max_grad_norm=1.0))
    model.loss_value()


def _emb_index(model: Classifier, ids: np.ndarray) -> Any:
    return cb.ops.embedding_backward_index(ids) if model.embedding is not None else None


def nf4_linears(layer: Any, bnb: Any, device: str) -> None:
    """Replaces the projections of a transformers decoder layer by bitsandbytes Linear4bit (nf4, bf16
    compute), quantized from their weights as transformers' 4-bit loading does."""
    for parent in (layer.self_attn, layer.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))


def _hf_qlora(hf_config: Any, device: str) -> tuple[Any, Any] | None:
    """transformers' Qwen3ForSequenceClassification with bitsandbytes NF4 projections (bf16
    compute) and peft LoRA r=16 alpha=32 on q_proj, v_proj; None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError:
        return None
    import transformers

    with torch.device(device):
        model = transformers.Qwen3ForSequenceClassification(hf_config).to(torch.bfloat16)
    for layer in model.model.layers:
        nf4_linears(layer, bnb, device)
    torch.cuda.empty_cache()
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


def _hf_full(hf_config: Any, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    import transformers

    with torch.device(device):
        model = transformers.Qwen3ForSequenceClassification(hf_config).to(dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def _hf_step(model: Any, opt: Any, ids: torch.Tensor, labels: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    float(out.loss)


def classify(device: str, quick: bool) -> Iterator[Row]:
    """Training steps of the whole classifier, ours against the transformers stacks."""
    from suites import block_flops, share_of_ceiling  # here: suites imports this module

    cpu = device == "cpu"
    dims = TINY if cpu else QWEN3_4B
    batch, seq = (2, 16) if cpu else (8, 512)
    tokens = batch * seq
    rng = np.random.default_rng(0)
    repeats, warmup = (3, 1) if cpu else ((5, 2) if quick else (10, 3))
    stream = cb.CudaStream("cpu") if cpu else cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream)
    data = _batch(rng, batch, seq, dims["vocab_size"])
    t_ids = torch.from_numpy(data[0].astype(np.int64)).view(batch, seq).to(device)
    t_labels = torch.from_numpy(data[3].astype(np.int64)).to(device)

    def measure_ours(mode: Mode, layers: int, precision: str, recompute: bool = False) -> tuple[float, float]:
        hf_config = _hf_config(dims, layers)
        weights = _layer_weights(hf_config, rng)
        cb.reset_peak_memory(device)
        model = _ours(device, stream, hf_config, weights, mode, layers, tokens, precision, rng, recompute)
        step = [0]
        ms = time_ms(lambda: _our_step(model, data, step), device, repeats=repeats, warmup=warmup)
        peak = cb.memory_stats(device).peak_bytes / 1e9
        del model
        return ms, peak

    def measure_hf(build: Any) -> tuple[float | None, float | None]:
        if cpu:
            return None, None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        built = build()
        if built is None:
            return None, None
        model, opt = built
        ms = time_ms(lambda: _hf_step(model, opt, t_ids, t_labels), device, repeats=repeats, warmup=warmup)
        peak = torch.cuda.max_memory_allocated() / 1e9
        del model, opt, built
        torch.cuda.empty_cache()
        return ms, peak

    shape = f"{batch}x{seq}"
    seq_lens = data[1]

    def step_share(backward: str, layers: int, precision: str, ms: float) -> dict[str, Any]:
        # A step's useful FLOPs: the layers' forward and backward (embedding lookup and the 2-label head are
        # negligible); recompute's second forward is not useful work, so the same count serves it.
        return share_of_ceiling(precision, layers * block_flops(dims, seq_lens, backward=backward) / ms / 1e9)

    # lora mode, 36 layers (4 on the CPU).
    layers = 4 if cpu else 36
    hf_ms, hf_gb = measure_hf(lambda: _hf_qlora(_hf_config(dims, layers), device))
    anchor = "transformers + peft + bitsandbytes QLoRA"
    for recompute in (False, True):
        precision = "fp32" if cpu else "bf16"
        ours_ms, ours_gb = measure_ours(Mode.LORA, layers, precision, recompute)
        how = ", recompute" if recompute else ""
        # Frozen NF4 weights: the backward computes input gradients only (LoRA's small products left out).
        yield Row(f"classify lora step, {layers} NF4 layers, {shape}{how}", "tokens/s", tokens / ours_ms * 1e3,
                  anchor=tokens / hf_ms * 1e3 if hf_ms else None, anchor_name=anchor, target=2.5,
                  **step_share("input", layers, precision, ours_ms))
        yield Row(f"classify lora peak memory, {layers} layers, {shape}{how}", "GB", ours_gb, anchor=hf_gb,
                  anchor_name=anchor, limit=None if cpu else LIGER_QLORA_PEAK_GB,
                  note="limit: the peak of that stack with Liger Kernel's patches (shared/anchors.md)")
    # full mode, 8 layers (2 on the CPU), embeddings trained, fp32 and bf16.
    layers = 2 if cpu else 8
    for precision, dtype, target in (("fp32", torch.float32, 1.2), ("bf16", torch.bfloat16, 1.6)):
        if cpu and precision == "bf16":
            continue
        ours_ms, ours_gb = measure_ours(Mode.FULL, layers, precision)
        hf_ms, hf_gb = measure_hf(lambda: _hf_full(_hf_config(dims, layers), device, dtype))
        note = ("ours: fp32 master weights and AdamW, bf16 GEMM operands; transformers: bf16 weights and AdamW"
                if precision == "bf16" else "")
        yield Row(f"classify full {precision} step, {layers} layers, {shape}", "tokens/s", tokens / ours_ms * 1e3,
                  anchor=tokens / hf_ms * 1e3 if hf_ms else None, anchor_name="transformers + torch AdamW",
                  target=target, note=note, **step_share("full", layers, precision, ours_ms))
        yield Row(f"classify full {precision} peak memory, {layers} layers", "GB", ours_gb, anchor=hf_gb,
                  anchor_name="transformers + torch AdamW")
