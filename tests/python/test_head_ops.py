"""The ops of the classification head (embedding, pooling, cross-entropy, RMSNorm backward, GEMM with
trans_a, AdamW on plain buffers, GradNorm over extra buffers) against torch in float64, and their checks."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import cudablocks as cb

torch = pytest.importorskip("torch")
F = torch.nn.functional


def buf(array: np.ndarray, device: cb.Device | str) -> cb.GpuBuffer:
    return cb.GpuBuffer.from_numpy(np.ascontiguousarray(array), device)


def poisoned(shape: tuple[int, ...], device: cb.Device | str) -> cb.GpuBuffer:
    out = cb.GpuBuffer.empty(shape, "float32", device)
    out.fill(float("nan"))
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def t64(array: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(array, np.float64), requires_grad=requires_grad)


# ---- embedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("table_dtype", [np.float32, ml_dtypes.bfloat16])
def test_embedding_forward_gathers_rows(device: cb.Device, rng: np.random.Generator, table_dtype: type) -> None:
    vocab, hidden, tokens = 50, 37, 23
    table = rng.standard_normal((vocab, hidden)).astype(table_dtype)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    out = poisoned((tokens, hidden), device)
    cb.ops.embedding_forward(buf(ids, device), buf(table, device), out)
    ref = F.embedding(torch.tensor(ids, dtype=torch.long), t64(table.astype(np.float64)))
    np.testing.assert_array_equal(out.to_numpy(), ref.numpy().astype(np.float32))  # a copy: exact


def test_embedding_backward_index_groups_positions(rng: np.random.Generator) -> None:
    ids = rng.integers(0, 9, 40)
    rows, offsets, order = cb.ops.embedding_backward_index(ids)
    assert rows.dtype == offsets.dtype == order.dtype == np.int32
    assert list(rows) == sorted(set(ids.tolist()))
    assert offsets[0] == 0 and offsets[-1] == len(ids)
    for u, row in enumerate(rows):
        positions = order[offsets[u]:offsets[u + 1]]
        assert list(positions) == [t for t in range(len(ids)) if ids[t] == row]  # stable: ascending


def test_embedding_backward_scatter_adds(device: cb.Device, rng: np.random.Generator) -> None:
    vocab, hidden, tokens = 40, 19, 60
    ids = rng.integers(0, 12, tokens)  # few distinct ids: every row gets several tokens
    grad_out = rng.standard_normal((tokens, hidden)).astype(np.float32)
    table0 = rng.standard_normal((vocab, hidden)).astype(np.float32)  # accumulated into
    rows, offsets, order = cb.ops.embedding_backward_index(ids)
    grad_table = buf(table0, device)
    cb.ops.embedding_backward(buf(grad_out, device), buf(rows, device), buf(offsets, device), buf(order, device),
                              grad_table)
    got = grad_table.to_numpy()
    ref = t64(table0).index_add_(0, torch.tensor(ids, dtype=torch.long), t64(grad_out)).numpy()
    assert rel(got, ref) <= 1e-6
    # The documented order: a float32 running sum over order[offsets[u]:offsets[u + 1]], then one add.
    in_order = table0.copy()
    for u, row in enumerate(rows):
        acc = np.zeros(hidden, np.float32)
        for t in order[offsets[u]:offsets[u + 1]]:
            acc = acc + grad_out[t]
        in_order[row] = in_order[row] + acc
    np.testing.assert_array_equal(got, in_order)


# ---- pooling -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_pool_forward_and_backward_match_torch(device: cb.Device, rng: np.random.Generator, mode: str) -> None:
    lens = [1, *rng.integers(1, 9, 4).tolist()]
    hidden = 24
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    x = rng.standard_normal((cu[-1], hidden)).astype(np.float32)
    dout = rng.standard_normal((len(lens), hidden)).astype(np.float32)

    xt = t64(x, requires_grad=True)
    seqs = [xt[cu[b]:cu[b + 1]] for b in range(len(lens))]
    pooled = torch.stack([s[-1] if mode == "last" else s.mean(0) for s in seqs])
    (pooled * t64(dout)).sum().backward()

    out, dx = poisoned((len(lens), hidden), device), poisoned(x.shape, device)
    cu_buf = buf(cu, device)
    cb.ops.pool_forward(buf(x, device), cu_buf, out, mode=mode)
    cb.ops.pool_backward(buf(dout, device), cu_buf, dx, mode=mode)
    assert rel(out.to_numpy(), pooled.detach().numpy()) <= 1e-6
    got_dx = dx.to_numpy()
    assert np.isfinite(got_dx).all()  # every row written
    assert rel(got_dx, xt.grad.numpy()) <= 1e-6
    if mode == "last":
        assert (got_dx[np.setdiff1d(np.arange(cu[-1]), cu[1:] - 1)] == 0).all()


# ---- cross-entropy --------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_accumulates_like_torch(device: cb.Device, rng: np.random.Generator, weighted: bool) -> None:
    classes = 5
    batches = [rng.standard_normal((n, classes)).astype(np.float32) * 3 for n in (13, 6)]
    batches[0][2] += 1000.0  # exp() of this row overflows without the max subtraction
    labels = [rng.integers(0, classes, len(b)).astype(np.int32) for b in batches]
    weights = rng.uniform(0.2, 2.0, classes).astype(np.float32) if weighted else None
    w = weights if weighted else np.ones(classes, np.float32)
    # The pipeline's scale: 1 / sum of w[y] over the whole step, so the gradients are the weighted mean's.
    grad_scale = 1.0 / float(sum(w[y].astype(np.float64).sum() for y in labels))

    loss0 = float(rng.standard_normal())
    loss_sum = buf(np.array([loss0], np.float32), device)
    got_dlogits, got_probs = [], []
    for logits, y in zip(batches, labels):
        dlogits, probs = poisoned(logits.shape, device), poisoned(logits.shape, device)
        cb.ops.cross_entropy(buf(logits, device), buf(y, device), loss_sum, dlogits=dlogits, probs=probs,
                             class_weights=buf(weights, device) if weighted else None, grad_scale=grad_scale)
        got_dlogits.append(dlogits.to_numpy())
        got_probs.append(probs.to_numpy())

    logits_t = t64(np.concatenate(batches), requires_grad=True)
    y_t = torch.tensor(np.concatenate(labels), dtype=torch.long)
    w_t = t64(weights) if weighted else None
    loss_ref = float(F.cross_entropy(logits_t, y_t, weight=w_t, reduction="sum").detach())
    F.cross_entropy(logits_t, y_t, weight=w_t, reduction="mean").backward()
    assert abs(float(loss_sum.to_numpy()[0]) - (loss0 + loss_ref)) <= 1e-6 * (abs(loss0) + loss_ref)
    assert rel(np.concatenate(got_dlogits), logits_t.grad.numpy()) <= 1e-5
    assert rel(np.concatenate(got_probs), torch.softmax(logits_t, -1).detach().numpy()) <= 1e-6


def test_cross_entropy_outputs_are_optional(device: cb.Device, rng: np.random.Generator) -> None:
    logits = rng.standard_normal((7, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 7).astype(np.int32)
    loss_sum = cb.GpuBuffer.zeros((1,), "float32", device)
    cb.ops.cross_entropy(buf(logits, device), buf(labels, device), loss_sum)
    ref = F.cross_entropy(t64(logits), torch.tensor(labels, dtype=torch.long), reduction="sum")
    assert abs(float(loss_sum.to_numpy()[0]) - float(ref)) <= 1e-6 * float(ref)


# ---- RMSNorm backward, GEMM trans_a -------------------------------------------------------


@pytest.mark.parametrize("accumulate_dx", [False, True])
def test_rmsnorm_backward_matches_torch_autograd(device: cb.Device, rng: np.random.Generator,
                                                 accumulate_dx: bool) -> None:
    rows, cols, eps = 9, 48, 1e-6
    x = (rng.standard_normal((rows, cols)) * 2).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    dx0 = rng.standard_normal((rows, cols)).astype(np.float32)
    dw0 = rng.standard_normal(cols).astype(np.float32)

    xt, wt = t64(x, requires_grad=True), t64(w, requires_grad=True)
    rstd_ref = torch.rsqrt(xt.pow(2).mean(-1) + eps)
    ((xt * rstd_ref[:, None] * wt) * t64(dy)).sum().backward()

    xb, wb = buf(x, device), buf(w, device)
    y, rstd = poisoned((rows, cols), device), poisoned((rows,), device)
    cb.ops.rmsnorm_forward(xb, wb, y, eps, rstd=rstd)
    assert rel(rstd.to_numpy(), rstd_ref.detach().numpy()) <= 1e-6
    dx = buf(dx0, device) if accumulate_dx else poisoned((rows, cols), device)
    dw = buf(dw0, device)
    cb.ops.rmsnorm_backward(buf(dy, device), xb, wb, rstd, dx, dw, accumulate_dx=accumulate_dx)
    assert rel(dx.to_numpy(), xt.grad.numpy() + (dx0 if accumulate_dx else 0.0)) <= 1e-5
    assert rel(dw.to_numpy(), wt.grad.numpy() + dw0) <= 1e-5  # dweight accumulates


@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_trans_a(device: cb.Device, rng: np.random.Generator, trans_b: bool) -> None:
    m, k, n = 21, 70, 13
    a = rng.standard_normal((k, m)).astype(np.float32)  # stored transposed: dW = dY^T X
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    exact = a.T.astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    out = buf(c0, device)
    cb.ops.gemm(buf(a, device), buf(b, device), out, trans_b=trans_b, beta=1.0, trans_a=True)
    assert rel(out.to_numpy(), exact + c0) <= 1e-5
    a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    rounded = a16.T.astype(np.float64) @ (b16.T if trans_b else b16).astype(np.float64)
    out = poisoned((m, n), device)
    cb.ops.gemm(buf(a16, device), buf(b16, device), out, trans_b=trans_b, precision="bf16", trans_a=True)
    assert rel(out.to_numpy(), rounded) <= 1e-5
    with pytest.raises(cb.ShapeError):
        cb.ops.gemm(buf(a, device), buf(b, device), poisoned((k, n), device), trans_b=trans_b, trans_a=True)


# ---- AdamW on buffers, GradNorm over buffers -------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
def test_adamw_step_matches_torch(device: cb.Device, rng: np.random.Generator, clip: bool) -> None:
    shapes = [(37,), (8, 5)]
    lr, betas, eps, wd, max_norm = 3e-3, (0.9, 0.95), 1e-8, 0.1, 2.0
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params_t = [torch.tensor(p, requires_grad=True) for p in init]
    opt = torch.optim.AdamW(params_t, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    params = [buf(p, device) for p in init]
    moments = [(cb.GpuBuffer.zeros(s, "float32", device), cb.GpuBuffer.zeros(s, "float32", device)) for s in shapes]
    norm = cb.GradNorm(device)
    for step in range(1, 5):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]  # norm ~ 9: clipping acts
        grad_bufs = [buf(g, device) for g in grads]
        for p, g in zip(params_t, grads):
            p.grad = torch.tensor(g)
        if clip:
            torch_norm = float(torch.nn.utils.clip_grad_norm_(params_t, max_norm=max_norm))
            norm.compute([], buffers=grad_bufs)
            assert abs(norm.value() - torch_norm) <= 1e-6 * torch_norm
        opt.step()
        for p, g, (m, v) in zip(params, grad_bufs, moments):
            cb.ops.adamw_step(p, g, m, v, step, lr, *betas, eps, wd,
                              **(dict(grad_norm=norm, max_grad_norm=max_norm) if clip else {}))
    for p, p_t, (m, v) in zip(params, params_t, moments):
        assert rel(p.to_numpy(), p_t.detach().double().numpy()) <= 1e-6
        assert rel(m.to_numpy(), opt.state[p_t]["exp_avg"].double().numpy()) <= 1e-6
        assert rel(v.to_numpy(), opt.state[p_t]["exp_avg_sq"].double().numpy()) <= 1e-6


def test_adamw_step_skips_a_non_finite_norm(device: cb.Device, rng: np.random.Generator) -> None:
    p0 = rng.standard_normal(10).astype(np.float32)
    grad = rng.standard_normal(10).astype(np.float32)
    grad[4] = np.inf
    p, m, v = buf(p0, device), cb.GpuBuffer.zeros(10, "float32", device), cb.GpuBuffer.zeros(10, "float32", device)
    norm = cb.GradNorm(device)
    norm.compute([], buffers=[buf(grad, device)])
    cb.ops.adamw_step(p, buf(grad, device), m, v, 1, 1e-3, grad_norm=norm, max_grad_norm=1.0)
    np.testing.assert_array_equal(p.to_numpy(), p0)
    assert not m.to_numpy().any() and not v.to_numpy().any()


def test_grad_norm_sums_workspaces_and_buffers(device: cb.Device, rng: np.random.Generator) -> None:
    transformers = pytest.importorskip("transformers")
    config = {"model_type": "qwen3", "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 8, "intermediate_size": 24, "num_hidden_layers": 1, "vocab_size": 32,
              "max_position_embeddings": 64}
    hf = transformers.Qwen3Config(**{k: v for k, v in config.items() if k != "model_type"})
    layer = transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer(hf, 0)
    weights = {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in layer.state_dict().items()}
    blk = cb.CudaBlock.fp32(cb.TransformerConfig.from_dict(config), 0, weights, device=device, max_tokens=8)
    ws = blk.new_grad_workspace()
    ws_grads = rng.standard_normal(ws.buffer.numel).astype(np.float32)
    ws.buffer.copy_from(buf(ws_grads, "cpu"))
    extra = [rng.standard_normal(s).astype(np.float32) for s in [(3, 16), (5,)]]
    norm = cb.GradNorm(device)
    norm.compute([ws], buffers=[buf(e, device) for e in extra])
    expected = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in [ws_grads, *extra]))
    assert abs(norm.value() - expected) <= 1e-6 * expected
    norm.compute([ws])  # workspaces alone, as before
    assert abs(norm.value() - float(np.linalg.norm(ws_grads.astype(np.float64)))) <= 1e-6 * expected


# ---- CUDA-only behaviour ---------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_out_of_range_values_do_not_fault(rng: np.random.Generator) -> None:
    table = rng.standard_normal((10, 8)).astype(np.float32)
    out = poisoned((3, 8), "cuda:0")
    cb.ops.embedding_forward(buf(np.array([2, 10, -1], np.int32), "cuda:0"), buf(table, "cuda:0"), out)
    got = out.to_numpy()
    np.testing.assert_array_equal(got[0], table[2])
    assert (got[1:] == 0).all()
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    labels = np.array([1, 4, 2], np.int32)
    loss_sum, dlogits = cb.GpuBuffer.zeros((1,), "float32", "cuda:0"), poisoned((3, 4), "cuda:0")
    cb.ops.cross_entropy(buf(logits, "cuda:0"), buf(labels, "cuda:0"), loss_sum, dlogits=dlogits)
    keep = [0, 2]
    ref = F.cross_entropy(t64(logits[keep]), torch.tensor(labels[keep], dtype=torch.long), reduction="sum")
    assert abs(float(loss_sum.to_numpy()[0]) - float(ref)) <= 1e-6 * float(ref)
    assert (dlogits.to_numpy()[1] == 0).all()


@pytest.mark.gpu
def test_cuda_embedding_backward_and_loss_are_bitwise_cpu_and_repeatable(rng: np.random.Generator) -> None:
    ids = rng.integers(0, 300, 2000)
    grad_out = rng.standard_normal((2000, 96)).astype(np.float32)
    index = cb.ops.embedding_backward_index(ids)
    tables = []
    for dev in ("cpu", "cuda:0", "cuda:0"):
        table = cb.GpuBuffer.zeros((300, 96), "float32", dev)
        cb.ops.embedding_backward(buf(grad_out, dev), *(buf(a, dev) for a in index), table)
        tables.append(table.to_numpy())
    np.testing.assert_array_equal(tables[1], tables[0])
    np.testing.assert_array_equal(tables[2], tables[1])
    logits = rng.standard_normal((1000, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 1000).astype(np.int32)
    sums = []
    for _ in range(2):
        loss_sum = cb.GpuBuffer.zeros((1,), "float32", "cuda:0")
        cb.ops.cross_entropy(buf(logits, "cuda:0"), buf(labels, "cuda:0"), loss_sum)
        sums.append(loss_sum.to_numpy()[0])
    assert sums[0] == sums[1]


# ---- checks ---------------------------------------------------------------------------------


def test_head_ops_reject_bad_input(rng: np.random.Generator) -> None:
    table = buf(rng.standard_normal((10, 4)).astype(np.float32), "cpu")
    out = cb.GpuBuffer.zeros((3, 4), "float32", "cpu")
    with pytest.raises(cb.InvalidArgumentError, match=r"ids\[1\] = 10"):
        cb.ops.embedding_forward(buf(np.array([1, 10, 2], np.int32), "cpu"), table, out)
    assert not out.to_numpy().any()  # refused: nothing written
    with pytest.raises(cb.DtypeError, match="ids must be int32"):
        cb.ops.embedding_forward(buf(np.array([1, 2, 3], np.float32), "cpu"), table, out)
    with pytest.raises(cb.DtypeError, match="table"):
        cb.ops.embedding_forward(buf(np.array([1, 2, 3], np.int32), "cpu"), buf(np.ones((10, 4), np.int32), "cpu"), out)
    with pytest.raises(cb.ShapeError, match="out"):
        cb.ops.embedding_forward(buf(np.array([1, 2], np.int32), "cpu"), table, out)

    grad_out = buf(rng.standard_normal((3, 4)).astype(np.float32), "cpu")
    i32 = lambda *v: buf(np.array(v, np.int32), "cpu")  # noqa: E731
    grad_table = cb.GpuBuffer.zeros((10, 4), "float32", "cpu")
    with pytest.raises(cb.InvalidArgumentError, match="distinct"):
        cb.ops.embedding_backward(grad_out, i32(1, 1), i32(0, 1, 3), i32(0, 1, 2), grad_table)
    with pytest.raises(cb.InvalidArgumentError, match="outside"):
        cb.ops.embedding_backward(grad_out, i32(1, 10), i32(0, 1, 3), i32(0, 1, 2), grad_table)
    with pytest.raises(cb.InvalidArgumentError, match="order"):
        cb.ops.embedding_backward(grad_out, i32(1, 2), i32(0, 1, 3), i32(0, 3, 2), grad_table)
    with pytest.raises(cb.ShapeError, match="offsets"):
        cb.ops.embedding_backward(grad_out, i32(1, 2), i32(0, 3), i32(0, 1, 2), grad_table)
    assert not grad_table.to_numpy().any()

    x = buf(rng.standard_normal((5, 4)).astype(np.float32), "cpu")
    pooled = cb.GpuBuffer.zeros((2, 4), "float32", "cpu")
    with pytest.raises(cb.InvalidArgumentError, match="strictly increase"):
        cb.ops.pool_forward(x, i32(0, 0, 5), pooled)
    with pytest.raises(cb.InvalidArgumentError, match="0 to the token count 5"):
        cb.ops.pool_forward(x, i32(0, 2, 4), pooled)
    with pytest.raises(cb.InvalidArgumentError, match="mode"):
        cb.ops.pool_forward(x, i32(0, 2, 5), pooled, mode="max")
    with pytest.raises(cb.ShapeError):
        cb.ops.pool_backward(pooled, i32(0, 5), x)

    logits = buf(rng.standard_normal((3, 4)).astype(np.float32), "cpu")
    loss_sum = cb.GpuBuffer.zeros((1,), "float32", "cpu")
    with pytest.raises(cb.InvalidArgumentError, match=r"labels\[2\] = 4"):
        cb.ops.cross_entropy(logits, i32(0, 3, 4), loss_sum)
    assert loss_sum.to_numpy()[0] == 0
    with pytest.raises(cb.ShapeError, match="class_weights"):
        cb.ops.cross_entropy(logits, i32(0, 1, 2), loss_sum, class_weights=buf(np.ones(3, np.float32), "cpu"))
    with pytest.raises(cb.DtypeError, match="labels"):
        cb.ops.cross_entropy(logits, buf(np.zeros(3, np.float32), "cpu"), loss_sum)

    rows = buf(rng.standard_normal((4, 6)).astype(np.float32), "cpu")
    w, rstd = buf(np.ones(6, np.float32), "cpu"), cb.GpuBuffer.zeros((5,), "float32", "cpu")
    with pytest.raises(cb.ShapeError, match="rstd"):
        cb.ops.rmsnorm_forward(rows, w, cb.GpuBuffer.zeros((4, 6), "float32", "cpu"), rstd=rstd)
    with pytest.raises(cb.ShapeError, match="rstd"):
        cb.ops.rmsnorm_backward(rows, rows, w, rstd, cb.GpuBuffer.zeros((4, 6), "float32", "cpu"),
                                cb.GpuBuffer.zeros((6,), "float32", "cpu"))


def test_adamw_step_rejects_bad_input(rng: np.random.Generator) -> None:
    p0 = rng.standard_normal(12).astype(np.float32)
    p, g = buf(p0, "cpu"), buf(rng.standard_normal(12).astype(np.float32), "cpu")
    m, v = cb.GpuBuffer.zeros(12, "float32", "cpu"), cb.GpuBuffer.zeros(12, "float32", "cpu")
    with pytest.raises(cb.ShapeError, match="exp_avg"):
        cb.ops.adamw_step(p, g, cb.GpuBuffer.zeros(11, "float32", "cpu"), v, 1, 1e-3)
    with pytest.raises(cb.InvalidArgumentError, match="16-byte"):  # a view one float in
        cb.ops.adamw_step(p.view(1, 8), g.view(0, 8), m.view(0, 8), v.view(0, 8), 1, 1e-3)
    with pytest.raises(cb.InvalidArgumentError, match="beta1"):
        cb.ops.adamw_step(p, g, m, v, 1, 1e-3, beta1=1.0)
    with pytest.raises(cb.InvalidArgumentError, match="step"):
        cb.ops.adamw_step(p, g, m, v, 0, 1e-3)
    np.testing.assert_array_equal(p.to_numpy(), p0)
    with pytest.raises(cb.InvalidArgumentError, match="16-byte"):
        cb.GradNorm("cpu").compute([], buffers=[g.view(1, 4)])
    with pytest.raises(cb.DtypeError):
        cb.GradNorm("cpu").compute([], buffers=[buf(np.ones(4, np.int32), "cpu")])
