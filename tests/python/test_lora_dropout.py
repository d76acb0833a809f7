"""LoRA dropout in nf4 blocks (PEFT's ``lora_dropout``): the masks redrawn in numpy from the hash
documented in :mod:`cudablocks.lora` equal the ones ``ops.dropout`` and the blocks use, with the
statistics of independent Bernoulli(1 - p) draws; forward and backward_lora against torch autograd
with peft LoRA whose dropout modules apply those same masks (float64); dropout 0 and inference
(no dropout_step) bit-identical to a block without dropout; the same step reproduces, another step
differs; bad values refused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import cudablocks as cb

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_block_fp32 import rel, weights_of  # noqa: E402
from test_block_nf4 import run as run_nf4  # noqa: E402
from test_block_nf4 import (  # noqa: E402
    LENS,
    PROJECTIONS,
    dequantized,
    peft_grads,
    peft_layer,
    random_b,
    set_peft_weights,
    small,
    torch_reference,
)

# ---- the documented hash, in numpy -----------------------------------------------------------------

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
PROJECTION_IDS = {name: i for i, name in enumerate(PROJECTIONS)}  # q_proj 0 ... down_proj 6


def mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array (numpy arrays wrap modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_key(seed: int, layer_idx: int, projection: int, step: int) -> int:
    key = 0
    for word in (seed, layer_idx, projection, step):
        key = int(mix(np.array([((key ^ word) + GOLDEN) & MASK64], np.uint64))[0])
    return key


def keep_mask(key: int, rows: int, cols: int, p: float) -> np.ndarray:
    """bool [rows, cols]: element i = r * cols + c is kept when mix(key + (i + 1) G) >> 32 >= floor(p 2^32)."""
    i = np.arange(rows * cols, dtype=np.uint64)
    bits = mix(np.full(i.shape, key, np.uint64) + (i + np.uint64(1)) * np.uint64(GOLDEN))
    return ((bits >> np.uint64(32)) >= np.uint64(math.floor(p * 2.0**32))).reshape(rows, cols)


def block_masks(lora: cb.LoraConfig, layer_idx: int, step: int, shapes: dict[str, tuple[int, int]],
                tokens: int) -> dict[str, np.ndarray]:
    """{projection: float64 [tokens, in] mask already scaled by 1 / (1 - p)} of the targets."""
    return {t: keep_mask(dropout_key(lora.seed, layer_idx, PROJECTION_IDS[t], step), tokens, shapes[t][1],
                         lora.dropout) / (1.0 - lora.dropout)
            for t in lora.targets}


# ---- the op against numpy --------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_op_mask_is_the_documented_hash(p: float, device: cb.Device, rng: np.random.Generator) -> None:
    rows, cols = 37, 211
    key = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))  # the whole uint64 range
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    stream = cb.CudaStream(device)
    xb = cb.GpuBuffer.from_numpy(x, device, stream=stream)
    out = cb.GpuBuffer.empty((rows, cols), "float32", device)
    out.fill(float("nan"), stream=stream)
    cb.ops.dropout(xb, out, p, key, stream=stream)
    kept = keep_mask(key, rows, cols, p)
    scale = np.float32(1.0 / (1.0 - p))
    np.testing.assert_array_equal(out.to_numpy(stream), np.where(kept, x * scale, np.float32(0)))
    # accumulate: kept elements add x * scale, dropped ones leave out as it was; in place on x too.
    base = rng.standard_normal((rows, cols)).astype(np.float32)
    acc = cb.GpuBuffer.from_numpy(base, device, stream=stream)
    cb.ops.dropout(xb, acc, p, key, accumulate=True, stream=stream)
    np.testing.assert_array_equal(acc.to_numpy(stream), np.where(kept, base + x * scale, base))
    cb.ops.dropout(xb, xb, p, key, stream=stream)
    np.testing.assert_array_equal(xb.to_numpy(stream), np.where(kept, x * scale, np.float32(0)))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_have_bernoulli_statistics(p: float, rng: np.random.Generator) -> None:
    """Keep fraction 1 - p within 5 binomial sigmas, overall, per row and per column; the masks of
    other seeds, layers, projections and steps agree with it as independent draws would."""
    rows, cols = 512, 384
    seed, layer, step = (int(v) for v in rng.integers(0, 2**31, 3))
    base = keep_mask(dropout_key(seed, layer, 2, step), rows, cols, p)
    n = base.size
    assert abs(base.mean() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    # Rows (tokens) and columns (features) alike: no stripes.
    for axis, count in ((1, cols), (0, rows)):
        assert np.all(np.abs(base.mean(axis=axis) - (1 - p)) <= 5.5 * math.sqrt(p * (1 - p) / count))
    agree = p * p + (1 - p) * (1 - p)  # P(two independent masks agree on an element)
    tol = 5 * math.sqrt(agree * (1 - agree) / n)
    others = [(seed + 1, layer, 2, step), (seed, layer + 1, 2, step), (seed, layer, 0, step), (seed, layer, 1, step),
              (seed, layer, 2, step + 1), (seed, layer, 2, step + 2**40)]
    for args in others:
        other = keep_mask(dropout_key(*args), rows, cols, p)
        assert abs((other == base).mean() - agree) <= tol, args
    # Neighbouring rows and columns of one mask are independent too.
    assert abs((base[1:] == base[:-1]).mean() - agree) <= 2 * tol
    assert abs((base[:, 1:] == base[:, :-1]).mean() - agree) <= 2 * tol


# ---- the block against peft with the same masks ---------------------------------------------------

class FixedMask(torch.nn.Module):
    """Stands in for peft's lora_dropout module: multiplies the adapter's input by a given scaled
    mask [T, in], consuming the rows of one sequence per call (the reference runs sequences in
    order)."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.mask = torch.from_numpy(mask)
        self.at = 0

    def forward(self, x: Any) -> Any:
        n = x.shape[-2]
        m = self.mask[self.at:self.at + n].to(x.dtype)
        self.at += n
        return x * m


def peft_with_masks(layer: Any, lora: cb.LoraConfig, masks: dict[str, np.ndarray]) -> Any:
    layer = peft_layer(layer, lora)
    for target, mask in masks.items():
        layer.get_submodule(PROJECTIONS[target]).lora_dropout["default"] = FixedMask(mask)
    return layer


def run(block: cb.CudaBlock, x: np.ndarray, grad_out: np.ndarray, step: int | None
        ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """forward and backward_lora over LENS with dropout step ``step``: (out, grad_in, LoRA grads)."""
    out, grad_in, grads = run_nf4(block, x, LENS, grad_out, dropout_step=step)
    assert grad_in is not None and grads is not None
    return out, grad_in, grads


DROPOUT_CASES = {
    # q, k and v read the same input, each under its own mask.
    "qkv": dict(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj"), dropout=0.3),
    # gate and up both: their adapter products meet through the selectors.
    "all-rslora": dict(rank=3, alpha=6.0, targets=tuple(PROJECTIONS), use_rslora=True, dropout=0.2),
    # one of gate/up, and o_proj (input: the attention output), at a high rate.
    "up-o-down": dict(rank=2, alpha=4.0, targets=("up_proj", "o_proj", "down_proj"), dropout=0.6),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_forward_and_backward_match_peft_with_the_same_masks(case: str, device: cb.Device,
                                                             rng: np.random.Generator) -> None:
    config, layer, cfg = small(rng)
    weights = weights_of(layer)
    lora = cb.LoraConfig(**DROPOUT_CASES[case], seed=int(rng.integers(1 << 30)))
    layer_idx, step = 1, int(rng.integers(0, 2**62))
    block = cb.CudaBlock.nf4(cfg, layer_idx, weights, device, max_tokens=sum(LENS), lora=lora, compute="fp32")
    block.upload_lora_weights(random_b(block, rng))
    adapters = block.download_lora_weights()

    T = sum(LENS)
    shapes = {t: weights[f"{PROJECTIONS[t]}.weight"].shape for t in lora.targets}
    masks = block_masks(lora, layer_idx, step, shapes, T)
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in dequantized(weights).items()})
    layer = peft_with_masks(layer, lora, masks)
    set_peft_weights(layer, adapters)
    x = rng.standard_normal((T, config.hidden_size)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    out, grad_in, grads = run(block, x, grad_out, step)
    ref_out, ref_in, ref_grads = torch_reference(layer, config, x, LENS, grad_out)
    ref_grads = peft_grads(ref_grads)

    assert rel(out, ref_out) <= 1e-5
    assert rel(grad_in, ref_in) <= 1e-4
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert np.abs(g).max() > 0, name
        assert rel(grads[name], g) <= 1e-4, name
    # The masks matter: without dropout the block computes something else.
    no_drop_out, _, no_drop_grads = run(block, x, grad_out, None)
    assert rel(no_drop_out, ref_out) > 1e-3
    assert all(rel(no_drop_grads[k], ref_grads[k]) > 1e-3 for k in ref_grads if ".lora_A." in k)


def test_dropout_zero_and_inference_are_bit_identical_to_no_dropout(device: cb.Device,
                                                                    rng: np.random.Generator) -> None:
    _, layer, cfg = small(rng)
    weights = weights_of(layer)
    kw: dict[str, Any] = dict(rank=3, alpha=6.0, targets=tuple(PROJECTIONS), seed=7)
    blocks = {p: cb.CudaBlock.nf4(cfg, 0, weights, device, sum(LENS), lora=cb.LoraConfig(**kw, dropout=p),
                                  compute="fp32") for p in (0.0, 0.4)}
    b = random_b(blocks[0.0], rng)
    for block in blocks.values():
        block.upload_lora_weights(b)
    x = rng.standard_normal((sum(LENS), 64)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    plain = run(blocks[0.0], x, grad_out, None)
    for block, step in ((blocks[0.0], 5), (blocks[0.4], None)):
        got = run(block, x, grad_out, step)
        np.testing.assert_array_equal(got[0], plain[0])
        np.testing.assert_array_equal(got[1], plain[1])
        for k, v in plain[2].items():
            np.testing.assert_array_equal(got[2][k], v)
    # Dropout needs one masked operand [T, largest adapted in_features] more scratch.
    extra = blocks[0.4].scratch_bytes_per_token - blocks[0.0].scratch_bytes_per_token
    assert extra == 4 * max(weights[f"{path}.weight"].shape[1] for path in PROJECTIONS.values())


def test_same_step_reproduces_other_step_differs(device: cb.Device, rng: np.random.Generator) -> None:
    _, layer, cfg = small(rng)
    lora = cb.LoraConfig(rank=2, alpha=4.0, targets=("v_proj", "gate_proj", "up_proj"), dropout=0.25, seed=3)
    block = cb.CudaBlock.nf4(cfg, 1, weights_of(layer), device, sum(LENS), lora=lora, compute="fp32")
    block.upload_lora_weights(random_b(block, rng))
    x = rng.standard_normal((sum(LENS), 64)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    first, again, other = (run(block, x, grad_out, s) for s in (11, 11, 12))
    for a, b in ((first[0], again[0]), (first[1], again[1])):
        np.testing.assert_array_equal(a, b)
    for k, v in first[2].items():
        np.testing.assert_array_equal(again[2][k], v)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[2]["mlp.up_proj.lora_A.weight"], other[2]["mlp.up_proj.lora_A.weight"])


# ---- refusals --------------------------------------------------------------------------------------

def test_bad_values_are_refused(rng: np.random.Generator) -> None:
    _, layer, cfg = small(rng)
    weights = weights_of(layer)
    for p in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(cb.InvalidArgumentError, match="dropout"):
            cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(dropout=p))
    block = cb.CudaBlock.nf4(cfg, 0, weights, "cpu", 8, lora=cb.LoraConfig(rank=2, alpha=4.0, dropout=0.1))
    x = cb.GpuBuffer.from_numpy(rng.standard_normal((8, 64)).astype(np.float32), "cpu")
    out = cb.GpuBuffer.empty((8, 64), "float32", "cpu")
    for step in (-1, 2**64, 1.5, "3", True):
        with pytest.raises(cb.InvalidArgumentError, match="dropout_step"):
            block.forward(x, out, 8, dropout_step=step)  # type: ignore[arg-type]
    block.forward(x, out, 8, dropout_step=2**64 - 1)
    block.forward(x, out, 8, dropout_step=np.uint64(3))  # numpy integers are ints
    ws = block.new_lora_grad_workspace()
    gin = cb.GpuBuffer.empty((8, 64), "float32", "cpu")
    for wrong in (4, None):
        with pytest.raises(cb.InvalidArgumentError, match="dropout_step .* latest forward"):
            block.backward_lora(x, out, gin, 8, lora_ws=ws, dropout_step=wrong)
    assert not ws.to_numpy()["self_attn.q_proj.lora_A.weight"].any()  # a refused backward wrote nothing
    block.backward_lora(x, out, gin, 8, lora_ws=ws, dropout_step=3)

    y = cb.GpuBuffer.empty((8, 64), "float32", "cpu")
    for p in (1.0, -0.5, float("nan")):
        with pytest.raises(cb.InvalidArgumentError, match=r"\[0, 1\)"):
            cb.ops.dropout(x, y, p, 1)
    with pytest.raises(cb.InvalidArgumentError, match="key"):
        cb.ops.dropout(x, y, 0.5, -1)
    with pytest.raises(cb.ShapeError):
        cb.ops.dropout(x, cb.GpuBuffer.empty((8, 63), "float32", "cpu"), 0.5, 1)
    with pytest.raises(cb.DtypeError):
        cb.ops.dropout(x, cb.GpuBuffer.empty((8, 64), "bfloat16", "cpu"), 0.5, 1)
