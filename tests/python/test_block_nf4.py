"""The nf4 CudaBlock: forward against transformers' decoder layers whose Linear weights are the
dequantized NF4 weights (float64 torch), backward_lora against torch autograd with peft's LoRA on
those weights, the LoRA optimizer step against torch.optim.AdamW, bitsandbytes state dicts, bad
input and refusals; (marker gpu) the CUDA backend against the CPU one at Qwen3-4B layer size."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import cudablocks as cb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_block_fp32 import QWEN3_4B, SMALL, Rotary, hf_config, hf_layer, rel, run_block, weights_of  # noqa: E402

PROJECTIONS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
LENS = [7, 1, 12]


def dequantized(weights: dict[str, np.ndarray], double_quant: bool = False) -> dict[str, np.ndarray]:
    """The weights with every projection replaced by its NF4 round trip (blocksize 64), float32."""
    out = dict(weights)
    for path in PROJECTIONS.values():
        t = cb.nf4.quantize(weights[f"{path}.weight"], 64, double_quant=double_quant)
        out[f"{path}.weight"] = cb.nf4.dequantize(t, "float32").to_numpy()
    return out


def bnb_state_dict(weights: dict[str, np.ndarray], double_quant: bool = False) -> dict[str, Any]:
    """The layer as a bitsandbytes 4-bit checkpoint holds it: NF4 entries for the projections."""
    sd: dict[str, Any] = {k: v for k, v in weights.items() if not any(k == f"{p}.weight" for p in PROJECTIONS.values())}
    for path in PROJECTIONS.values():
        t = cb.nf4.quantize(weights[f"{path}.weight"], 64, double_quant=double_quant)
        sd.update(t.to_bnb_state_dict(f"{path}."))
    return sd


def torch_reference(layer: Any, config: Any, x: np.ndarray, lens: list[int], grad_out: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(out, dL/dx, {name: grad} of the trainable parameters) in float64, sequence by sequence."""
    layer = layer.to(torch.float64)
    layer.zero_grad(set_to_none=True)
    rot = Rotary(config, "cpu")
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    outs = []
    start = 0
    for n in lens:
        xs = xt[start:start + n][None]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), -math.inf, dtype=torch.float64).triu(1)[None, None]
        y = layer(xs, attention_mask=mask, position_ids=pos, position_embeddings=rot(xs, pos))
        outs.append((y[0] if isinstance(y, tuple) else y)[0])
        start += n
    out = torch.cat(outs)
    (out * torch.tensor(grad_out, dtype=torch.float64)).sum().backward()
    grads = {k: p.grad.double().numpy() for k, p in layer.named_parameters() if p.grad is not None}
    return out.detach().numpy(), xt.grad.numpy(), grads


def peft_layer(layer: Any, lora: cb.LoraConfig) -> Any:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets), lora_dropout=0.0,
                             use_rslora=lora.use_rslora)
    return peft.inject_adapter_in_model(config, layer)


def set_peft_weights(layer: Any, weights: dict[str, np.ndarray]) -> None:
    """Our PEFT names relative to the layer ('self_attn.q_proj.lora_A.weight') onto peft's modules."""
    with torch.no_grad():
        for name, value in weights.items():
            path, which, _ = name.rsplit(".", 2)
            module = layer.get_submodule(path)
            getattr(module, which)["default"].weight.copy_(torch.from_numpy(value))


def peft_grads(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """peft's gradient names ('self_attn.q_proj.lora_A.default.weight') as ours."""
    return {k.replace(".default.", "."): v for k, v in grads.items() if "lora_" in k}


def run(block: cb.CudaBlock, x: np.ndarray, lens: list[int], grad_out: np.ndarray | None = None,
        dropout_step: int | None = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None]:
    """forward (outputs poisoned first), then with grad_out backward_lora: (out, grad_in, LoRA grads)."""
    dev = block.device
    stream = cb.CudaStream(dev)
    xb = cb.GpuBuffer.from_numpy(x, dev, stream=stream)
    out = cb.GpuBuffer.empty(x.shape, "float32", dev)
    out.fill(float("nan"), stream=stream)
    block.forward(xb, out, lens, stream, dropout_step=dropout_step)
    if grad_out is None:
        return out.to_numpy(stream), None, None
    ws = block.new_lora_grad_workspace(stream)
    gi = cb.GpuBuffer.empty(x.shape, "float32", dev)
    gi.fill(float("nan"), stream=stream)
    block.backward_lora(xb, cb.GpuBuffer.from_numpy(grad_out, dev, stream=stream), gi, lens, stream, ws,
                        dropout_step=dropout_step)
    return out.to_numpy(stream), gi.to_numpy(stream), ws.to_numpy(stream)


def small(rng: np.random.Generator, model_type: str = "qwen3") -> tuple[Any, Any, cb.TransformerConfig]:
    config = hf_config(model_type, **SMALL, **({"head_dim": 16} if model_type == "qwen3" else {}))
    layer = hf_layer(config, rng)
    return config, layer, cb.TransformerConfig.from_dict(config.to_dict())


def random_b(block: cb.CudaBlock, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Nonzero LoRA B matrices (PEFT starts them at zero, which would hide A's gradients)."""
    return {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, _, shape, _ in block.lora_layout if name.endswith("lora_B.weight")}


# ---- forward against transformers ------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_matches_transformers_on_dequantized_weights(model_type: str, double_quant: bool,
                                                             rng: np.random.Generator) -> None:
    config, layer, cfg = small(rng, model_type)
    weights = weights_of(layer)
    block = cb.CudaBlock.nf4(cfg, 1, weights, "cpu", max_tokens=sum(LENS) + 3, compute="fp32",
                             double_quant=double_quant)
    assert block.kind == "nf4" and block.precision == "fp32" and not block.has_lora
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in dequantized(weights, double_quant).items()})
    x = rng.standard_normal((sum(LENS), config.hidden_size)).astype(np.float32)
    out, _, _ = run(block, x, LENS)
    ref, _, _ = torch_reference(layer, config, x, LENS, np.zeros_like(x))
    assert rel(out, ref) <= 1e-5


def test_bnb_state_dict_loads_as_it_is(rng: np.random.Generator) -> None:
    """A bitsandbytes 4-bit layer (with and without double quantization) computes exactly what the
    float weights quantized by the block compute."""
    config, layer, cfg = small(rng)
    weights = weights_of(layer)
    x = rng.standard_normal((sum(LENS), config.hidden_size)).astype(np.float32)
    for dq in (False, True):
        ours = run(cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, compute="fp32", double_quant=dq), x, LENS)[0]
        loaded = cb.CudaBlock.nf4(cfg, 0, bnb_state_dict(weights, dq), "cpu", 32, compute="fp32")
        np.testing.assert_array_equal(run(loaded, x, LENS)[0], ours)
    # Nf4Tensor values are taken as they are too.
    mixed = dict(weights)
    mixed["mlp.down_proj.weight"] = cb.nf4.quantize(weights["mlp.down_proj.weight"], 64)
    np.testing.assert_array_equal(run(cb.CudaBlock.nf4(cfg, 0, mixed, "cpu", 32, compute="fp32"), x, LENS)[0],
                                  run(cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, compute="fp32"), x, LENS)[0])


# ---- backward_lora against peft --------------------------------------------------------------------

LORA_CASES = {
    "default": dict(rank=4, alpha=8.0),
    "all-rslora": dict(rank=4, alpha=16.0, targets=tuple(PROJECTIONS), use_rslora=True),
    "up-o": dict(rank=3, alpha=5.0, targets=("up_proj", "o_proj")),
    "gate-k-down": dict(rank=2, alpha=2.0, targets=("gate_proj", "k_proj", "down_proj")),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_backward_lora_matches_peft(case: str, rng: np.random.Generator) -> None:
    config, layer, cfg = small(rng, "qwen2" if case == "up-o" else "qwen3")
    weights = weights_of(layer)
    lora = cb.LoraConfig(**LORA_CASES[case], seed=int(rng.integers(1 << 30)))
    block = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", max_tokens=sum(LENS), lora=lora, compute="fp32")
    assert block.has_lora
    expected_names = {f"{PROJECTIONS[t]}.lora_{ab}.weight" for t in lora.targets for ab in "AB"}
    assert {name for name, *_ in block.lora_layout} == expected_names
    block.upload_lora_weights(random_b(block, rng))
    adapters = block.download_lora_weights()

    layer.load_state_dict({k: torch.from_numpy(v) for k, v in dequantized(weights).items()})
    layer = peft_layer(layer, lora)
    set_peft_weights(layer, adapters)
    x = rng.standard_normal((sum(LENS), config.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    out, grad_in, grads = run(block, x, LENS, grad_out)
    ref_out, ref_in, ref_grads = torch_reference(layer, config, x, LENS, grad_out)
    ref_grads = peft_grads(ref_grads)

    assert rel(out, ref_out) <= 1e-5
    assert rel(grad_in, ref_in) <= 1e-4
    assert grads is not None and set(grads) == set(ref_grads) == expected_names
    for name, g in ref_grads.items():
        assert grads[name].shape == g.shape, name
        assert np.abs(g).max() > 0, name
        assert rel(grads[name], g) <= 1e-4, name


def test_lora_init_follows_peft(rng: np.random.Generator) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_(a=sqrt(5))), B = 0; the seed decides A."""
    _, layer, cfg = small(rng)
    weights = weights_of(layer)
    lora = cb.LoraConfig(rank=8, alpha=16, targets=("q_proj", "down_proj"), seed=3)
    a = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=lora).download_lora_weights()
    b = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=lora).download_lora_weights()
    c = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(8, 16, ("q_proj", "down_proj"), seed=4)
                         ).download_lora_weights()
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name])
        if name.endswith("lora_B.weight"):
            assert (value == 0).all()
        else:
            bound = 1 / math.sqrt(value.shape[1])
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.8 * bound
            assert abs(value.std() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)
            assert not np.array_equal(value, c[name])


def test_lora_optimizer_step_matches_torch_adamw(rng: np.random.Generator) -> None:
    config, layer, cfg = small(rng)
    lora = cb.LoraConfig(rank=4, alpha=8, targets=("q_proj", "gate_proj", "up_proj"))
    block = cb.CudaBlock.nf4(cfg, 0, weights_of(layer), "cpu", 32, lora=lora, compute="fp32")
    block.upload_lora_weights(random_b(block, rng))
    before = block.download_lora_weights()
    stream = cb.CudaStream("cpu")
    x = cb.GpuBuffer.from_numpy(rng.standard_normal((20, 64)).astype(np.float32), "cpu")
    out = cb.GpuBuffer.empty((20, 64), "float32", "cpu")
    gin = cb.GpuBuffer.empty((20, 64), "float32", "cpu")
    ws = block.new_lora_grad_workspace()
    state = block.init_lora_optimizer_state()
    params = {k: torch.tensor(v, requires_grad=True) for k, v in before.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    for step in (1, 2):
        ws.zero_()
        block.forward(x, out, LENS, stream)
        block.backward_lora(x, cb.GpuBuffer.from_numpy(rng.standard_normal((20, 64)).astype(np.float32), "cpu"), gin,
                            LENS, stream, ws)
        grads = ws.to_numpy()
        block.lora_optimizer_step(state, step, 1e-2, 0.9, 0.99, 1e-7, 0.1, stream, ws)
        for k, p in params.items():
            p.grad = torch.from_numpy(grads[k].copy())
        opt.step()
    after = block.download_lora_weights()
    for k, p in params.items():
        assert not np.array_equal(after[k], before[k]), k
        np.testing.assert_allclose(after[k], p.detach().numpy(), rtol=1e-5, atol=1e-6)
    # The moments are laid out like the adapters, with their names.
    assert set(state.to_numpy()) == {f"{m}.{k}" for m in ("exp_avg", "exp_avg_sq") for k in before}


def test_upload_download_round_trip_and_bad_uploads(rng: np.random.Generator) -> None:
    _, layer, cfg = small(rng)
    block = cb.CudaBlock.nf4(cfg, 0, weights_of(layer), "cpu", 8, lora=cb.LoraConfig(rank=2, alpha=4))
    new = {name: rng.standard_normal(shape).astype(np.float32) for name, _, shape, _ in block.lora_layout}
    block.upload_lora_weights(new)
    for k, v in block.download_lora_weights().items():
        np.testing.assert_array_equal(v, new[k])
    with pytest.raises(cb.InvalidArgumentError, match="unexpected tensor 'self_attn.k_proj.lora_A.weight'"):
        block.upload_lora_weights({"self_attn.q_proj.lora_A.weight": np.zeros((2, 64), np.float32),
                                   "self_attn.k_proj.lora_A.weight": np.zeros((2, 64), np.float32)})
    with pytest.raises(cb.ShapeError, match=r"expected \[64, 2\]"):
        block.upload_lora_weights({"self_attn.q_proj.lora_B.weight": np.zeros((2, 64), np.float32)})
    for k, v in block.download_lora_weights().items():  # nothing written by a refused upload
        np.testing.assert_array_equal(v, new[k])


def test_device_bytes_at_qwen3_4b() -> None:
    """Resident memory is the packed weights, scales, norms and LoRA only: <= 60 MB per Qwen3-4B layer."""
    config = hf_config("qwen3", **QWEN3_4B)
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    H, I, q, kv = 2560, 9728, 4096, 1024
    shapes = {"self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
              "self_attn.o_proj.weight": (H, q), "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H),
              "mlp.down_proj.weight": (H, I), "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
              "self_attn.q_norm.weight": (128,), "self_attn.k_norm.weight": (128,)}
    weights = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
    n = sum(math.prod(s) for k, s in shapes.items() if k.endswith("proj.weight"))
    lora = cb.LoraConfig(rank=16, alpha=32)
    block = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", max_tokens=1, lora=lora)
    lora_floats = 16 * (H + q) + 16 * (H + kv)
    norms = 4 * (2 * H + 2 * 128)
    assert block.device_bytes <= 60e6
    assert n // 2 + 4 * (n // 64) + norms <= block.device_bytes <= n // 2 + 4 * (n // 64) + norms + 4 * lora_floats + 65536
    dq = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", max_tokens=1, double_quant=True)
    assert dq.device_bytes < n // 2 + n // 64 + 4 * (n // 64 // 256) + 8 * 7 + 1024 + norms + 65536
    assert block.activation_bytes > 0


# ---- bad input and refusals ------------------------------------------------------------------------

def test_bad_lora_configs_and_weights(rng: np.random.Generator) -> None:
    _, layer, cfg = small(rng)
    weights = weights_of(layer)
    with pytest.raises(cb.InvalidArgumentError, match="unknown target 'qkv_proj'.*q_proj, k_proj"):
        cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(targets=("q_proj", "qkv_proj")))
    with pytest.raises(cb.InvalidArgumentError, match="repeated"):
        cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(targets=("q_proj", "q_proj")))
    with pytest.raises(cb.InvalidArgumentError, match="rank"):
        cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(rank=0))
    with pytest.raises(cb.InvalidArgumentError, match="dropout"):
        cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(dropout=1.0))
    with pytest.raises(cb.InvalidArgumentError, match="compute|precision"):
        cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, compute="fp16")
    missing = {k: v for k, v in weights.items() if k != "mlp.up_proj.weight"}
    with pytest.raises(cb.InvalidArgumentError, match="missing weight 'mlp.up_proj.weight'"):
        cb.CudaBlock.nf4(cfg, 0, missing, "cpu", 8)
    with pytest.raises(cb.ShapeError, match="'mlp.up_proj.weight' has shape"):
        cb.CudaBlock.nf4(cfg, 0, {**weights, "mlp.up_proj.weight": np.ones((64, 96), np.float32)}, "cpu", 8)
    with pytest.raises(cb.InvalidArgumentError, match="unexpected weight"):
        cb.CudaBlock.nf4(cfg, 0, {**weights, "mlp.extra.weight": np.ones(3, np.float32)}, "cpu", 8)

    sd = bnb_state_dict(weights)
    no_state = {k: v for k, v in sd.items() if k != "self_attn.o_proj.weight.quant_state.bitsandbytes__nf4"}
    with pytest.raises(cb.InvalidArgumentError, match="quant_state"):
        cb.CudaBlock.nf4(cfg, 0, no_state, "cpu", 8)
    short = {**sd, "self_attn.o_proj.weight": sd["self_attn.o_proj.weight"][:-1]}
    with pytest.raises(cb.ShapeError, match="self_attn.o_proj.weight"):
        cb.CudaBlock.nf4(cfg, 0, short, "cpu", 8)
    no_absmax = {k: v for k, v in sd.items() if k != "mlp.down_proj.weight.absmax"}
    with pytest.raises(cb.InvalidArgumentError, match="absmax"):
        cb.CudaBlock.nf4(cfg, 0, no_absmax, "cpu", 8)
    # A projection quantized from another shape.
    other = cb.nf4.quantize(rng.standard_normal((96, 64)).astype(np.float32), 64).to_bnb_state_dict("self_attn.q_proj.")
    with pytest.raises(cb.ShapeError, match=r"NF4 weight 'self_attn.q_proj.weight' has shape \[96, 64\]"):
        cb.CudaBlock.nf4(cfg, 0, {**sd, **other}, "cpu", 8)


def test_refused_calls_change_nothing(rng: np.random.Generator) -> None:
    _, layer, cfg = small(rng)
    weights = weights_of(layer)
    plain = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, compute="fp32")
    lora = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, lora=cb.LoraConfig(rank=2, alpha=2), compute="fp32")
    fp32 = cb.CudaBlock.fp32(cfg, 0, weights, "cpu", 32)
    x = cb.GpuBuffer.from_numpy(rng.standard_normal((20, 64)).astype(np.float32), "cpu")
    out = cb.GpuBuffer.empty((20, 64), "float32", "cpu")
    lora.forward(x, out, LENS)
    gin = cb.GpuBuffer.empty((20, 64), "float32", "cpu")
    gin.fill(7.0)
    adapters = lora.download_lora_weights()
    fp32_ws = fp32.new_grad_workspace()
    fp32_state = fp32.init_optimizer_state()

    for block in (plain, lora):
        for call, instead in [
            (lambda b=block: b.backward(x, x, gin, LENS, None, fp32_ws), "backward_lora"),
            (lambda b=block: b.init_optimizer_state(), "init_lora_optimizer_state"),
            (lambda b=block: b.optimizer_step(fp32_state, 1, 1e-3), "lora_optimizer_step"),
            (lambda b=block: b.download_weights(), "download_lora_weights"),
            (lambda b=block: cb.CudaGradWorkspace(b), "new_lora_grad_workspace"),
        ]:
            with pytest.raises(cb.UnsupportedOperationError, match=f"nf4 blocks.*{instead}"):
                call()
    for block, what in ((fp32, "fp32 blocks.*LoraConfig"), (plain, "no LoRA adapters.*LoraConfig")):
        for call in [
            lambda b=block: b.backward_lora(x, x, gin, LENS, None, None),
            lambda b=block: b.new_lora_grad_workspace(),
            lambda b=block: b.init_lora_optimizer_state(),
            lambda b=block: b.lora_optimizer_step(fp32_state, 1, 1e-3),
            lambda b=block: b.download_lora_weights(),
            lambda b=block: b.upload_lora_weights({}),
            lambda b=block: b.lora_layout,
        ]:
            with pytest.raises(cb.UnsupportedOperationError, match=what):
                call()
    assert (gin.to_numpy() == 7.0).all()
    for k, v in lora.download_lora_weights().items():
        np.testing.assert_array_equal(v, adapters[k])
    # backward_lora's own checks.
    ws = lora.new_lora_grad_workspace()
    other = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, lora=cb.LoraConfig(rank=3, alpha=2))
    with pytest.raises(cb.InvalidArgumentError, match="new_lora_grad_workspace"):
        lora.backward_lora(x, x, gin, LENS, None, other.new_lora_grad_workspace())
    with pytest.raises(cb.InvalidArgumentError, match="differ from those of the latest forward"):
        lora.backward_lora(x, x, gin, [12, 1, 7], None, ws)
    with pytest.raises(cb.InvalidArgumentError, match="forward first"):
        other.backward_lora(x, x, gin, LENS, None, other.new_lora_grad_workspace())
    with pytest.raises(cb.InvalidArgumentError, match="add up to 19"):
        lora.forward(x, out, [7, 12])
    assert (gin.to_numpy() == 7.0).all()
    assert (ws.buffer.to_numpy() == 0).all()


# In bf16 mode a projection group without adapters gets its operand straight from the norm or SwiGLU
# (bf16) and the backward recomputes nothing for it: these target sets cover each group either way.
BF16_TARGET_SETS = [tuple(PROJECTIONS), ("q_proj", "v_proj"), ("k_proj", "up_proj"), ("down_proj",)]


@pytest.mark.parametrize(("targets", "dropout", "model_type"),
                         [(t, 0.0, "qwen3") for t in BF16_TARGET_SETS] + [(("q_proj", "up_proj"), 0.3, "qwen3"),
                                                                          (tuple(PROJECTIONS), 0.0, "qwen2")])
def test_bf16_compute_on_cpu_is_close_to_fp32(targets: tuple[str, ...], dropout: float, model_type: str,
                                              rng: np.random.Generator) -> None:
    """compute="bf16" rounds the GEMM operands to bf16 (as CUDA's tensor cores), the adapters' too and
    their u = x A^T and du = dy B (without dropout): close to fp32, not equal. With LoRA dropout both draw
    the same masks (the adapters' gradients included). Qwen2: the q/k/v biases join the adapters' terms."""
    config, layer, cfg = small(rng, model_type)
    weights = weights_of(layer)
    lora = cb.LoraConfig(rank=4, alpha=8, targets=targets, dropout=dropout)
    blocks = [cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, lora=lora, compute=c) for c in ("fp32", "bf16")]
    b_weights = random_b(blocks[0], rng)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    g = rng.standard_normal((20, 64)).astype(np.float32)
    results = []
    for block in blocks:
        block.upload_lora_weights(b_weights)
        results.append(run(block, x, LENS, g, dropout_step=7 if dropout else None))
    (o32, i32, g32), (o16, i16, g16) = results
    assert 0 < rel(o16, o32) <= 2e-2
    assert rel(i16, i32) <= 3e-2
    for k in g32:
        assert rel(g16[k], g32[k]) <= 3e-2, k


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize(("targets", "dropout"), [(None, 0.0), (tuple(PROJECTIONS), 0.0), (("q_proj", "v_proj"), 0.0),
                                                  (("k_proj", "down_proj"), 0.0), (("q_proj", "up_proj"), 0.3)])
def test_bf16_compute_equals_the_fp32_block_in_bf16(model_type: str, targets: tuple[str, ...] | None, dropout: float,
                                                    rng: np.random.Generator) -> None:
    """compute="bf16" is the fp32 block's bf16 mode on the dequantized weights, exactly: the same bf16
    operands and bf16-kept activations (q, k, gate_up, with biases and adapters added before rounding),
    whichever groups have adapters. Fresh adapters (B = 0) add exact zeros, dropout or not."""
    config, layer, cfg = small(rng, model_type)
    weights = weights_of(layer)
    x = rng.standard_normal((sum(LENS), cfg.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    fp32 = cb.CudaBlock.fp32(cfg, 0, dequantized(weights), "cpu", max_tokens=32, precision="bf16")
    out, grad_in, _ = run_block(fp32, x, LENS, grad_out)
    lora = None if targets is None else cb.LoraConfig(rank=4, alpha=8, targets=targets, dropout=dropout)
    nf4 = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, lora=lora, compute="bf16")
    ours = run(nf4, x, LENS, None if lora is None else grad_out, dropout_step=3 if dropout else None)
    np.testing.assert_array_equal(ours[0], out)
    if lora is not None:
        np.testing.assert_array_equal(ours[1], grad_in)


# ---- GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize(("double_quant", "targets", "lens"), [
    (False, tuple(PROJECTIONS), [200, 37, 1, 90]), (True, tuple(PROJECTIONS), [200, 37, 1, 90]),
    (False, ("q_proj", "v_proj"), [200, 37, 1, 90]), (False, ("down_proj",), [200, 37, 1, 90]),
    (False, ("up_proj",), [200, 37, 1, 90]),
    # <= 64 tokens: the forward's products decode NF4 inside the GEMM kernel (on an H100/H200)
    (False, tuple(PROJECTIONS), [40, 1, 23]), (True, ("q_proj", "v_proj"), [9, 30]), (False, None, [17])])
def test_cuda_matches_cpu_at_qwen3_4b_size(double_quant: bool, targets: tuple[str, ...] | None, lens: list[int],
                                           rng: np.random.Generator) -> None:
    config = hf_config("qwen3", **QWEN3_4B)
    cfg = cb.TransformerConfig.from_dict(config.to_dict())
    weights = weights_of(hf_layer(config, rng))
    lora = None if targets is None else cb.LoraConfig(rank=16, alpha=32, targets=targets, seed=5)
    x = rng.standard_normal((sum(lens), cfg.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    gpu = cb.CudaBlock.nf4(cfg, 0, weights, "cuda:0", max_tokens=512, lora=lora, compute="bf16",
                           double_quant=double_quant)
    cpu = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", max_tokens=sum(lens), lora=lora, compute="fp32",
                           double_quant=double_quant)
    # The same-precision yardstick: the CPU backend rounding at the same points (bf16 GEMM operands
    # and the activations kept in bf16), with its own accumulation order.
    cpu16 = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", max_tokens=sum(lens), lora=lora, compute="bf16",
                             double_quant=double_quant)
    # <= 60 MB besides the adapters (3.7 MB here: rank 16 on all seven projections).
    lora_bytes = 0 if lora is None else 4 * sum(math.prod(shape) for _, _, shape, _ in gpu.lora_layout)
    assert gpu.device_bytes - lora_bytes <= 60e6
    assert gpu.device_bytes == cpu.device_bytes
    if lora is not None:
        b_weights = random_b(cpu, rng)
        for block in (gpu, cpu, cpu16):
            block.upload_lora_weights(b_weights)
    else:
        grad_out = None  # forward only: backward_lora needs adapters
    ours, ref, same = run(gpu, x, lens, grad_out), run(cpu, x, lens, grad_out), run(cpu16, x, lens, grad_out)
    # FlashAttention's rule: against the fp32 reference, our error is at most twice that of bf16
    # arithmetic done elsewhere (a floor of 1e-4 for outputs where bf16 rounding barely shows).
    pairs = [("out", ours[0], same[0], ref[0])]
    if lora is not None:
        pairs += [("grad_in", ours[1], same[1], ref[1])]
        pairs += [(name, ours[2][name], same[2][name], ref[2][name]) for name in ref[2]]
    for name, o, s, r in pairs:
        assert rel(o, r) <= 2 * rel(s, r) + 1e-4, (name, rel(o, r), rel(s, r))


@pytest.mark.gpu
@pytest.mark.parametrize("compute", ["fp32", "tf32"])
def test_cuda_fp32_and_tf32_compute(compute: str, rng: np.random.Generator) -> None:
    config, layer, cfg = small(rng)
    weights = weights_of(layer)
    lora = cb.LoraConfig(rank=4, alpha=8, targets=tuple(PROJECTIONS))
    gpu = cb.CudaBlock.nf4(cfg, 0, weights, "cuda:0", 32, lora=lora, compute=compute)
    cpu = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 32, lora=lora, compute="fp32")
    b_weights = random_b(cpu, rng)
    gpu.upload_lora_weights(b_weights)
    cpu.upload_lora_weights(b_weights)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    g = rng.standard_normal((20, 64)).astype(np.float32)
    ours, ref = run(gpu, x, LENS, g), run(cpu, x, LENS, g)
    tol = 1e-5 if compute == "fp32" else 5e-3
    assert rel(ours[0], ref[0]) <= tol
    assert rel(ours[1], ref[1]) <= 10 * tol
    for name in ref[2]:
        assert rel(ours[2][name], ref[2][name]) <= 10 * tol, name
