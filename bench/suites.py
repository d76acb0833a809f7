"""The benchmark suites. Each takes (device, quick) and yields Rows; SUITES lists them in order."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

import cudablocks as cb
from harness import Row, time_ms
from suite_classify import classify, nf4_linears

# Rates measured by `ceilings` in this process, keyed by (name, size), for suites that compare with them.
MEASURED_TFLOPS: dict[tuple[str, int], float] = {}


def share_of_ceiling(kind: str, rate: float | None) -> dict[str, Any]:
    """Row fields (share, share_of) placing `rate` against this run's measured ceiling: kind "copy" for a
    rate in TB/s, or "fp32"/"tf32"/"bf16" for a rate in TFLOP/s against that GEMM (its largest size
    measured). Empty where the ceiling is unknown (on the CPU, or with --only and no `ceilings`)."""
    if kind == "copy":
        ceiling, label = MEASURED_TFLOPS.get(("copy TB/s", 0)), "copy bandwidth"
    else:
        sizes = [size for name, size in MEASURED_TFLOPS if name == kind]
        ceiling, label = (MEASURED_TFLOPS[(kind, max(sizes))] if sizes else None), f"{kind} GEMM"
    if not rate or not ceiling:
        return {}
    return {"share": rate / ceiling, "share_of": label}


def ceilings(device: str, quick: bool) -> Iterator[Row]:
    """The card's measured limits: copy bandwidth and GEMM rates (torch/cuBLAS)."""
    if device == "cpu":
        return
    n = 1 << 28  # 1 GiB of float32: far past L2
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, repeats=20)
    MEASURED_TFLOPS[("copy TB/s", 0)] = 2 * a.numel() * 4 / ms / 1e9
    yield Row("copy bandwidth (read + write)", "TB/s", MEASURED_TFLOPS[("copy TB/s", 0)])
    size = 4096 if quick else 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
        x = torch.randn(size, size, device=device).to(dtype)
        y = torch.randn(size, size, device=device).to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = time_ms(lambda: x @ y, device, repeats=10 if name == "fp32" else 20)
        torch.backends.cuda.matmul.allow_tf32 = False
        MEASURED_TFLOPS[(name, size)] = 2 * size**3 / ms / 1e9
        yield Row(f"GEMM {name} {size}^3", "TFLOP/s", MEASURED_TFLOPS[(name, size)])


def rmsnorm(device: str, quick: bool) -> Iterator[Row]:
    """RMSNorm forward on [T, 2560] against torch's fused rms_norm, in GB/s of required traffic."""
    rows, cols = (64, 256) if device == "cpu" else (8 * 512, 2560)
    rng = np.random.default_rng()
    sets = 1 if device == "cpu" else 8  # rotate: one set would sit in L2
    stream = cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream) if device != "cpu" else cb.CudaStream("cpu")
    xs = [cb.GpuBuffer.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32), device, stream=stream) for _ in range(sets)]
    w = cb.GpuBuffer.from_numpy(rng.standard_normal(cols).astype(np.float32), device, stream=stream)
    out = cb.GpuBuffer.empty((rows, cols), "float32", device)
    state = {"i": 0}

    def ours() -> None:
        state["i"] = (state["i"] + 1) % sets
        cb.ops.rmsnorm_forward(xs[state["i"]], w, out, 1e-6, stream)

    txs = [torch.from_dlpack(x) for x in xs]
    tw = torch.from_dlpack(w)

    def theirs() -> None:
        state["i"] = (state["i"] + 1) % sets
        torch.nn.functional.rms_norm(txs[state["i"]], (cols,), tw, 1e-6)

    bytes_moved = 2 * rows * cols * 4
    ours_ms = time_ms(ours, device)
    anchor_ms = time_ms(theirs, device)
    ours_gbs = bytes_moved / ours_ms / 1e6
    yield Row(f"rmsnorm fwd [{rows}, {cols}]", "GB/s", ours_gbs,
              anchor=bytes_moved / anchor_ms / 1e6, anchor_name="torch rms_norm",
              **share_of_ceiling("copy", ours_gbs / 1e3))


QWEN3_4B_LAYER = dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=9728, rms_norm_eps=1e-6, rope_theta=1e6)
TINY_LAYER = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                  rms_norm_eps=1e-6, rope_theta=1e6)


def _set_tf32(on: bool) -> None:
    """TF32 in torch's fp32 matmuls. The legacy allow_tf32 switch, as run.py and `ceilings` use: torch >= 2.9
    raises when the legacy and the new fp32_precision API are mixed in one process."""
    torch.backends.cuda.matmul.allow_tf32 = on


def _free_gpu(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _fp32_gemm_tflops(device: str) -> float:
    """The card's fp32 (no tensor core) 8192^3 GEMM rate: the ceilings suite's figure, else measured here."""
    if ("fp32", 8192) not in MEASURED_TFLOPS:
        size = 8192
        x = torch.randn(size, size, device=device)
        y = torch.randn(size, size, device=device)
        _set_tf32(False)
        ms = time_ms(lambda: x @ y, device, repeats=10, warmup=2)
        MEASURED_TFLOPS[("fp32", size)] = 2 * size**3 / ms / 1e9
        del x, y
        _free_gpu(device)
    return MEASURED_TFLOPS[("fp32", 8192)]


def gemm_params(dims: dict[str, Any]) -> int:
    """Weights of the layer's seven projections."""
    H, d, I = dims["hidden_size"], dims["head_dim"], dims["intermediate_size"]
    q, kv = dims["num_attention_heads"] * d, dims["num_key_value_heads"] * d
    return H * q + 2 * H * kv + q * H + 3 * H * I


def block_flops(dims: dict[str, Any], seq_lens: list[int], backward: str = "full") -> float:
    """FLOPs of one pass of the layer. Forward: GEMMs 2*T*P, causal attention 2 * 2 * n_q * d * L^2 / 2 per
    sequence (QK^T and PV). Backward "full": GEMMs twice the forward (input and weight gradients), attention
    2.5 times; "input": the input gradient only (frozen weights, as with LoRA): GEMMs once the forward,
    attention as in "full"; "none": forward only. Norms, rotary and SwiGLU are left out (a few FLOPs/param)."""
    tokens = sum(seq_lens)
    gemm_fwd = 2 * tokens * gemm_params(dims)
    attn_fwd = 2 * dims["num_attention_heads"] * dims["head_dim"] * sum(n * n for n in seq_lens)
    gemm_bwd, attn_bwd = {"none": (0.0, 0.0), "input": (1.0, 2.5), "full": (2.0, 2.5)}[backward]
    return (1 + gemm_bwd) * gemm_fwd + (1 + attn_bwd) * attn_fwd


def _hf_layer_call(layer: Any, rotary: Any, x_np: np.ndarray, g_np: np.ndarray, batch: int, seq: int, device: str,
                   dtype: torch.dtype) -> tuple[Callable[[], Any], Any, Any]:
    """(forward, input, output gradient) of a transformers decoder layer on [batch, seq, H] inputs.

    Rotary cos/sin are computed once outside the timing (a model computes them once for all its layers);
    attention_mask=None is what Qwen3Model hands an sdpa layer for an unpadded causal batch (sdpa then runs
    with is_causal=True). The input requires grad: the backward computes the input gradient, as in training.
    """
    H = x_np.shape[1]
    hx = torch.from_numpy(x_np).to(device=device, dtype=dtype).view(batch, seq, H).requires_grad_(True)
    hg = torch.from_numpy(g_np).to(device=device, dtype=dtype).view(batch, seq, H)
    pos = torch.arange(seq, device=device)[None].expand(batch, seq)
    with torch.no_grad():
        cos, sin = rotary(hx, pos)

    def forward() -> Any:
        y = layer(hx, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        return y[0] if isinstance(y, tuple) else y

    return forward, hx, hg


def block(device: str, quick: bool) -> Iterator[Row]:
    """One Qwen3-4B-sized decoder layer against transformers' Qwen3DecoderLayer (sdpa), forward and
    forward+backward, in fp32, tf32 and bf16; plus the fp32 rate at 8x512 and the activation bytes kept."""
    import transformers
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    cpu = device == "cpu"
    dims = TINY_LAYER if cpu else QWEN3_4B_LAYER
    H = dims["hidden_size"]
    hf_config = transformers.Qwen3Config(**dims, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096,
                                         attn_implementation="sdpa")
    hf_config._attn_implementation = "sdpa"
    cfg = cb.TransformerConfig.from_dict(hf_config.to_dict())
    assert cfg.qk_norm and cfg.head_dim == dims["head_dim"] and cfg.rope_theta == dims["rope_theta"]
    assert cfg.rms_norm_eps == dims["rms_norm_eps"]

    # Random weights, HF names: projections ~N(0, 0.02), norm weights ~1 + N(0, 0.1).
    rng = np.random.default_rng(0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3DecoderLayer(hf_config, layer_idx=0).state_dict().items()}
    weights = {k: (1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)) if "norm" in k
               else 0.02 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}

    if cpu:
        precisions, cases = ("fp32",), ((1, 16),)
    else:
        precisions = ("fp32", "tf32", "bf16")
        cases = ((1, 512), (8, 512)) if quick else ((1, 512), (1, 2048), (8, 512))
    repeats = 10 if quick else 30
    warmup = 2 if cpu else 3
    targets = {("fp32", 1, 512): 1.15}
    for p in ("tf32", "bf16"):
        targets |= {(p, 1, 512): 2.0, (p, 1, 2048): 2.0, (p, 8, 512): 1.6}

    torch_stream = torch.cuda.current_stream() if not cpu else None
    stream = cb.CudaStream.wrap(device, torch_stream.cuda_stream) if not cpu else cb.CudaStream("cpu")
    saved_kib: dict[str, float] = {}  # per precision (bf16 keeps several activations in bf16)
    rate_row: Row | None = None
    try:
        for precision in precisions:
            hf_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            _set_tf32(precision == "tf32")
            with torch.device("meta"):
                layer = Qwen3DecoderLayer(hf_config, layer_idx=0)
            layer = layer.to_empty(device=device).to(hf_dtype)
            assert not list(layer.buffers())  # everything the layer holds comes from `weights`
            layer.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
            layer.train()
            for p in layer.parameters():
                p.requires_grad_(True)
            rotary = Qwen3RotaryEmbedding(hf_config).to(device)
            for batch, seq in cases:
                tokens = batch * seq
                seq_lens = [seq] * batch
                x_np = rng.standard_normal((tokens, H), dtype=np.float32)
                g_np = rng.standard_normal((tokens, H), dtype=np.float32)

                # Ours: packed [T, H] fp32 buffers whatever the precision.
                blk = cb.CudaBlock.fp32(cfg, 0, weights, device=device, max_tokens=tokens, precision=precision)
                x = cb.GpuBuffer.from_numpy(x_np, device, stream=stream)
                gout = cb.GpuBuffer.from_numpy(g_np, device, stream=stream)
                out = cb.GpuBuffer.empty((tokens, H), "float32", device)
                gin = cb.GpuBuffer.empty((tokens, H), "float32", device)
                ws = blk.new_grad_workspace(stream)
                saved_kib.setdefault(precision, blk.saved_bytes_per_token / 1024)

                def ours_fwd() -> None:
                    blk.forward(x, out, seq_lens, stream)

                def ours_fwd_bwd() -> None:
                    blk.forward(x, out, seq_lens, stream)
                    blk.backward(x, gout, gin, seq_lens, stream, ws)

                ours_f = time_ms(ours_fwd, device, repeats=repeats, warmup=warmup)
                ours_fb = time_ms(ours_fwd_bwd, device, repeats=repeats, warmup=warmup)
                ours_out = out.to_numpy(stream)
                del blk, x, gout, out, gin, ws
                _free_gpu(device)

                # transformers: [B, L, H].
                hf_forward, hx, hg = _hf_layer_call(layer, rotary, x_np, g_np, batch, seq, device, hf_dtype)

                def hf_fwd_bwd() -> None:
                    torch.autograd.backward(hf_forward(), hg)

                # Forward with autograd recording (a training forward, as ours keeps activations).
                hf_f = time_ms(hf_forward, device, repeats=repeats, warmup=warmup)
                hf_fb = time_ms(hf_fwd_bwd, device, repeats=repeats, warmup=warmup)
                layer.zero_grad(set_to_none=True)
                # Both sides compute the same layer on the same data: compare what the layer adds to the residual
                # (of the order of x with these weights), loosely enough for bf16.
                with torch.no_grad():
                    hf_out = hf_forward().float().reshape(tokens, H).cpu().numpy()
                diff = float(np.linalg.norm(ours_out - hf_out) / np.linalg.norm(hf_out - x_np))
                assert diff < 3e-2, f"block {precision} {batch}x{seq}: differs from transformers by {diff:.3g}"
                del hx, hg, hf_forward
                _free_gpu(device)

                shape = f"{batch}x{seq}"
                note = ("HF: bf16 weights and inputs; ours: bf16 GEMM operands (bf16 weight copy), fp32 buffers"
                        if precision == "bf16" else "")
                fwd_tflops = block_flops(dims, seq_lens, backward="none") / ours_f / 1e9
                fwd_bwd_tflops = block_flops(dims, seq_lens) / ours_fb / 1e9
                yield Row(f"block {precision} {shape} fwd", "ms", ours_f, anchor=hf_f, anchor_name="transformers",
                          note=note, **share_of_ceiling(precision, fwd_tflops))
                yield Row(f"block {precision} {shape} fwd+bwd", "ms", ours_fb, anchor=hf_fb,
                          anchor_name="transformers", target=targets.get((precision, batch, seq)), note=note,
                          **share_of_ceiling(precision, fwd_bwd_tflops))
                del ours_out, hf_out
                if precision == "fp32" and (batch, seq) == (8, 512) and not cpu:
                    rate_row = Row(f"block fp32 {shape} fwd+bwd rate", "TFLOP/s", fwd_bwd_tflops,
                                   anchor=_fp32_gemm_tflops(device), anchor_name="fp32 GEMM 8192^3", target=0.9,
                                   note="fraction of measured fp32 GEMM rate",
                                   **share_of_ceiling("fp32", fwd_bwd_tflops))
            del layer, rotary
            _free_gpu(device)
            if rate_row is not None:
                yield rate_row
                rate_row = None
    finally:
        _set_tf32(False)
    for precision, kib in saved_kib.items():
        yield Row(f"block activations kept for backward, {precision}", "KiB/token", kib,
                  note=f"hidden {H}, intermediate {dims['intermediate_size']}")



def gemm(device: str, quick: bool) -> Iterator[Row]:
    """x[4096, 2560] . W[9728, 2560]^T (the gate/up product of a Qwen3-4B layer at 8x512 tokens) through our
    backend: fp32 buffers in each cuBLAS mode (bf16 there is FAST_16BF, what bf16 blocks used to run) and
    bf16 buffers (gemm_bf16, what bf16 blocks run now), against torch's bf16 matmul; TFLOP/s."""
    import ml_dtypes

    m, k, n = (64, 128, 96) if device == "cpu" else (4096, 2560, 9728)
    rng = np.random.default_rng(0)
    stream = cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream) if device != "cpu" else cb.CudaStream("cpu")
    x_np = rng.standard_normal((m, k), dtype=np.float32)
    w_np = (0.02 * rng.standard_normal((n, k), dtype=np.float32)).astype(np.float32)
    x32, w32 = (cb.GpuBuffer.from_numpy(a, device, stream=stream) for a in (x_np, w_np))
    x16, w16 = (cb.GpuBuffer.from_numpy(a.astype(ml_dtypes.bfloat16), device, stream=stream) for a in (x_np, w_np))
    out = cb.GpuBuffer.empty((m, n), "float32", device)
    flops = 2 * m * n * k
    repeats = 10 if quick or device == "cpu" else 50
    tdev = "cuda" if device != "cpu" else "cpu"
    tx = torch.from_numpy(x_np).to(tdev, torch.bfloat16)
    tw = torch.from_numpy(w_np).to(tdev, torch.bfloat16)
    torch_ms = time_ms(lambda: tx @ tw.T, device, repeats=repeats)
    torch_rate = flops / torch_ms / 1e9
    results = {}
    for label, a, b, precision in (("fp32 buffers, fp32", x32, w32, "fp32"), ("fp32 buffers, tf32", x32, w32, "tf32"),
                                   ("fp32 buffers, bf16 (FAST_16BF)", x32, w32, "bf16"),
                                   ("bf16 buffers (gemm_bf16)", x16, w16, "bf16")):
        ms = time_ms(lambda: cb.ops.gemm(a, b, out, trans_b=True, precision=precision, stream=stream), device,
                     repeats=repeats)
        results[label] = out.to_numpy(stream)
        # Against the ceiling of the precision the product runs in (FAST_16BF and gemm_bf16: bf16).
        yield Row(f"gemm [{m}, {k}] x [{n}, {k}]^T, {label}", "TFLOP/s", flops / ms / 1e9, anchor=torch_rate,
                  anchor_name="torch bf16 matmul",
                  target=0.95 if label.startswith("bf16 buffers") else None,
                  **share_of_ceiling(precision, flops / ms / 1e9))
    ref = x_np.astype(np.float64) @ w_np.astype(np.float64).T
    err = float(np.linalg.norm(results["bf16 buffers (gemm_bf16)"] - ref) / np.linalg.norm(ref))
    assert err < 1e-2, f"gemm_bf16 differs from float64 by {err:.3g}"


def adamw(device: str, quick: bool) -> Iterator[Row]:
    """AdamW over one Qwen3-4B layer's parameters: our block's step (with and without clipping)
    against torch.optim.AdamW(fused=True) on the same number of fp32 parameters."""
    import transformers
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    dims = TINY_LAYER if device == "cpu" else QWEN3_4B_LAYER
    hf_config = transformers.Qwen3Config(**dims, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096)
    cfg = cb.TransformerConfig.from_dict(hf_config.to_dict())
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3DecoderLayer(hf_config, layer_idx=0).state_dict().items()}
    rng = np.random.default_rng(0)
    weights = {k: 0.02 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    stream = cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream) if device != "cpu" else cb.CudaStream("cpu")
    blk = cb.CudaBlock.fp32(cfg, 0, weights, device=device, max_tokens=1)
    state, ws, norm = blk.init_optimizer_state(stream), blk.new_grad_workspace(stream), cb.GradNorm(device)
    ws.buffer.copy_from(cb.GpuBuffer.from_numpy(rng.standard_normal(ws.buffer.numel, dtype=np.float32), "cpu"), stream)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    counter = {"step": 0}

    def ours(clip: bool) -> None:
        counter["step"] += 1
        if clip:
            norm.compute([ws], stream)
            blk.optimizer_step(state, counter["step"], 1e-4, 0.9, 0.999, 1e-8, 0.01, stream, ws,
                               grad_norm=norm, max_grad_norm=1.0)
        else:
            blk.optimizer_step(state, counter["step"], 1e-4, 0.9, 0.999, 1e-8, 0.01, stream, ws)

    repeats = 10 if quick else 50
    plain_ms = time_ms(lambda: ours(False), device, repeats=repeats)
    clip_ms = time_ms(lambda: ours(True), device, repeats=repeats)
    tdev = "cuda" if device != "cpu" else "cpu"
    params = [torch.randn(s, device=tdev, requires_grad=True) for s in shapes.values()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device != "cpu")
    torch_ms = time_ms(opt.step, device, repeats=repeats)
    # Bytes a step must move: parameter, m and v read and written, gradient read (28 B/param); clipping reads
    # the gradient once more for its norm (4 B/param).
    plain_tbs, clip_tbs = 28 * n_params / plain_ms / 1e9, 32 * n_params / clip_ms / 1e9
    yield Row(f"adamw step, {n_params / 1e6:.1f}M params", "ms", plain_ms, anchor=torch_ms,
              anchor_name="torch AdamW fused" if device != "cpu" else "torch AdamW", target=1.15,
              **share_of_ceiling("copy", plain_tbs))
    yield Row("adamw step with global-norm clipping", "ms", clip_ms, anchor=plain_ms, anchor_name="ours, no clipping",
              target=1 / 1.1, note="target: at most 1.1x the time without clipping",
              **share_of_ceiling("copy", clip_tbs))
    yield Row("adamw effective bandwidth (28 B/param)", "TB/s", plain_tbs,
              anchor=MEASURED_TFLOPS.get(("copy TB/s", 0)), anchor_name="measured copy bandwidth", target=0.85,
              **share_of_ceiling("copy", plain_tbs))


def _bnb_functional() -> Any:
    """bitsandbytes (the package, with .functional loaded), or None where it is not importable."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        return None
    return bitsandbytes


def _bf16_numpy_to_torch(a: np.ndarray, device: str) -> torch.Tensor:
    """An ml_dtypes bfloat16 array as a torch bfloat16 tensor on `device` (same bits)."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).to(device)


def nf4(device: str, quick: bool) -> Iterator[Row]:
    """NF4 (blocksize 64, no double quantization, bf16): dequantizing a 9728x2560 weight against bitsandbytes'
    dequantize_4bit, and the staged NF4 GEMMs of a Qwen3-4B MLP (dequantize to a bf16 buffer, then gemm on
    bf16 buffers, writing the dtype the block writes) forward and input-gradient, against
    bitsandbytes.matmul_4bit and torch's bf16 matmul on the dequantized weight. On the CPU: tiny sizes, ours
    and torch only."""
    import ml_dtypes

    cpu = device == "cpu"
    tdev = "cpu" if cpu else "cuda"
    hidden, inter = (128, 256) if cpu else (2560, 9728)
    token_counts = (16,) if cpu else (512, 2048)
    blocksize = 64
    repeats = 10 if quick else 50
    rng = np.random.default_rng(0)
    stream = cb.CudaStream("cpu") if cpu else cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream)
    bnb = None if cpu else _bnb_functional()
    bnb_note = "" if bnb is not None else ("CPU smoke: no bitsandbytes" if cpu else "bitsandbytes not installed")

    # Gate/up weight [inter, hidden] and down weight [hidden, inter], ~N(0, 0.02) in bf16 (what a QLoRA model
    # loads), quantized once each: ours on the device, bitsandbytes' quantize_4bit on the same values.
    weights = {}
    for proj, shape in (("gate/up", (inter, hidden)), ("down", (hidden, inter))):
        w_np = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        q = cb.nf4.quantize(w_np, blocksize=blocksize, device=device, stream=stream)
        w16 = cb.GpuBuffer.empty(shape, "bfloat16", device)  # the staging buffer the GEMMs read
        bq = None
        if bnb is not None:
            bq = bnb.functional.quantize_4bit(_bf16_numpy_to_torch(w_np, tdev), blocksize=blocksize,
                                              compress_statistics=False, quant_type="nf4")
        weights[proj] = (q, w16, bq)
        del w_np

    def dequant(q: Any, w16: Any) -> None:
        # What cb.nf4.dequantize(q, "bfloat16") runs, into a buffer allocated once (as a block's scratch):
        # a fresh GpuBuffer each call would time cudaMalloc/cudaFree too.
        cb._core.nf4_dequantize(q.packed, q.absmax, q.blocksize, w16, stream)

    # 1. Dequantize the gate/up weight to bf16.
    q, w16, bq = weights["gate/up"]
    n = q.numel
    ours_us = time_ms(lambda: dequant(q, w16), device, repeats=repeats) * 1e3
    anchor_us = None
    if bq is not None:
        qb, state = bq
        tout = torch.empty(q.shape, dtype=torch.bfloat16, device=tdev)
        anchor_us = time_ms(lambda: bnb.functional.dequantize_4bit(qb, state, out=tout, quant_type="nf4"), device,
                            repeats=repeats) * 1e3
        dequant(q, w16)
        # Same format, same quantizer: the two dequantized weights are bit-identical.
        assert torch.equal(torch.from_dlpack(w16).view(torch.int16), tout.view(torch.int16)), \
            "nf4: our dequantized weight differs from bitsandbytes'"
        del tout
    # Bytes it must move: the packed nibbles and the fp32 absmax read, the bf16 weight written.
    dq_bytes = q.packed.nbytes + q.absmax.nbytes + n * 2
    dq_tbs = dq_bytes / (ours_us * 1e-6) / 1e12
    yield Row(f"nf4 dequantize {inter}x{hidden} -> bf16", "us", ours_us, anchor=anchor_us,
              anchor_name="bitsandbytes dequantize_4bit", target=3.0, note=bnb_note, **share_of_ceiling("copy", dq_tbs))
    yield Row(f"nf4 dequantize effective bandwidth ({dq_bytes / 1e6:.1f} MB)", "TB/s", dq_tbs,
              anchor=MEASURED_TFLOPS.get(("copy TB/s", 0)), anchor_name="measured copy bandwidth",
              note=f"{(q.packed.nbytes + q.absmax.nbytes) / 1e6:.2f} MB read + {n * 2 / 1e6:.2f} MB written",
              **share_of_ceiling("copy", dq_tbs))

    # 2. Staged NF4 GEMMs: forward y = x . W^T and input gradient dX = dY . W, for both projections.
    for tokens in token_counts:
        for proj in ("gate/up", "down"):
            q, w16, bq = weights[proj]
            n_out, n_in = q.shape
            x_np = rng.standard_normal((tokens, n_in), dtype=np.float32).astype(ml_dtypes.bfloat16)
            g_np = rng.standard_normal((tokens, n_out), dtype=np.float32).astype(ml_dtypes.bfloat16)
            x = cb.GpuBuffer.from_numpy(x_np, device, stream=stream)
            g = cb.GpuBuffer.from_numpy(g_np, device, stream=stream)
            # Outputs in the dtype the NF4 block writes them: gate/up's forward (SwiGLU's input) and
            # down's input gradient (SwiGLU's backward's) in bf16, the other two in fp32 (the residual
            # stream and RMSNorm's backward read them).
            y_dtype, dx_dtype = ("bfloat16", "float32") if proj == "gate/up" else ("float32", "bfloat16")
            y = cb.GpuBuffer.empty((tokens, n_out), y_dtype, device)
            dx = cb.GpuBuffer.empty((tokens, n_in), dx_dtype, device)
            tx, tg = _bf16_numpy_to_torch(x_np, tdev), _bf16_numpy_to_torch(g_np, tdev)

            def ours_fwd() -> None:
                dequant(q, w16)
                cb.ops.gemm(x, w16, y, trans_b=True, precision="bf16", stream=stream)

            def ours_dx() -> None:
                dequant(q, w16)
                cb.ops.gemm(g, w16, dx, trans_b=False, precision="bf16", stream=stream)

            fwd_ms = time_ms(ours_fwd, device, repeats=repeats)
            dx_ms = time_ms(ours_dx, device, repeats=repeats)
            # torch's cuBLAS bf16 matmul on the weight already dequantized (our buffer, through DLPack).
            tw = torch.from_dlpack(w16)
            torch_fwd_ms = time_ms(lambda: tx @ tw.T, device, repeats=repeats)
            torch_dx_ms = time_ms(lambda: tg @ tw, device, repeats=repeats)
            with torch.no_grad():
                ref_y, ref_dx = (tx @ tw.T).float(), (tg @ tw).float()
            for what, ours_out, ref in (("forward", y, ref_y), ("input gradient", dx, ref_dx)):
                err = float(torch.linalg.vector_norm(torch.from_dlpack(ours_out).to(ref.device).float() - ref)
                            / torch.linalg.vector_norm(ref))
                assert err < 1e-2, f"nf4 {proj} {what} at {tokens} tokens differs from torch by {err:.3g}"
            bnb_ms = None
            if bq is not None:
                qb, state = bq
                with torch.no_grad():
                    bnb_ms = time_ms(lambda: bnb.matmul_4bit(tx, qb.t(), quant_state=state), device,
                                     repeats=repeats)
                    by = bnb.matmul_4bit(tx, qb.t(), quant_state=state).float()
                err = float(torch.linalg.vector_norm(by - ref_y) / torch.linalg.vector_norm(ref_y))
                assert err < 1e-2, f"bitsandbytes matmul_4bit {proj} at {tokens} tokens differs by {err:.3g}"
                del by

            fwd = f"nf4 gemm fwd [{tokens}, {n_in}] x W[{n_out}, {n_in}]^T"
            bwd = f"nf4 gemm dX [{tokens}, {n_out}] x W[{n_out}, {n_in}]"
            staged = f"ours: dequantize to bf16 + gemm on bf16 buffers ({'bf16' if y_dtype == 'bfloat16' else 'fp32'} out)"
            # The product's FLOPs over the whole time (the dequantize included) against the bf16 GEMM.
            flops = 2 * tokens * n_out * n_in
            fwd_share = share_of_ceiling("bf16", flops / fwd_ms / 1e9)
            yield Row(fwd, "ms", fwd_ms, anchor=bnb_ms, anchor_name="bitsandbytes matmul_4bit",
                      target=2.5 if tokens == 512 else None, note="; ".join(filter(None, (staged, bnb_note))),
                      **fwd_share)
            def vs_cublas(out_dtype: str) -> str:
                ours = "bf16 too" if out_dtype == "bfloat16" else "ours fp32, as the block's"
                return f"target: at most 1.15x the bf16 matmul's time (it writes bf16; {ours})"

            yield Row(f"{fwd} vs cuBLAS", "ms", fwd_ms, anchor=torch_fwd_ms,
                      anchor_name="torch bf16 matmul, dequantized W", target=1 / 1.15, note=vs_cublas(y_dtype),
                      **fwd_share)
            yield Row(f"{bwd} vs cuBLAS", "ms", dx_ms, anchor=torch_dx_ms,
                      anchor_name="torch bf16 matmul, dequantized W", target=1 / 1.15, note=vs_cublas(dx_dtype),
                      **share_of_ceiling("bf16", flops / dx_ms / 1e9))
            del x, g, y, dx, tx, tg, tw, ref_y, ref_dx
            _free_gpu(device)
    del weights
    _free_gpu(device)


def qlora_layer(device: str, quick: bool) -> Iterator[Row]:
    """One QLoRA layer step at Qwen3-4B size, 8x512 tokens: forward + backward_lora of our NF4 block (bf16
    compute, LoRA r=16 alpha=32 on q_proj, v_proj, then on all seven projections) against transformers'
    Qwen3DecoderLayer whose projections are bitsandbytes Linear4bit (nf4, bf16 compute) with peft LoRA on the
    same projections (the input gradient and the LoRA gradients, as in training). Then the forward alone of
    16 and 64 tokens (one short sequence, as in evaluation or prediction), where our products decode NF4
    inside the GEMM kernel. On the CPU: tiny sizes, ours only."""
    import ml_dtypes
    import transformers
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    cpu = device == "cpu"
    dims = TINY_LAYER if cpu else QWEN3_4B_LAYER
    H = dims["hidden_size"]
    batch, seq = (2, 16) if cpu else (8, 512)
    tokens, seq_lens = batch * seq, [seq] * batch
    hf_config = transformers.Qwen3Config(**dims, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096)
    hf_config._attn_implementation = "sdpa"
    cfg = cb.TransformerConfig.from_dict(hf_config.to_dict())
    rng = np.random.default_rng(0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3DecoderLayer(hf_config, layer_idx=0).state_dict().items()}
    # bf16-representable weights: both sides quantize the same values to the same NF4 bytes.
    weights = {k: ((1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)) if "norm" in k
                   else 0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16).astype(np.float32)
               for k, s in shapes.items()}
    repeats, warmup = (3, 1) if cpu else ((10, 3) if quick else (30, 5))
    stream = cb.CudaStream("cpu") if cpu else cb.CudaStream.wrap(device, torch.cuda.current_stream().cuda_stream)
    x_np = rng.standard_normal((tokens, H), dtype=np.float32)
    g_np = rng.standard_normal((tokens, H), dtype=np.float32)

    # LoRA r=16 on q, v (the target's configuration, as QLoRA's paper), then on all seven projections (the
    # classify CLI's default; no target).
    all_seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for targets, target, label in ((("q_proj", "v_proj"), 2.5, ""), (all_seven, None, ", LoRA on all seven")):
        yield _qlora_layer_row(device, cfg, hf_config, dims, weights, x_np, g_np, seq_lens, targets, target, label,
                               repeats, warmup, stream)
    for few in ((8,) if cpu else (16, 64)):
        yield _qlora_layer_row(device, cfg, hf_config, dims, weights, x_np[:few], g_np[:few], [few],
                               ("q_proj", "v_proj"), None, "", repeats, warmup, stream, forward_only=True)


def _qlora_layer_row(device: str, cfg: Any, hf_config: Any, dims: dict, weights: dict, x_np: np.ndarray,
                     g_np: np.ndarray, seq_lens: list[int], targets: tuple[str, ...], target: float | None,
                     label: str, repeats: int, warmup: int, stream: Any, forward_only: bool = False) -> Row:
    """One row of qlora_layer: ours and the transformers + peft + bitsandbytes layer with LoRA r=16 on `targets`,
    forward and backward (or with forward_only the forward alone, the anchor under torch.no_grad)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    cpu = device == "cpu"
    tokens, H = sum(seq_lens), dims["hidden_size"]
    batch, seq = len(seq_lens), seq_lens[0]
    lora = cb.LoraConfig(rank=16, alpha=32, targets=targets)
    blk = cb.CudaBlock.nf4(cfg, 0, weights, device, tokens, lora=lora, compute="fp32" if cpu else "bf16")
    x = cb.GpuBuffer.from_numpy(x_np, device, stream=stream)
    gout = cb.GpuBuffer.from_numpy(g_np, device, stream=stream)
    out = cb.GpuBuffer.empty((tokens, H), "float32", device)
    gin = cb.GpuBuffer.empty((tokens, H), "float32", device)
    ws = blk.new_lora_grad_workspace(stream)

    def ours() -> None:
        blk.forward(x, out, seq_lens, stream)
        if not forward_only:
            blk.backward_lora(x, gout, gin, seq_lens, stream, ws)

    ours_ms = time_ms(ours, device, repeats=repeats, warmup=warmup)
    blk.forward(x, out, seq_lens, stream)
    ours_out = out.to_numpy(stream)
    del blk, x, gout, out, gin, ws
    _free_gpu(device)

    anchor_ms = None
    bnb = None if cpu else _bnb_functional()
    note = "bitsandbytes not installed" if bnb is None and not cpu else ""
    if bnb is not None:
        import peft

        with torch.device("meta"):
            layer = Qwen3DecoderLayer(hf_config, layer_idx=0)
        layer = layer.to_empty(device=device).to(torch.bfloat16)
        layer.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        nf4_linears(layer, bnb, device)
        layer = peft.inject_adapter_in_model(
            peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(targets)), layer)
        for name, p in layer.named_parameters():
            p.requires_grad_("lora_" in name)
        rotary = Qwen3RotaryEmbedding(hf_config).to(device)
        hf_forward, hx, hg = _hf_layer_call(layer, rotary, x_np, g_np, batch, seq, device, torch.bfloat16)
        if forward_only:
            with torch.no_grad():
                anchor_ms = time_ms(hf_forward, device, repeats=repeats, warmup=warmup)
        else:
            anchor_ms = time_ms(lambda: torch.autograd.backward(hf_forward(), hg), device, repeats=repeats,
                                warmup=warmup)
        with torch.no_grad():
            hf_out = hf_forward().float().reshape(tokens, H).cpu().numpy()
        # LoRA B starts at zero on both sides: the same NF4 layer, compared at bf16 tolerance.
        diff = float(np.linalg.norm(ours_out - hf_out) / np.linalg.norm(hf_out - x_np))
        assert diff < 5e-2, f"qlora layer: ours differs from the bitsandbytes + peft layer by {diff:.3g}"
        del layer, rotary, hx, hg, hf_forward
        _free_gpu(device)
    # Useful work: the forward and the input-gradient backward (the base weights are frozen); LoRA's rank-16
    # products are under 1% of the FLOPs and left out.
    if forward_only:
        # Few tokens: reading the NF4 weights (0.5 bytes per element and an fp32 absmax per 64) bounds the
        # forward, so its share is of the copy bandwidth.
        tbs = gemm_params(dims) * (0.5 + 4 / 64) / ours_ms / 1e9
        return Row(f"qlora layer fwd {batch}x{seq}{label}", "ms", ours_ms, anchor=anchor_ms,
                   anchor_name="transformers + peft + bitsandbytes", note=note,
                   **share_of_ceiling("fp32" if cpu else "copy", None if cpu else tbs))
    tflops = block_flops(dims, seq_lens, backward="input") / ours_ms / 1e9
    return Row(f"qlora layer fwd+bwd_lora {batch}x{seq}{label}", "ms", ours_ms, anchor=anchor_ms,
               anchor_name="transformers + peft + bitsandbytes", target=target, note=note,
               **share_of_ceiling("fp32" if cpu else "bf16", tflops))


SUITES: dict[str, Callable[[str, bool], Iterator[Row]]] = {
    "ceilings": ceilings,
    "rmsnorm": rmsnorm,
    "gemm": gemm,
    "block": block,
    "adamw": adamw,
    "nf4": nf4,
    "qlora_layer": qlora_layer,
    "classify": classify,
}
