"""AdamW on fp32 blocks against torch.optim.AdamW, clipping against clip_grad_norm_, state round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

import cudablocks as cb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = {
    "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 96, "num_hidden_layers": 1, "vocab_size": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
}


def make_block(device: cb.Device, rng: np.random.Generator) -> tuple[cb.CudaBlock, dict[str, np.ndarray]]:
    hf = transformers.Qwen3Config(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    layer = transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer(hf, 0)
    weights = {name: (rng.standard_normal(t.shape) * 0.1 + (1.0 if "norm" in name else 0.0)).astype(np.float32)
               for name, t in layer.state_dict().items()}
    blk = cb.CudaBlock.fp32(cb.TransformerConfig.from_dict(CONFIG), 0, weights, device=device, max_tokens=32)
    return blk, weights


def set_grads(ws: cb.CudaGradWorkspace, grads: dict[str, np.ndarray]) -> None:
    flat = np.zeros(ws.buffer.numel, np.float32)
    for name, offset, shape, _ in ws.param_layout:
        flat[offset:offset + math.prod(shape)] = grads[name].ravel()
    ws.buffer.copy_from(cb.GpuBuffer.from_numpy(flat, "cpu"))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def torch_setup(weights: dict[str, np.ndarray], blk: cb.CudaBlock, wd: float, lr: float, device: str):
    params = {n: torch.tensor(w, device=device, requires_grad=True) for n, w in weights.items()}
    matrices = {name for name, _, _, is_matrix in blk.param_layout if is_matrix}
    groups = [{"params": [p for n, p in params.items() if n in matrices], "weight_decay": wd},
              {"params": [p for n, p in params.items() if n not in matrices], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


@pytest.mark.parametrize("clip", [False, True])
def test_twenty_steps_match_torch(device: cb.Device, rng: np.random.Generator, clip: bool) -> None:
    blk, weights = make_block(device, rng)
    tdev = "cuda" if device.type == "cuda" else "cpu"
    params, opt = torch_setup(weights, blk, wd=0.1, lr=3e-3, device=tdev)
    state = blk.init_optimizer_state()
    ws = blk.new_grad_workspace()
    norm = cb.GradNorm(device)
    for step in range(1, 21):
        grads = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in weights.items()}
        set_grads(ws, grads)
        for n, p in params.items():
            p.grad = torch.tensor(grads[n], device=tdev)
        if clip:
            torch_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=5.0))
            norm.compute([ws])
            assert abs(norm.value() - torch_norm) <= 1e-5 * torch_norm
            blk.optimizer_step(state, step, 3e-3, 0.9, 0.95, 1e-8, 0.1, grad_ws=ws, grad_norm=norm, max_grad_norm=5.0)
        else:
            blk.optimizer_step(state, step, 3e-3, 0.9, 0.95, 1e-8, 0.1, grad_ws=ws)
        opt.step()
    ours = blk.download_weights()
    for n, p in params.items():
        assert rel(ours[n], p.detach().cpu().double().numpy()) <= 1e-6, n
    moments = state.to_numpy()
    for n, p in params.items():
        assert rel(moments["exp_avg_sq." + n], opt.state[p]["exp_avg_sq"].cpu().double().numpy()) <= 1e-6, n


def test_edge_cases(device: cb.Device, rng: np.random.Generator) -> None:
    blk, weights = make_block(device, rng)
    state = blk.init_optimizer_state()
    ws = blk.new_grad_workspace()
    # |g| >= 0.5, so that eps cannot matter in the step-1 check below.
    away_from_zero = {n: rng.standard_normal(w.shape) for n, w in weights.items()}
    set_grads(ws, {n: (np.sign(g) * (0.5 + np.abs(g))).astype(np.float32) for n, g in away_from_zero.items()})
    before = blk.download_weights()
    blk.optimizer_step(state, 1, 0.0, 0.9, 0.999, 1e-8, 0.1, grad_ws=ws)  # lr = 0: nothing moves
    after = blk.download_weights()
    assert all(np.array_equal(before[n], after[n]) for n in before)
    # weight_decay = 0 at step 1: every element moves by lr * sign(g) (to rounding).
    blk.optimizer_step(blk.init_optimizer_state(), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, grad_ws=ws)
    moved = blk.download_weights()
    grads = ws.to_numpy()
    for n in before:
        np.testing.assert_allclose(before[n] - moved[n], 1e-3 * np.sign(grads[n]), rtol=2e-3, atol=1e-8)
    # An Inf gradient makes the norm non-finite: the step is skipped, nothing written.
    bad = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in weights.items()}
    bad["mlp.down_proj.weight"][3, 5] = np.inf
    set_grads(ws, bad)
    norm = cb.GradNorm(device)
    norm.compute([ws])
    snapshot = (blk.download_weights(), state.to_numpy())
    blk.optimizer_step(state, 2, 1e-3, 0.9, 0.999, 1e-8, 0.1, grad_ws=ws, grad_norm=norm, max_grad_norm=1.0)
    assert not math.isfinite(norm.value())
    assert all(np.array_equal(snapshot[0][n], v) for n, v in blk.download_weights().items())
    assert all(np.array_equal(snapshot[1][n], v) for n, v in state.to_numpy().items())


@pytest.mark.parametrize("bad", [dict(lr=-1e-3), dict(beta1=1.0), dict(beta2=-0.1), dict(eps=0.0), dict(step=0),
                                 dict(weight_decay=-0.1), dict(max_grad_norm=0.0)])
def test_invalid_hyperparameters_raise_before_running(rng: np.random.Generator, bad: dict) -> None:
    blk, weights = make_block(cb.Device("cpu"), rng)
    state, ws = blk.init_optimizer_state(), blk.new_grad_workspace()
    set_grads(ws, {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in weights.items()})
    args = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    extra = {"max_grad_norm": bad.pop("max_grad_norm")} if "max_grad_norm" in bad else {}
    args.update(bad)
    before = blk.download_weights()
    with pytest.raises(ValueError):
        blk.optimizer_step(state, grad_ws=ws, **args, **extra)
    assert all(np.array_equal(before[n], v) for n, v in blk.download_weights().items())


def test_restored_state_gives_a_bitwise_identical_step(device: cb.Device, rng: np.random.Generator) -> None:
    blk, weights = make_block(device, rng)
    state, ws = blk.init_optimizer_state(), blk.new_grad_workspace()
    for step in (1, 2):
        set_grads(ws, {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in weights.items()})
        blk.optimizer_step(state, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, grad_ws=ws)
    twin = cb.CudaBlock.fp32(blk.config, 0, blk.download_weights(), device=device, max_tokens=32)
    restored = twin.init_optimizer_state()
    restored.load_numpy(state.to_numpy())
    set_grads(ws, {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in weights.items()})
    blk.optimizer_step(state, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, grad_ws=ws)
    twin.optimizer_step(restored, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, grad_ws=ws)
    a, b = blk.download_weights(), twin.download_weights()
    assert all(np.array_equal(a[n], b[n]) for n in a)
    with pytest.raises(cb.ShapeError):
        restored.load_numpy({k: v.ravel() for k, v in state.to_numpy().items()})
