"""Blocks sharing a BlockArena: run as a model runs them (forward through every layer, then from
the top: forward again when activations are shared, backward) they give bit-identical outputs and
gradients to the same blocks with memory of their own; a backward whose shared activations were
overwritten is refused and changes nothing; regions grow for larger blocks; the arena holds about
one block's activation memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import cudablocks as cb

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_block_fp32 import SMALL, hf_config, hf_layer, weights_of  # noqa: E402
from test_block_nf4 import random_b  # noqa: E402

LENS = [5, 1, 9]
N_LAYERS = 3
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# kind, then the factory's precision keyword and value.
CASES = {
    "fp32": ("fp32", {"precision": "fp32"}),
    "fp32-bf16": ("fp32", {"precision": "bf16"}),
    "nf4-lora-fp32": ("nf4", {"compute": "fp32"}),
    "nf4-lora-bf16": ("nf4", {"compute": "bf16"}),
}

# A model run: each layer's output, each layer's input gradient, each layer's weight or LoRA gradients.
Run = tuple[list[np.ndarray], list[np.ndarray], list[dict[str, np.ndarray]]]


def model_weights(rng: np.random.Generator, n: int = N_LAYERS) -> tuple[cb.TransformerConfig, list[dict[str, np.ndarray]]]:
    """A small qwen3 config and n layers of random weights."""
    config = hf_config("qwen3", **{**SMALL, "num_hidden_layers": n}, head_dim=16)
    return cb.TransformerConfig.from_dict(config.to_dict()), [weights_of(hf_layer(config, rng)) for _ in range(n)]


def make_blocks(case: str, cfg: cb.TransformerConfig, weights: list[dict[str, np.ndarray]], device: cb.Device,
                max_tokens: int, lora_b: list[dict[str, np.ndarray]] | None = None, **arena_kw: Any) -> list[cb.CudaBlock]:
    """One block per layer; nf4 blocks get LoRA on every projection with the given B matrices."""
    kind, kw = CASES[case]
    blocks = []
    for i, w in enumerate(weights):
        if kind == "fp32":
            blocks.append(cb.CudaBlock.fp32(cfg, i, w, device, max_tokens, **kw, **arena_kw))
            continue
        block = cb.CudaBlock.nf4(cfg, i, w, device, max_tokens, lora=cb.LoraConfig(rank=4, alpha=8, targets=ALL_TARGETS),
                                 **kw, **arena_kw)
        if lora_b is not None:
            block.upload_lora_weights(lora_b[i])
        blocks.append(block)
    return blocks


def new_workspace(block: cb.CudaBlock, stream: cb.CudaStream) -> cb.CudaGradWorkspace:
    return block.new_grad_workspace(stream) if block.kind == "fp32" else block.new_lora_grad_workspace(stream)


def backward(block: cb.CudaBlock, x: cb.GpuBuffer, grad_out: cb.GpuBuffer, grad_in: cb.GpuBuffer, lens: list[int],
             stream: cb.CudaStream, ws: cb.CudaGradWorkspace) -> None:
    if block.kind == "fp32":
        block.backward(x, grad_out, grad_in, lens, stream, ws)
    else:
        block.backward_lora(x, grad_out, grad_in, lens, stream, ws)


def run_model(blocks: list[cb.CudaBlock], x: np.ndarray, grad_top: np.ndarray, *, recompute: bool) -> Run:
    """A forward through every layer, then a backward from the top, each preceded by its layer's
    forward again with `recompute` (which must reproduce the layer's output exactly)."""
    dev = blocks[0].device
    stream = cb.CudaStream(dev)
    inputs = [cb.GpuBuffer.from_numpy(x, dev, stream=stream)]
    for block in blocks:
        out = cb.GpuBuffer.empty(x.shape, "float32", dev)
        block.forward(inputs[-1], out, LENS, stream)
        inputs.append(out)
    outs = [o.to_numpy(stream) for o in inputs[1:]]
    grad = cb.GpuBuffer.from_numpy(grad_top, dev, stream=stream)
    grads_in: list[np.ndarray] = []
    param_grads: list[dict[str, np.ndarray]] = []
    again = cb.GpuBuffer.empty(x.shape, "float32", dev)
    for i in reversed(range(len(blocks))):
        if recompute:
            blocks[i].forward(inputs[i], again, LENS, stream)
            np.testing.assert_array_equal(again.to_numpy(stream), outs[i])
        ws = new_workspace(blocks[i], stream)
        grad_in = cb.GpuBuffer.empty(x.shape, "float32", dev)
        backward(blocks[i], inputs[i], grad, grad_in, LENS, stream, ws)
        grads_in.insert(0, grad_in.to_numpy(stream))
        param_grads.insert(0, ws.to_numpy(stream))
        grad = grad_in
    return outs, grads_in, param_grads


def assert_runs_equal(a: Run, b: Run) -> None:
    """Bit-identical, finite, and no gradient all zero (which would hide a missing update)."""
    for outs_a, outs_b in zip(a[:2], b[:2]):
        for layer, (u, v) in enumerate(zip(outs_a, outs_b)):
            assert np.isfinite(u).all(), f"layer {layer}"
            np.testing.assert_array_equal(u, v, err_msg=f"layer {layer}")
    for layer, (ga, gb) in enumerate(zip(a[2], b[2])):
        assert set(ga) == set(gb)
        for name in ga:
            assert np.abs(ga[name]).sum() > 0, f"layer {layer} {name}"
            np.testing.assert_array_equal(ga[name], gb[name], err_msg=f"layer {layer} {name}")


def indices_bytes(max_tokens: int) -> int:
    """The int32 positions and cu_seqlens every block keeps of its own."""
    return 4 * (2 * max_tokens + 1)


# ---- bit-identical to blocks with memory of their own ------------------------------------------------

@pytest.mark.parametrize("share_activations", [False, True], ids=["scratch", "activations"])
@pytest.mark.parametrize("case", list(CASES))
def test_shared_memory_gives_identical_results(case: str, share_activations: bool, device: cb.Device,
                                               rng: np.random.Generator) -> None:
    cfg, weights = model_weights(rng)
    max_tokens = sum(LENS) + 3
    own = make_blocks(case, cfg, weights, device, max_tokens)
    lora_b = [random_b(b, rng) for b in own] if own[0].kind == "nf4" else None
    for block, b in zip(own, lora_b or []):
        block.upload_lora_weights(b)
    arena = cb.BlockArena(device)
    shared = make_blocks(case, cfg, weights, device, max_tokens, lora_b, arena=arena,
                         share_activations=share_activations)
    x = rng.standard_normal((sum(LENS), cfg.hidden_size)).astype(np.float32)
    grad_top = rng.standard_normal(x.shape).astype(np.float32)
    reference = run_model(own, x, grad_top, recompute=False)
    assert_runs_equal(run_model(shared, x, grad_top, recompute=share_activations), reference)

    # The arena holds one block's worth: what a block of its own allocates beyond what the
    # arena's blocks keep (their indices, and without shared activations their saved ones).
    assert arena.device == device
    for block in shared:
        assert arena.nbytes + block.activation_bytes == own[0].activation_bytes
        kept = indices_bytes(max_tokens) + (0 if share_activations else max_tokens * block.saved_bytes_per_token)
        assert kept <= block.activation_bytes <= kept + 4096


# ---- the guard on shared activations ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["fp32", "nf4-lora-fp32"])
def test_backward_without_recomputation_is_refused_and_changes_nothing(case: str, device: cb.Device,
                                                                       rng: np.random.Generator) -> None:
    cfg, weights = model_weights(rng)
    arena = cb.BlockArena(device)
    blocks = make_blocks(case, cfg, weights, device, sum(LENS), arena=arena, share_activations=True)
    stream = cb.CudaStream(device)
    shape = (sum(LENS), cfg.hidden_size)
    inputs = [cb.GpuBuffer.from_numpy(rng.standard_normal(shape).astype(np.float32), device, stream=stream)]
    for block in blocks:
        inputs.append(cb.GpuBuffer.empty(shape, "float32", device))
        block.forward(inputs[-2], inputs[-1], LENS, stream)
    grad_out = cb.GpuBuffer.from_numpy(rng.standard_normal(shape).astype(np.float32), device, stream=stream)

    # The top layer ran the latest forward: its backward needs no recomputation.
    top_ws = new_workspace(blocks[-1], stream)
    top_grad = cb.GpuBuffer.empty(shape, "float32", device)
    backward(blocks[-1], inputs[-2], grad_out, top_grad, LENS, stream, top_ws)
    # Layer 0's activations were overwritten by the layers above.
    ws = new_workspace(blocks[0], stream)
    grad_in = cb.GpuBuffer.empty(shape, "float32", device)
    grad_in.fill(7.0, stream=stream)
    with pytest.raises(cb.InvalidArgumentError, match="run its forward again right before its backward"):
        backward(blocks[0], inputs[0], grad_out, grad_in, LENS, stream, ws)
    assert (grad_in.to_numpy(stream) == 7.0).all()
    assert all((g == 0).all() for g in ws.to_numpy(stream).values())
    # The refused call left the top layer's activations in place: its backward repeats exactly.
    again_ws = new_workspace(blocks[-1], stream)
    again = cb.GpuBuffer.empty(shape, "float32", device)
    backward(blocks[-1], inputs[-2], grad_out, again, LENS, stream, again_ws)
    np.testing.assert_array_equal(again.to_numpy(stream), top_grad.to_numpy(stream))
    first, second = top_ws.to_numpy(stream), again_ws.to_numpy(stream)
    for name in first:
        np.testing.assert_array_equal(second[name], first[name])
    # Recomputing layer 0's forward makes its backward valid; then the top layer's is refused.
    blocks[0].forward(inputs[0], cb.GpuBuffer.empty(shape, "float32", device), LENS, stream)
    backward(blocks[0], inputs[0], grad_out, grad_in, LENS, stream, ws)
    assert np.isfinite(grad_in.to_numpy(stream)).all()
    with pytest.raises(cb.InvalidArgumentError, match="recomputation"):
        backward(blocks[-1], inputs[-2], grad_out, again, LENS, stream, again_ws)


# ---- growth, mixed blocks, validation -----------------------------------------------------------------

def test_blocks_of_different_sizes_share_a_growing_arena(device: cb.Device, rng: np.random.Generator) -> None:
    cfg, weights = model_weights(rng, 2)
    small_tokens, large_tokens = sum(LENS), 4 * sum(LENS)
    arena = cb.BlockArena(device)
    assert arena.nbytes == 0
    small = cb.CudaBlock.fp32(cfg, 0, weights[0], device, small_tokens, arena=arena, share_activations=True)
    own_small = cb.CudaBlock.fp32(cfg, 0, weights[0], device, small_tokens)
    assert arena.nbytes == own_small.activation_bytes - indices_bytes(small_tokens)
    stream = cb.CudaStream(device)
    shape = (sum(LENS), cfg.hidden_size)
    x = cb.GpuBuffer.from_numpy(rng.standard_normal(shape).astype(np.float32), device, stream=stream)
    small.forward(x, cb.GpuBuffer.empty(shape, "float32", device), LENS, stream)

    # A larger block grows every region; the saved activations the arena held are gone.
    large = cb.CudaBlock.fp32(cfg, 1, weights[1], device, large_tokens, arena=arena, share_activations=True)
    own_large = cb.CudaBlock.fp32(cfg, 1, weights[1], device, large_tokens)
    assert arena.nbytes == own_large.activation_bytes - indices_bytes(large_tokens)
    ws = small.new_grad_workspace(stream)
    grad_in = cb.GpuBuffer.empty(shape, "float32", device)
    with pytest.raises(cb.InvalidArgumentError, match="recomputation"):
        small.backward(x, x, grad_in, LENS, stream, ws)
    # A smaller block does not shrink it.
    cb.CudaBlock.fp32(cfg, 0, weights[0], device, 1, arena=arena, share_activations=True)
    assert arena.nbytes == own_large.activation_bytes - indices_bytes(large_tokens)

    x_np = rng.standard_normal(shape).astype(np.float32)
    grad_top = rng.standard_normal(shape).astype(np.float32)
    assert_runs_equal(run_model([small, large], x_np, grad_top, recompute=True),
                      run_model([own_small, own_large], x_np, grad_top, recompute=False))


def test_fp32_and_nf4_blocks_share_one_arena(device: cb.Device, rng: np.random.Generator) -> None:
    cfg, weights = model_weights(rng, 2)
    arena = cb.BlockArena(device)
    mixed = [make_blocks("nf4-lora-bf16", cfg, weights[:1], device, sum(LENS), arena=arena, share_activations=True)[0],
             cb.CudaBlock.fp32(cfg, 1, weights[1], device, sum(LENS), precision="bf16", arena=arena,
                               share_activations=True)]
    own = [make_blocks("nf4-lora-bf16", cfg, weights[:1], device, sum(LENS))[0],
           cb.CudaBlock.fp32(cfg, 1, weights[1], device, sum(LENS), precision="bf16")]
    b = random_b(own[0], rng)
    own[0].upload_lora_weights(b)
    mixed[0].upload_lora_weights(b)
    x = rng.standard_normal((sum(LENS), cfg.hidden_size)).astype(np.float32)
    grad_top = rng.standard_normal(x.shape).astype(np.float32)
    assert_runs_equal(run_model(mixed, x, grad_top, recompute=True), run_model(own, x, grad_top, recompute=False))
    # Each region is the larger of the two blocks' needs, less than both together.
    assert arena.nbytes < sum(b.activation_bytes for b in own) - sum(b.activation_bytes for b in mixed)


def test_bad_arena_arguments(device: cb.Device, rng: np.random.Generator) -> None:
    cfg, weights = model_weights(rng, 1)
    with pytest.raises(cb.InvalidArgumentError, match="share_activations needs an arena"):
        cb.CudaBlock.fp32(cfg, 0, weights[0], device, 8, share_activations=True)
    with pytest.raises(cb.InvalidArgumentError, match="share_activations needs an arena"):
        cb.CudaBlock.nf4(cfg, 0, weights[0], device, 8, share_activations=True)
    if device.type == "cuda":
        cpu_arena = cb.BlockArena("cpu")
        with pytest.raises(cb.DeviceError, match="arena is on cpu"):
            cb.CudaBlock.fp32(cfg, 0, weights[0], device, 8, arena=cpu_arena)
        with pytest.raises(cb.DeviceError, match="arena is on cpu"):
            cb.CudaBlock.nf4(cfg, 0, weights[0], device, 8, arena=cpu_arena, share_activations=True)
        assert cpu_arena.nbytes == 0
    # A block without an arena keeps today's memory: everything of its own.
    block = cb.CudaBlock.fp32(cfg, 0, weights[0], device, 8)
    arena_block = cb.CudaBlock.fp32(cfg, 0, weights[0], device, 8, arena=cb.BlockArena(device))
    assert block.activation_bytes > arena_block.activation_bytes > indices_bytes(8)
