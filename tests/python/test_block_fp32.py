"""The fp32 CudaBlock against transformers' decoder layers (float64 torch), by finite differences,
on bad input, and (marker gpu) the CUDA backend against the CPU one and against torch at Qwen3-4B
layer size."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cudablocks as cb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODELS = {
    "qwen3": ("Qwen3Config", "qwen3.modeling_qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding"),
    "qwen2": ("Qwen2Config", "qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
    "llama": ("LlamaConfig", "llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
}

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere gives inf so that it never passes."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the transformers reference -------------------------------------------------------------------

def hf_config(model_type: str, **kwargs: Any) -> Any:
    cls = getattr(transformers, MODELS[model_type][0])
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    return config


def hf_layer(config: Any, rng: np.random.Generator) -> Any:
    """A decoder layer with random float32-representable weights (norm weights around 1, not 1)."""
    module = __import__(f"transformers.models.{MODELS[config.model_type][1]}", fromlist=["x"])
    layer = getattr(module, MODELS[config.model_type][2])(config, layer_idx=0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                value = 1.0 + 0.3 * rng.standard_normal(p.shape)
            elif name.endswith("bias"):
                value = 0.5 * rng.standard_normal(p.shape)
            else:
                value = rng.standard_normal(p.shape) / math.sqrt(p.shape[1])
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    return layer


class Rotary:
    """cos, sin of the rotary embedding from the model's rotary module: its fp32 inv_freq and fp32
    angles (position * inv_freq rounded to fp32, which both backends reproduce), with cos and sin
    taken in float64 (the module takes them in fp32 before casting)."""

    def __init__(self, config: Any, device: str) -> None:
        module = __import__(f"transformers.models.{MODELS[config.model_type][1]}", fromlist=["x"])
        self.module = getattr(module, MODELS[config.model_type][3])(config).to(device)

    def __call__(self, x: Any, position_ids: Any) -> tuple[Any, Any]:
        angles = position_ids[..., None].float() * self.module.inv_freq.float()  # as the module does
        emb = torch.cat((angles, angles), dim=-1).double()
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        ref_cos, ref_sin = self.module(x, position_ids)
        assert torch.allclose(ref_cos.double(), cos.double(), atol=1e-6)
        assert torch.allclose(ref_sin.double(), sin.double(), atol=1e-6)
        return cos, sin


def weights_of(layer: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in layer.state_dict().items()}


def hf_reference(layer: Any, rot: Any, x: np.ndarray, lens: list[int], grad_out: np.ndarray, *,
                 device: str = "cpu", dtype: Any = None, autocast: Any = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(out, dL/dx, {name: dL/dW}) of `layer` run on each sequence alone, with L = sum(out * grad_out)."""
    dtype = dtype or torch.float64
    layer = layer.to(device=device, dtype=dtype)
    layer.zero_grad(set_to_none=True)
    xt = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
    gt = torch.tensor(grad_out, dtype=dtype, device=device)
    outs = []
    start = 0
    for n in lens:
        xs = xt[start:start + n][None]
        pos = torch.arange(n, device=device)[None]
        mask = torch.full((n, n), -math.inf, dtype=dtype, device=device).triu(1)[None, None]
        cos, sin = rot(xs, pos)
        if autocast is not None:
            with torch.autocast(device_type="cuda", dtype=autocast):
                y = layer(xs, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        else:
            y = layer(xs, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        if isinstance(y, tuple):  # transformers 4
            y = y[0]
        outs.append(y[0].to(dtype))
        start += n
    out = torch.cat(outs)
    (out * gt).sum().backward()
    grads = {k: p.grad.detach().double().cpu().numpy() for k, p in layer.named_parameters()}
    return out.detach().double().cpu().numpy(), xt.grad.double().cpu().numpy(), grads


def run_block(block: cb.CudaBlock, x: np.ndarray, lens: list[int], grad_out: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    dev = block.device
    stream = cb.CudaStream(dev)
    xb = cb.GpuBuffer.from_numpy(x, dev, stream=stream)
    out = cb.GpuBuffer.empty(x.shape, "float32", dev)
    out.fill(float("nan"), stream=stream)
    block.forward(xb, out, lens, stream)
    ws = cb.CudaGradWorkspace(block, stream=stream)
    gi = cb.GpuBuffer.empty(x.shape, "float32", dev)
    gi.fill(float("nan"), stream=stream)
    block.backward(xb, cb.GpuBuffer.from_numpy(grad_out, dev, stream=stream), gi, lens, stream, ws)
    return out.to_numpy(), gi.to_numpy(), ws.to_numpy()


# ---- CPU against transformers ---------------------------------------------------------------------

CASES = {
    "qwen3": dict(model_type="qwen3", head_dim=16, rope_theta=1000000.0),
    "qwen3-head_dim-24": dict(model_type="qwen3", head_dim=24, rms_norm_eps=1e-5),
    "qwen2": dict(model_type="qwen2", rope_theta=10000.0),
    "llama": dict(model_type="llama", rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-attention_bias": dict(model_type="llama", attention_bias=True),
    # intermediate 48 < q 64: in tf32, gate_up's transposed dY comes in blocks of 64 + 32 rows.
    "qwen3-narrow-mlp": dict(model_type="qwen3", head_dim=16, intermediate_size=48),
    # head_dim 128 at long positions (theta 1e6 as Qwen3): the fp32 RoPE angles matter here.
    "qwen3-long": dict(model_type="qwen3", head_dim=128, rope_theta=1000000.0, hidden_size=256, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=128, lens=[300, 1, 45]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_block_matches_transformers(case: str, precision: str, rng: np.random.Generator) -> None:
    # The CPU computes tf32 in fp32 too, but a tf32 block takes its weight gradients through
    # transposed (k-major) operands: the same tolerances check that path.
    spec = dict(CASES[case])
    model_type = spec.pop("model_type")
    lens = spec.pop("lens", [7, 1, 12])
    config = hf_config(model_type, **{**SMALL, **spec})
    layer = hf_layer(config, rng)
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    assert cfg.qk_norm == (model_type == "qwen3")
    x = rng.standard_normal((sum(lens), config.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)

    block = cb.CudaBlock.fp32(cfg, 1, weights_of(layer), "cpu", max_tokens=sum(lens) + 3, precision=precision)
    out, grad_in, grads = run_block(block, x, lens, grad_out)
    ref_out, ref_in, ref_grads = hf_reference(layer, Rotary(config, "cpu"), x, lens, grad_out)

    assert rel(out, ref_out) <= 1e-5
    assert rel(grad_in, ref_in) <= 1e-4
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert grads[name].shape == g.shape, name
        assert rel(grads[name], g) <= 1e-4, name


def test_block_packing_is_independent_per_sequence(rng: np.random.Generator) -> None:
    """A packed batch gives each sequence exactly what it gets alone (restarted positions, no leaks)."""
    config = hf_config("qwen3", **SMALL, head_dim=16)
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    block = cb.CudaBlock.fp32(cfg, 0, weights_of(hf_layer(config, rng)), "cpu", max_tokens=32)
    lens = [5, 9, 2]
    x = rng.standard_normal((16, 64)).astype(np.float32)
    packed = cb.GpuBuffer.empty((16, 64), "float32", "cpu")
    block.forward(cb.GpuBuffer.from_numpy(x, "cpu"), packed, lens)
    start = 0
    for n in lens:
        alone = cb.GpuBuffer.empty((n, 64), "float32", "cpu")
        block.forward(cb.GpuBuffer.from_numpy(x[start:start + n].copy(), "cpu"), alone, np.int64(n))
        assert rel(packed.to_numpy()[start:start + n], alone.to_numpy()) <= 1e-6
        start += n


# ---- finite differences -----------------------------------------------------------------------------

def test_backward_matches_finite_differences(rng: np.random.Generator) -> None:
    """Central differences of L = sum(out * G) over a few entries of every parameter and of x."""
    cfg = cb.TransformerConfig(model_type="qwen3", hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=8, intermediate_size=24, num_hidden_layers=1, vocab_size=10,
                               max_position_embeddings=64, attention_bias=True, o_proj_bias=True, qk_norm=True)
    config = hf_config("qwen3", hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       intermediate_size=24, num_hidden_layers=1, vocab_size=10, attention_bias=True)
    weights = {k: v.astype(np.float64) for k, v in weights_of(hf_layer(config, rng)).items()}
    lens = [3, 2]
    x = rng.standard_normal((5, 16))
    G = rng.standard_normal((5, 16))

    def loss(w: dict[str, np.ndarray], xv: np.ndarray) -> float:
        block = cb.CudaBlock.fp32(cfg, 0, w, "cpu", max_tokens=8)
        out = cb.GpuBuffer.empty((5, 16), "float32", "cpu")
        block.forward(cb.GpuBuffer.from_numpy(xv.astype(np.float32), "cpu"), out, lens)
        return float((out.to_numpy().astype(np.float64) * G).sum())

    block = cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=8)
    _, grad_in, grads = run_block(block, x.astype(np.float32), lens, G.astype(np.float32))
    h = 1e-2
    analytic, numeric = [], []
    for name, w in weights.items():
        for _ in range(2):
            i = tuple(rng.integers(0, s) for s in w.shape)
            plus = {**weights, name: w.copy()}
            minus = {**weights, name: w.copy()}
            plus[name][i] += h
            minus[name][i] -= h
            numeric.append((loss(plus, x) - loss(minus, x)) / (2 * h))
            analytic.append(grads[name][i])
    for _ in range(6):
        i = tuple(rng.integers(0, s) for s in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        numeric.append((loss(weights, xp) - loss(weights, xm)) / (2 * h))
        analytic.append(grad_in[i])
    assert len(analytic) == 2 * len(weights) + 6
    assert rel(analytic, numeric) <= 1e-2, list(zip(analytic, numeric))


# ---- bf16 mode on the CPU: the same bf16 operand rounding as CUDA's tensor cores ---------------------

def _bf16(t: Any) -> Any:
    """Round to bf16 the way the block does: the fp32 value, rounded to nearest even."""
    return t.float().to(torch.bfloat16).to(t.dtype)


class _Bf16Linear(torch.autograd.Function):
    """y = bf16(x) bf16(W)^T (+ b) in float64; backward: dX = bf16(dY) bf16(W), dW = bf16(dY)^T bf16(x),
    db = dY (unrounded) -- what the block's bf16 mode computes around every projection."""

    @staticmethod
    def forward(ctx: Any, x: Any, w: Any) -> Any:
        xr, wr = _bf16(x), _bf16(w)
        ctx.save_for_backward(xr, wr)
        return xr @ wr.T

    @staticmethod
    def backward(ctx: Any, gy: Any) -> Any:
        xr, wr = ctx.saved_tensors
        g = _bf16(gy)
        return g @ wr, (g.reshape(-1, g.shape[-1]).T @ xr.reshape(-1, xr.shape[-1]))


class _Bf16IoAttention(torch.autograd.Function):
    """Softmax attention o = softmax(q k^T * scale + mask) v (float64) whose backward works from the output
    and its gradient rounded to bf16, as the block's bf16 mode keeps them: dV = P^T dO, dS = P (dO V^T - D)
    with D = rowsum(dO * O), dQ = dS K scale, dK = dS^T Q scale (dO, O rounded)."""

    @staticmethod
    def forward(ctx: Any, q: Any, k: Any, v: Any, mask: Any, scale: float) -> Any:
        scores = q @ k.transpose(-1, -2) * scale
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, dim=-1)
        o = p @ v
        ctx.save_for_backward(q, k, v, p, o)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx: Any, go: Any) -> Any:
        q, k, v, p, o = ctx.saved_tensors
        go, o = _bf16(go), _bf16(o)
        ds = p * (go @ v.transpose(-1, -2) - (go * o).sum(dim=-1, keepdim=True))
        return ds @ k * ctx.scale, ds.transpose(-1, -2) @ q * ctx.scale, p.transpose(-1, -2) @ go, None, None


class _Bf16RoundGrad(torch.autograd.Function):
    """y = x; the gradient rounded to bf16 (a gradient the block keeps in bf16)."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, gy: Any) -> Any:
        return _bf16(gy)


class _Bf16Round(torch.autograd.Function):
    """y = bf16(x); the gradient passes unchanged (the backward uses the rounded values it was given)."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        return _bf16(x)

    @staticmethod
    def backward(ctx: Any, gy: Any) -> Any:
        return gy


def bf16_operand_layer(layer: Any) -> Any:
    """The layer with every nn.Linear computing through _Bf16Linear (biases added in full precision), the
    q, k, gate and up projections' outputs rounded to bf16 (the block keeps them in bf16), and the down
    projection's input gradient rounded to bf16 (the block's SwiGLU backward reads it so)."""
    import types

    def forward(self: Any, x: Any) -> Any:
        y = _Bf16Linear.apply(x, self.weight)
        return y if self.bias is None else y + self.bias

    def rounded_forward(self: Any, x: Any) -> Any:
        return _Bf16Round.apply(forward(self, x))

    def input_grad_rounded_forward(self: Any, x: Any) -> Any:
        return forward(self, _Bf16RoundGrad.apply(x))

    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.endswith(("q_proj", "k_proj", "gate_proj", "up_proj")):
                module.forward = types.MethodType(rounded_forward, module)
            elif name.endswith("down_proj"):
                module.forward = types.MethodType(input_grad_rounded_forward, module)
            else:
                module.forward = types.MethodType(forward, module)
    return layer


@contextlib.contextmanager
def bf16_attention_operands(layer: Any) -> Iterator[None]:
    """Within the block, the layer's attention sees q and k (after the norm and RoPE) and v rounded to bf16
    (straight-through gradients) and runs _Bf16IoAttention, as the block's bf16 mode keeps q, k, v, the
    output and its gradient in bf16 for its tensor-core attention."""
    module = sys.modules[type(layer.self_attn).__module__]
    eager = module.eager_attention_forward

    def rounded(attn: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                dropout: float = 0.0, **kwargs: Any) -> Any:
        key = module.repeat_kv(_Bf16Round.apply(key), attn.num_key_value_groups)
        value = module.repeat_kv(_Bf16Round.apply(value), attn.num_key_value_groups)
        mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
        out = _Bf16IoAttention.apply(_Bf16Round.apply(query), key, value, mask, scaling)
        return out.transpose(1, 2).contiguous(), None

    module.eager_attention_forward = rounded
    try:
        yield
    finally:
        module.eager_attention_forward = eager


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "llama-attention_bias"])
def test_bf16_mode_on_cpu_emulates_bf16_operands(case: str, rng: np.random.Generator) -> None:
    """The CPU backend's bf16 mode rounds every GEMM operand to bf16 as CUDA's bf16 GEMMs do, and attention's
    q, k, v as CUDA's bf16 attention reads them: it matches a float64 reference that rounds the same operands
    (forward and backward) far more closely than it matches the plain float64 layer."""
    spec = dict(CASES[case])
    model_type = spec.pop("model_type")
    lens = [40, 1, 60]
    config = hf_config(model_type, **{**SMALL, **spec})
    layer = hf_layer(config, rng)
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    x = rng.standard_normal((sum(lens), config.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    weights = weights_of(layer)
    ours = run_block(cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=sum(lens), precision="bf16"),
                     x, lens, grad_out)
    exact = hf_reference(layer, Rotary(config, "cpu"), x, lens, grad_out)
    with bf16_attention_operands(layer):
        emulated = hf_reference(bf16_operand_layer(layer), Rotary(config, "cpu"), x, lens, grad_out)
    pairs = [("out", ours[0], emulated[0], exact[0]), ("grad_in", ours[1], emulated[1], exact[1])]
    pairs += [(name, ours[2][name], emulated[2][name], exact[2][name]) for name in exact[2]]
    for name, o, e, x64 in pairs:
        # bf16 operands move every result by ~5e-3 relative (rel(o, x64)). Against the emulation only the
        # operands that round the other way remain: an fp32 intermediate a few ulps from float64's value can
        # land on the other side of a bf16 rounding boundary. Typically that leaves ~1e-3 of the bf16 effect;
        # when it hits a value many products read (dr, or attention's dout, rounded since attention keeps it
        # in bf16) up to about half of it on some tensors (0.54 the most seen, over ~200 seeds and tensors).
        # Forgetting every rounding of a tensor's path would leave the whole effect. The individual roundings
        # are checked exactly elsewhere (the C++ tests: bf16 kernels on the rounded values).
        assert rel(o, e) <= 0.75 * rel(o, x64), name


def test_bf16_weight_copy_follows_the_optimizer_step(rng: np.random.Generator) -> None:
    """In bf16 mode the block multiplies by a bf16 copy of its weights that the AdamW pass rewrites: after a
    step it computes exactly what a fresh block made from the updated weights computes."""
    config = hf_config("qwen3", **SMALL, head_dim=16)
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    weights = weights_of(hf_layer(config, rng))
    lens = [5, 9]
    x = rng.standard_normal((sum(lens), 64)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    block = cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=16, precision="bf16")
    stream = cb.CudaStream("cpu")
    state, ws = block.init_optimizer_state(stream), block.new_grad_workspace(stream)
    xb = cb.GpuBuffer.from_numpy(x, "cpu")
    out = cb.GpuBuffer.empty(x.shape, "float32", "cpu")
    gin = cb.GpuBuffer.empty(x.shape, "float32", "cpu")
    block.forward(xb, out, lens, stream)
    before = out.to_numpy()
    block.backward(xb, cb.GpuBuffer.from_numpy(grad_out, "cpu"), gin, lens, stream, ws)
    block.optimizer_step(state, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1, stream, ws)
    updated = block.download_weights()
    assert any(not np.array_equal(updated[k], weights[k]) for k in weights)
    block.forward(xb, out, lens, stream)
    fresh = cb.CudaBlock.fp32(cfg, 0, updated, "cpu", max_tokens=16, precision="bf16")
    out2 = cb.GpuBuffer.empty(x.shape, "float32", "cpu")
    fresh.forward(xb, out2, lens, stream)
    np.testing.assert_array_equal(out.to_numpy(), out2.to_numpy())
    assert not np.array_equal(out.to_numpy(), before)


def test_scratch_and_saved_bytes_are_counted() -> None:
    cfg = cb.TransformerConfig.from_dict({"model_type": "qwen3", **QWEN3_4B})
    weights = {name: np.zeros(shape, np.float32) for name, shape in layout_shapes(cfg).items()}
    fp32 = cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=1)
    bf16 = cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=1, precision="bf16")
    # The documented Qwen3-4B figures; bf16 mode keeps q, k before the norm [4096 + 1024], v [1024], the
    # attention output [4096] and gate_up [2 I] in bf16 (2 bytes less per value).
    # bf16 mode also keeps the products' bf16 operands h, g [H], act [I], q_rot [4096] and k_rot [1024].
    assert fp32.saved_bytes_per_token == 129_320
    kept_operands = 2 * (2560 + 2560 + 9728 + 4096 + 1024)
    assert fp32.saved_bytes_per_token - (bf16.saved_bytes_per_token - kept_operands) == \
        2 * (4096 + 1024 + 1024 + 4096 + 2 * 9728)
    assert bf16.saved_bytes_per_token == 69_928 + 39_936
    # bf16 gradient operands: [T, max(2 I, q + 2 kv)] + [T, H], 2 bytes each.
    assert bf16.scratch_bytes_per_token - fp32.scratch_bytes_per_token == 2 * (2 * 9728 + 2560)
    # tf32: the weight gradients' transposed operands, [T, max(H, I, q) + H] floats.
    tf32 = cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=1, precision="tf32")
    assert tf32.saved_bytes_per_token == fp32.saved_bytes_per_token
    assert tf32.scratch_bytes_per_token - fp32.scratch_bytes_per_token == 4 * (9728 + 2560)


# ---- semantics: accumulation, sharing, weights ---------------------------------------------------------

def small_block(rng: np.random.Generator, model_type: str = "qwen3", max_tokens: int = 32, **kw: Any
                ) -> tuple[cb.CudaBlock, dict[str, np.ndarray], Any]:
    config = hf_config(model_type, **SMALL, **({"head_dim": 16} if model_type != "qwen2" else {}))
    weights = weights_of(hf_layer(config, rng))
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    return cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=max_tokens, **kw), weights, cfg


def test_gradients_accumulate_and_workspaces_are_shared(rng: np.random.Generator) -> None:
    block, weights, cfg = small_block(rng)
    other = cb.CudaBlock.fp32(cfg, 1, weights, "cpu", max_tokens=16)
    x = cb.GpuBuffer.from_numpy(rng.standard_normal((10, 64)).astype(np.float32), "cpu")
    gout = cb.GpuBuffer.from_numpy(rng.standard_normal((10, 64)).astype(np.float32), "cpu")
    out = cb.GpuBuffer.empty((10, 64), "float32", "cpu")
    gin = cb.GpuBuffer.empty((10, 64), "float32", "cpu")
    ws = block.new_grad_workspace()
    assert all((g == 0).all() for g in ws.to_numpy().values())
    block.forward(x, out, [4, 6])
    block.backward(x, gout, gin, [4, 6], None, ws)
    once = ws.to_numpy()
    block.backward(x, gout, gin, [4, 6], grad_ws=ws)
    twice = ws.to_numpy()
    for k in once:
        np.testing.assert_allclose(twice[k], 2 * once[k], rtol=1e-6, atol=1e-6 * np.abs(once[k]).max())
    # Another block of the same config adds into the same workspace.
    ws.zero_()
    assert all((g == 0).all() for g in ws.to_numpy().values())
    other.forward(x, out, 10)
    other.backward(x, gout, gin, 10, None, ws)
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in ws.to_numpy().values())
    # In place: grad_in may be grad_out itself.
    ref = gin.to_numpy()
    inplace = cb.GpuBuffer.from_numpy(gout.to_numpy(), "cpu")
    other.backward(x, inplace, inplace, 10, None, ws)
    np.testing.assert_array_equal(inplace.to_numpy(), ref)
    # The flat buffer is one allocation laid out like the parameters.
    assert ws.buffer.shape == (ws.nbytes // 4,)
    flat = ws.buffer.to_numpy()
    for name, offset, shape, _ in ws.param_layout:
        np.testing.assert_array_equal(flat[offset:offset + math.prod(shape)].reshape(shape), ws.to_numpy()[name])


def test_weights_round_trip_and_dtypes(rng: np.random.Generator) -> None:
    block, weights, cfg = small_block(rng, "qwen2")
    assert block.kind == "fp32" and block.layer_idx == 0 and block.max_tokens == 32
    assert block.precision == "fp32" and block.device == cb.Device("cpu")
    down = block.download_weights()
    assert set(down) == set(weights)
    for k, w in weights.items():
        assert down[k].dtype == np.float32
        np.testing.assert_array_equal(down[k], w)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        conv = {k: w.astype(dtype) for k, w in weights.items()}
        b = cb.CudaBlock.fp32(cfg, 1, conv, "cpu", 8, precision="bf16")
        assert b.precision == "bf16"
        for k, w in b.download_weights().items():
            np.testing.assert_array_equal(w, conv[k].astype(np.float32))
    assert block.saved_bytes_per_token > 0


def test_saved_bytes_per_token_at_qwen3_4b() -> None:
    cfg = cb.TransformerConfig.from_dict({"model_type": "qwen3", **QWEN3_4B})
    block = cb.CudaBlock.fp32(cfg, 0, {name: np.zeros(shape, np.float32) for name, shape in layout_shapes(cfg).items()},
                              "cpu", max_tokens=1)
    assert block.saved_bytes_per_token == 4 * (2 * 4096 + 2 * 1024 + 2560 + 2 * 9728 + 32 + 32 + 8 + 2) == 129320


def layout_shapes(cfg: cb.TransformerConfig) -> dict[str, tuple[int, ...]]:
    H, d, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
        "self_attn.o_proj.weight": (H, q), "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H),
        "mlp.down_proj.weight": (H, I), "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
    }
    if cfg.qk_norm:
        shapes |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    if cfg.attention_bias:
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if cfg.o_proj_bias:
        shapes |= {"self_attn.o_proj.bias": (H,)}
    return shapes


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_weights_are_refused_by_name(rng: np.random.Generator) -> None:
    _, weights, cfg = small_block(rng)
    missing = dict(weights)
    del missing["self_attn.k_norm.weight"]
    with pytest.raises(cb.InvalidArgumentError, match=r"missing weight 'self_attn.k_norm.weight' \[16\]"):
        cb.CudaBlock.fp32(cfg, 0, missing, "cpu", 8)
    with pytest.raises(cb.InvalidArgumentError, match="unexpected weight 'self_attn.q_proj.bias'"):
        cb.CudaBlock.fp32(cfg, 0, {**weights, "self_attn.q_proj.bias": np.ones(64, np.float32)}, "cpu", 8)
    bad = {**weights, "mlp.up_proj.weight": np.ones((64, 96), np.float32)}
    with pytest.raises(cb.ShapeError, match=r"'mlp.up_proj.weight' has shape \[64, 96\], expected \[96, 64\]"):
        cb.CudaBlock.fp32(cfg, 0, bad, "cpu", 8)
    with pytest.raises(cb.DtypeError, match="input_layernorm.weight"):
        cb.CudaBlock.fp32(cfg, 0, {**weights, "input_layernorm.weight": np.ones(64, np.int32)}, "cpu", 8)
    with pytest.raises(cb.InvalidArgumentError, match="precision"):
        cb.CudaBlock.fp32(cfg, 0, weights, "cpu", 8, precision="fp16")
    with pytest.raises(cb.InvalidArgumentError, match="layer_idx"):
        cb.CudaBlock.fp32(cfg, 2, weights, "cpu", 8)
    with pytest.raises(cb.InvalidArgumentError, match="max_tokens"):
        cb.CudaBlock.fp32(cfg, 0, weights, "cpu", 0)


def test_bad_calls_raise_and_write_nothing(rng: np.random.Generator) -> None:
    block, weights, cfg = small_block(rng, max_tokens=16)
    H = 64

    def buf(rows: int, cols: int = H, dtype: str = "float32") -> cb.GpuBuffer:
        b = cb.GpuBuffer.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32), "cpu")
        if dtype != "float32":
            b = cb.GpuBuffer.from_numpy(b.to_numpy().astype(ml_dtypes.bfloat16), "cpu")
        return b

    x = buf(12)
    out = cb.GpuBuffer.empty((12, H), "float32", "cpu")
    out.fill(7.0)
    refused = [
        (cb.InvalidArgumentError, "add up to 11", lambda: block.forward(x, out, [5, 6])),
        (cb.InvalidArgumentError, "add up to 13", lambda: block.forward(x, out, [7, 6])),
        (cb.InvalidArgumentError, "at least one token", lambda: block.forward(x, out, [0, 12])),
        (cb.InvalidArgumentError, "at least one token", lambda: block.forward(x, out, [-1, 13])),
        (cb.InvalidArgumentError, "seq_lens is empty", lambda: block.forward(x, out, [])),
        (cb.InvalidArgumentError, "seq_lens must be", lambda: block.forward(x, out, [6.0, 6])),
        (cb.InvalidArgumentError, "max_tokens 16", lambda: block.forward(buf(20), out, 20)),
        (cb.DtypeError, "x must be float32", lambda: block.forward(buf(12, dtype="bfloat16"), out, 12)),
        (cb.ShapeError, "x must have shape", lambda: block.forward(buf(12, H + 1), out, 12)),
        (cb.ShapeError, "out must have shape", lambda: block.forward(x, cb.GpuBuffer.zeros((11, H)), 12)),
        (cb.InvalidArgumentError, "overlap", lambda: block.forward(x, x, 12)),
        (cb.InvalidArgumentError, "forward first", lambda: block.backward(x, buf(12), out, 12, None, block.new_grad_workspace())),
    ]
    for error, message, call in refused:
        with pytest.raises(error, match=message):
            call()
        assert (out.to_numpy() == 7.0).all(), message

    # Backward: forward first, same seq_lens, a compatible workspace, matching buffers.
    y = cb.GpuBuffer.empty((12, H), "float32", "cpu")
    block.forward(x, y, [5, 7])
    gout = buf(12)
    ws = block.new_grad_workspace()
    ws.buffer.fill(3.0)
    qwen2_block, _, _ = small_block(rng, "qwen2")
    refused = [
        (cb.InvalidArgumentError, "differ from those of the latest forward", lambda: block.backward(x, gout, out, [7, 5], None, ws)),
        (cb.InvalidArgumentError, "grad_ws", lambda: block.backward(x, gout, out, [5, 7], None, None)),
        (cb.InvalidArgumentError, "another layer shape",
         lambda: block.backward(x, gout, out, [5, 7], None, qwen2_block.new_grad_workspace())),
        (cb.ShapeError, "grad_out must have shape", lambda: block.backward(x, buf(12, H - 1), out, [5, 7], None, ws)),
        (cb.ShapeError, "grad_in must have shape",
         lambda: block.backward(x, gout, cb.GpuBuffer.zeros((12, 2 * H)), [5, 7], None, ws)),
        (cb.InvalidArgumentError, "must not overlap x", lambda: block.backward(x, gout, x, [5, 7], None, ws)),
    ]
    for error, message, call in refused:
        with pytest.raises(error, match=message):
            call()
        assert (out.to_numpy() == 7.0).all(), message
        assert (ws.buffer.to_numpy() == 3.0).all(), message


# ---- GPU ------------------------------------------------------------------------------------------------

# Qwen3-4B's layer shape under each model type: Qwen2 adds the q/k/v biases, Llama has neither those nor
# QK-norm. 20 / 4 heads keep head_dim 128 = hidden / heads for the model types that derive it.
LAYER_4B = {
    "qwen3": dict(QWEN3_4B),
    "qwen2": {**QWEN3_4B, "num_attention_heads": 20, "num_key_value_heads": 4, "rope_theta": 10000.0},
    "llama": {**QWEN3_4B, "num_attention_heads": 20, "num_key_value_heads": 4, "rope_theta": 500000.0},
}


def layer_4b(model_type: str, rng: np.random.Generator) -> tuple[Any, Any, cb.TransformerConfig]:
    config = hf_config(model_type, **LAYER_4B[model_type])
    layer = hf_layer(config, rng)
    return config, layer, cb.TransformerConfig.from_dict(config.to_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", list(LAYER_4B))
def test_cuda_matches_cpu_and_fp64_at_4b_layer_size(model_type: str, rng: np.random.Generator) -> None:
    config, layer, cfg = layer_4b(model_type, rng)
    weights = weights_of(layer)
    lens = [512, 37, 1, 300]
    x = rng.standard_normal((sum(lens), cfg.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    gpu = run_block(cb.CudaBlock.fp32(cfg, 0, weights, "cuda:0", max_tokens=1024), x, lens, grad_out)
    cpu = run_block(cb.CudaBlock.fp32(cfg, 0, weights, "cpu", max_tokens=sum(lens)), x, lens, grad_out)
    ref = hf_reference(layer, Rotary(config, "cuda"), x, lens, grad_out, device="cuda")
    for other in (cpu, ref):
        assert rel(gpu[0], other[0]) <= 1e-5
        assert rel(gpu[1], other[1]) <= 1e-4
        for name in other[2]:
            assert rel(gpu[2][name], other[2][name]) <= 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", list(LAYER_4B))
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_within_twice_torch_error(precision: str, model_type: str,
                                                    rng: np.random.Generator) -> None:
    config, layer, cfg = layer_4b(model_type, rng)
    weights = weights_of(layer)
    lens = [512, 37, 1, 300]
    x = rng.standard_normal((sum(lens), cfg.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    rot = Rotary(config, "cuda")
    ref = hf_reference(layer, rot, x, lens, grad_out, device="cuda")
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"  # torch >= 2.9 : older
    saved = getattr(matmul, attr)
    try:
        if precision == "tf32":
            setattr(matmul, attr, "tf32" if attr == "fp32_precision" else True)
        theirs = hf_reference(layer, rot, x, lens, grad_out, device="cuda", dtype=torch.float32,
                              autocast=torch.bfloat16 if precision == "bf16" else None)
    finally:
        setattr(matmul, attr, saved)
    ours = run_block(cb.CudaBlock.fp32(cfg, 0, weights, "cuda:0", max_tokens=1024, precision=precision),
                     x, lens, grad_out)
    assert rel(ours[0], ref[0]) <= 2 * rel(theirs[0], ref[0])
    assert rel(ours[1], ref[1]) <= 2 * rel(theirs[1], ref[1])
    for name in ref[2]:
        assert rel(ours[2][name], ref[2][name]) <= 2 * rel(theirs[2][name], ref[2][name]), name


@pytest.mark.gpu
def test_cuda_block_refuses_buffers_of_another_device(rng: np.random.Generator) -> None:
    block, weights, cfg = small_block(rng)
    gpu_block = cb.CudaBlock.fp32(cfg, 0, weights, "cuda:0", max_tokens=16)
    x_cpu = cb.GpuBuffer.from_numpy(rng.standard_normal((8, 64)).astype(np.float32), "cpu")
    x_gpu = cb.GpuBuffer.from_numpy(x_cpu.to_numpy(), "cuda:0")
    out = cb.GpuBuffer.empty((8, 64), "float32", "cuda:0")
    out.fill(7.0)
    with pytest.raises(cb.DeviceError, match="x is on cpu"):
        gpu_block.forward(x_cpu, out, 8)
    with pytest.raises(cb.DeviceError, match="stream"):
        gpu_block.forward(x_gpu, out, 8, cb.CudaStream("cpu"))
    with pytest.raises(cb.DeviceError):
        block.forward(x_cpu, out, 8)
    with pytest.raises(cb.DeviceError):
        gpu_block.backward(x_gpu, x_gpu, out, 8, None, block.new_grad_workspace())
    assert (out.to_numpy() == 7.0).all()
