"""The classifier on the device: embedding, blocks, pooling, final norm, ``score`` and the loss.

One micro-batch of packed sequences runs as::

    ids ──embedding──▶ h[0] ──block 0──▶ h[1] ── … ──▶ h[L]
    h[L] ──pool (last token)──▶ pooled ──RMSNorm──▶ normed ──score──▶ logits ──cross-entropy

(``mean`` pooling normalises every token first, then averages: RMSNorm is per row, so "pool then
norm" equals transformers' "norm then pick the last token", but not a mean.) The backward runs the
same chain in reverse into the gradients of whatever the mode trains:

* ``full``: every block weight, the final norm and the head (and the embedding if asked);
* ``lora``: the LoRA adapters of NF4 blocks, and the head;
* ``head``: the head only (the blocks run forward only).

With LoRA dropout, a training micro-batch draws its masks from its (optimizer step, micro-batch
index) pair, passed to the blocks as their ``dropout_step``: the same pair always draws the same
masks (a resumed run continues exactly), evaluation draws none.

Every buffer is allocated once for ``max_tokens`` packed tokens; a step uploads the batch's ids,
sequence offsets and labels into them and queues everything on one stream, with no host
synchronisation until the caller reads the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from cudablocks import ops
from cudablocks._core import CudaBlock, CudaGradWorkspace, CudaStream, Device, GpuBlockOptimizerState, GpuBuffer, GradNorm
from cudablocks.errors import CheckpointError, InvalidArgumentError

__all__ = ["LAYER_PREFIX", "Classifier", "Mode", "OptimizerHyper", "Pooling"]

#: The state-dict prefix of decoder layer i (transformers' names).
LAYER_PREFIX = "model.layers.{}."


class Mode(str, Enum):
    """What a training run updates."""

    FULL = "full"
    LORA = "lora"
    HEAD = "head"


class Pooling(str, Enum):
    """How a sequence's hidden states become one vector."""

    LAST = "last"
    MEAN = "mean"


@dataclass(frozen=True)
class OptimizerHyper:
    """AdamW's settings for one step (``lr`` already scheduled)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = float("inf")


def _dropout_step(step: int, micro_batch: int) -> int:
    """The blocks' ``dropout_step`` of a micro-batch: the optimizer step in the high 32 bits, the
    micro-batch's index within the step in the low 32 (distinct masks for every micro-batch)."""
    if not (0 <= step < 2**32 and 0 <= micro_batch < 2**32):
        raise InvalidArgumentError(f"step {step} / micro-batch {micro_batch}: each must be in [0, 2^32)")
    return (step << 32) | micro_batch


class _Param:
    """A trainable tensor outside the blocks, with its gradient and AdamW moments on the device."""

    def __init__(self, name: str, value: np.ndarray, device: Device, stream: CudaStream, *, decay: bool) -> None:
        self.name = name
        self.decay = decay
        self.value = GpuBuffer.from_numpy(np.ascontiguousarray(value, dtype=np.float32), device, stream=stream)
        self.grad = GpuBuffer.zeros(value.shape, "float32", device, stream=stream)
        self.exp_avg = GpuBuffer.zeros(value.shape, "float32", device, stream=stream)
        self.exp_avg_sq = GpuBuffer.zeros(value.shape, "float32", device, stream=stream)


class Classifier:
    """A decoder model with a classification head, resident on one device.

    Args:
        blocks: the decoder layers in order (fp32 blocks for ``full``; fp32 or NF4 for ``head``;
            NF4 blocks with LoRA for ``lora``), each made for ``max_tokens``.
        embedding: the token embedding table ``[V, H]``, float32 or bfloat16 (frozen unless
            ``train_embedding``; a trained table is kept in float32).
        final_norm: the final RMSNorm weight ``[H]``.
        score: the head's initial weight ``[num_labels, H]``.
        mode, pooling: see :class:`Mode` and :class:`Pooling`.
        eps: the RMSNorm epsilon of the model.
        class_weights: optional ``[num_labels]`` weights of the cross-entropy.
        recompute: the blocks share one set of saved activations (``share_activations`` in one
            :class:`cudablocks.BlockArena`): the backward runs each block's forward again first.
        trainable: False for a classifier that only runs forward (evaluation, prediction): no
            gradient buffers, workspaces or optimizer states are allocated.
    """

    def __init__(
        self,
        blocks: list[CudaBlock],
        embedding: np.ndarray,
        final_norm: np.ndarray,
        score: np.ndarray,
        *,
        mode: Mode,
        pooling: Pooling,
        eps: float,
        device: Device,
        stream: CudaStream,
        train_embedding: bool = False,
        class_weights: np.ndarray | None = None,
        recompute: bool = False,
        trainable: bool = True,
    ) -> None:
        if not blocks:
            raise InvalidArgumentError("a classifier needs at least one block")
        self.mode = Mode(mode)
        self.pooling = Pooling(pooling)
        self.blocks = blocks
        self.device = device
        self.stream = stream
        self.eps = float(eps)
        self.max_tokens = min(b.max_tokens for b in blocks)
        self.num_labels, self.hidden = (int(d) for d in score.shape)
        if self.mode is Mode.LORA and not all(b.has_lora for b in blocks):
            raise InvalidArgumentError("lora mode needs blocks made with a LoraConfig")
        if train_embedding and self.mode is not Mode.FULL:
            raise InvalidArgumentError("the embedding can be trained in full mode only")
        self.train_embedding = train_embedding
        self.recompute = recompute

        T, H, C = self.max_tokens, self.hidden, self.num_labels
        dev, st = device, stream
        # Head-side trainables; norms are not decayed (as transformers' Trainer groups them).
        self.score = _Param("score.weight", score, dev, st, decay=True)
        self.norm = _Param("model.norm.weight", final_norm, dev, st, decay=False)
        self.embedding: _Param | None = None
        if train_embedding:
            self.embedding = _Param("model.embed_tokens.weight", embedding.astype(np.float32), dev, st, decay=True)
            self.table = self.embedding.value
        else:
            table = embedding if embedding.dtype == np.float32 or embedding.dtype.name == "bfloat16" else embedding.astype(np.float32)
            self.table = GpuBuffer.from_numpy(np.ascontiguousarray(table), dev, stream=st)

        # Activations: the input of every block and the top one; two gradient buffers in turn.
        self.hidden_states = [GpuBuffer.empty((T, H), "float32", dev) for _ in range(len(blocks) + 1)]
        self.grads = [GpuBuffer.empty((T, H), "float32", dev) for _ in range(2 if trainable else 0)]
        self.ids = GpuBuffer.zeros((T,), "int32", dev, stream=st)
        self.cu_seqlens = GpuBuffer.zeros((T + 1,), "int32", dev, stream=st)
        self.labels = GpuBuffer.zeros((T,), "int32", dev, stream=st)
        self.emb_rows = GpuBuffer.zeros((T,), "int32", dev, stream=st)
        self.emb_offsets = GpuBuffer.zeros((T + 1,), "int32", dev, stream=st)
        self.emb_order = GpuBuffer.zeros((T,), "int32", dev, stream=st)
        # Per-sequence rows: at most one sequence per token. Mean pooling also normalises every token.
        rows = T
        self.pooled = GpuBuffer.empty((rows, H), "float32", dev)
        self.normed = GpuBuffer.empty((rows, H), "float32", dev)
        self.rstd = GpuBuffer.empty((T,), "float32", dev)
        self.logits = GpuBuffer.empty((rows, C), "float32", dev)
        self.dlogits = GpuBuffer.empty((rows, C), "float32", dev)
        self.probs = GpuBuffer.empty((rows, C), "float32", dev)
        self.dnormed = GpuBuffer.empty((rows, H), "float32", dev)
        self.normed_tokens = GpuBuffer.empty((T, H), "float32", dev) if self.pooling is Pooling.MEAN else None
        self.loss_sum = GpuBuffer.zeros((1,), "float32", dev, stream=st)
        self.class_weights = (
            None if class_weights is None
            else GpuBuffer.from_numpy(np.ascontiguousarray(class_weights, dtype=np.float32), dev, stream=st)
        )

        # Block gradients and optimizer states of the trained blocks.
        self.workspaces: list[CudaGradWorkspace] = []
        self.block_states: list[GpuBlockOptimizerState] = []
        if trainable and self.mode is Mode.FULL:
            self.workspaces = [b.new_grad_workspace(st) for b in blocks]
            self.block_states = [b.init_optimizer_state(st) for b in blocks]
        elif trainable and self.mode is Mode.LORA:
            self.workspaces = [b.new_lora_grad_workspace(st) for b in blocks]
            self.block_states = [b.init_lora_optimizer_state(st) for b in blocks]
        self.grad_norm = GradNorm(dev)
        self._dropout_step: int | None = None  # of the latest forward, for its backward

    # ---- the head-side parameters ---------------------------------------------------------------

    def head_params(self) -> list[_Param]:
        """The trained tensors outside the blocks, in a fixed order."""
        params = [self.score]
        if self.mode is Mode.FULL:
            params.append(self.norm)
        if self.embedding is not None:
            params.append(self.embedding)
        return params

    # ---- one micro-batch ------------------------------------------------------------------------

    def _upload(self, ids: np.ndarray, cu_seqlens: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
        T, B = int(ids.shape[0]), int(labels.shape[0])
        if T > self.max_tokens:
            raise InvalidArgumentError(f"a batch of {T} tokens exceeds the token budget {self.max_tokens}")
        self.ids.view(0, (T,)).copy_from_numpy(ids, self.stream)
        self.cu_seqlens.view(0, (B + 1,)).copy_from_numpy(cu_seqlens, self.stream)
        self.labels.view(0, (B,)).copy_from_numpy(labels, self.stream)
        return T, B

    def forward(
        self,
        ids: np.ndarray,
        seq_lens: list[int],
        cu_seqlens: np.ndarray,
        labels: np.ndarray,
        *,
        train: bool,
        grad_scale: float = 1.0,
        probs: bool = False,
        step: tuple[int, int] | None = None,
    ) -> None:
        """Queues the forward of one packed micro-batch and adds its weighted loss sum to
        :attr:`loss_sum`. With ``train`` the logits' gradient (``grad_scale`` times the per-row
        gradient of the weighted loss sum) is kept for :meth:`backward`; with ``probs`` the
        softmax is written to :attr:`probs`. ``step``: (1-based optimizer step, micro-batch index
        within it) of a training micro-batch, which picks its LoRA dropout masks; None (evaluation):
        no dropout."""
        self._dropout_step = None if step is None else _dropout_step(*step)
        T, B = self._upload(ids, cu_seqlens, labels)
        st, H, C = self.stream, self.hidden, self.num_labels
        h = [buf.view(0, (T, H)) for buf in self.hidden_states]
        ops.embedding_forward(self.ids.view(0, (T,)), self.table, h[0], stream=st)
        for i, block in enumerate(self.blocks):
            block.forward(h[i], h[i + 1], seq_lens, st, dropout_step=self._dropout_step)
        cu = self.cu_seqlens.view(0, (B + 1,))
        pooled, normed = self.pooled.view(0, (B, H)), self.normed.view(0, (B, H))
        if self.pooling is Pooling.LAST:
            ops.pool_forward(h[-1], cu, pooled, mode="last", stream=st)
            ops.rmsnorm_forward(pooled, self.norm.value, normed, self.eps, stream=st, rstd=self.rstd.view(0, (B,)))
        else:
            assert self.normed_tokens is not None
            tokens = self.normed_tokens.view(0, (T, H))
            ops.rmsnorm_forward(h[-1], self.norm.value, tokens, self.eps, stream=st, rstd=self.rstd.view(0, (T,)))
            ops.pool_forward(tokens, cu, normed, mode="mean", stream=st)
        logits = self.logits.view(0, (B, C))
        ops.gemm(normed, self.score.value, logits, trans_b=True, stream=st)
        ops.cross_entropy(
            logits,
            self.labels.view(0, (B,)),
            self.loss_sum,
            dlogits=self.dlogits.view(0, (B, C)) if train else None,
            probs=self.probs.view(0, (B, C)) if probs else None,
            class_weights=self.class_weights,
            grad_scale=grad_scale,
            stream=st,
        )

    def backward(self, seq_lens: list[int], emb_index: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """Queues the backward of the micro-batch last passed to :meth:`forward` (``train=True``),
        adding into the gradients of the mode's trainables. ``emb_index`` is
        ``ops.embedding_backward_index(ids)`` when the embedding is trained."""
        T, B = int(sum(seq_lens)), len(seq_lens)
        st, H, C = self.stream, self.hidden, self.num_labels
        dlogits, normed = self.dlogits.view(0, (B, C)), self.normed.view(0, (B, H))
        # score: dW [C, H] += dlogits^T normed; the gradient into the features, dnormed = dlogits W.
        ops.gemm(dlogits, normed, self.score.grad, trans_a=True, beta=1.0, stream=st)
        if self.mode is Mode.HEAD:
            return
        dnormed = self.dnormed.view(0, (B, H))
        ops.gemm(dlogits, self.score.value, dnormed, stream=st)

        h = [buf.view(0, (T, H)) for buf in self.hidden_states]
        g_out, g_in = (buf.view(0, (T, H)) for buf in self.grads)
        cu = self.cu_seqlens.view(0, (B + 1,))
        # The norm weight's gradient is accumulated even when frozen (into its unused grad buffer).
        if self.pooling is Pooling.LAST:
            # dpooled goes through g_in's memory, free until the first block's backward.
            dpooled = self.grads[1].view(0, (B, H))
            ops.rmsnorm_backward(dnormed, self.pooled.view(0, (B, H)), self.norm.value, self.rstd.view(0, (B,)),
                                 dpooled, self.norm.grad, stream=st)
            ops.pool_backward(dpooled, cu, g_out, mode="last", stream=st)
        else:
            assert self.normed_tokens is not None
            dtokens = self.normed_tokens.view(0, (T, H))
            ops.pool_backward(dnormed, cu, dtokens, mode="mean", stream=st)
            ops.rmsnorm_backward(dtokens, h[-1], self.norm.value, self.rstd.view(0, (T,)), g_out, self.norm.grad,
                                 stream=st)
        for i in reversed(range(len(self.blocks))):
            block, ws = self.blocks[i], self.workspaces[i]
            if self.recompute and i < len(self.blocks) - 1:
                # The shared activations hold the layer above's: restore this layer's. Its output goes
                # to h[i + 1] again (the same values; the layer above is done with it).
                block.forward(h[i], h[i + 1], seq_lens, st, dropout_step=self._dropout_step)
            if self.mode is Mode.FULL:
                block.backward(h[i], g_out, g_in, seq_lens, st, ws)
            else:
                block.backward_lora(h[i], g_out, g_in, seq_lens, st, ws, dropout_step=self._dropout_step)
            g_out, g_in = g_in, g_out
        if self.embedding is not None:
            assert emb_index is not None
            rows, offsets, order = emb_index
            U = int(rows.shape[0])
            self.emb_rows.view(0, (U,)).copy_from_numpy(rows, st)
            self.emb_offsets.view(0, (U + 1,)).copy_from_numpy(offsets, st)
            self.emb_order.view(0, (T,)).copy_from_numpy(order, st)
            ops.embedding_backward(g_out, self.emb_rows.view(0, (U,)), self.emb_offsets.view(0, (U + 1,)),
                                   self.emb_order.view(0, (T,)), self.embedding.grad, stream=st)

    # ---- the optimizer --------------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Zeroes every gradient and the loss sum (the start of an optimizer step)."""
        for ws in self.workspaces:
            ws.zero_(self.stream)
        for p in self.head_params():
            p.grad.fill(0.0, self.stream)
        self.norm.grad.fill(0.0, self.stream)
        self.loss_sum.fill(0.0, self.stream)

    def optimizer_step(self, step: int, hyper: OptimizerHyper) -> None:
        """Clips by the global gradient norm and takes AdamW step ``step`` (1-based) on every
        trainable tensor; a non-finite norm skips the step (see :meth:`grad_norm_value`)."""
        heads = self.head_params()
        self.grad_norm.compute(self.workspaces, self.stream, buffers=[p.grad for p in heads])
        common: dict[str, Any] = dict(beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps, stream=self.stream)
        for block, state, ws in zip(self.blocks, self.block_states, self.workspaces):
            if self.mode is Mode.FULL:
                block.optimizer_step(state, step, hyper.lr, weight_decay=hyper.weight_decay, grad_ws=ws,
                                     grad_norm=self.grad_norm, max_grad_norm=hyper.max_grad_norm, **common)
            else:
                block.lora_optimizer_step(state, step, hyper.lr, weight_decay=hyper.weight_decay, lora_ws=ws,
                                          grad_norm=self.grad_norm, max_grad_norm=hyper.max_grad_norm, **common)
        for p in heads:
            ops.adamw_step(p.value, p.grad, p.exp_avg, p.exp_avg_sq, step, hyper.lr,
                           weight_decay=hyper.weight_decay if p.decay else 0.0,
                           grad_norm=self.grad_norm, max_grad_norm=hyper.max_grad_norm, **common)

    def loss_value(self) -> float:
        """The loss sum queued so far (waits for the stream: the step's one synchronisation)."""
        return float(self.loss_sum.to_numpy(self.stream)[0])

    def grad_norm_value(self) -> float:
        """The global gradient norm of the latest :meth:`optimizer_step` (waits for the stream)."""
        return self.grad_norm.value(self.stream)

    def probabilities(self, batch_size: int) -> np.ndarray:
        """The softmax of the latest forward with ``probs=True``, ``[batch_size, num_labels]``."""
        return self.probs.view(0, (batch_size, self.num_labels)).to_numpy(self.stream)

    # ---- state for checkpoints ------------------------------------------------------------------

    def trainable_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Host copies of every trained tensor and of its AdamW moments, named as in transformers'
        state dict: ``({"model.layers.3.self_attn.q_proj.lora_A.weight": ..., "score.weight": ...},
        {"exp_avg.<name>": ..., "exp_avg_sq.<name>": ...})``."""
        values: dict[str, np.ndarray] = {}
        moments: dict[str, np.ndarray] = {}
        for i, (block, state) in enumerate(zip(self.blocks, self.block_states)):
            prefix = LAYER_PREFIX.format(i)
            weights = (block.download_weights(self.stream) if self.mode is Mode.FULL
                       else block.download_lora_weights(self.stream))
            values.update({prefix + k: v for k, v in weights.items()})
            for key, v in state.to_numpy(self.stream).items():
                kind, name = key.split(".", 1)  # "exp_avg.self_attn.q_proj.weight"
                moments[f"{kind}.{prefix}{name}"] = v
        for p in self.head_params():
            values[p.name] = p.value.to_numpy(self.stream)
            moments[f"exp_avg.{p.name}"] = p.exp_avg.to_numpy(self.stream)
            moments[f"exp_avg_sq.{p.name}"] = p.exp_avg_sq.to_numpy(self.stream)
        return values, moments

    def load_moments(self, moments: dict[str, np.ndarray]) -> None:
        """Restores the AdamW moments of :meth:`trainable_state` (resume; the trained values come in
        when the blocks and the classifier are made). CheckpointError names a missing one."""
        for i, state in enumerate(self.block_states):
            prefix = LAYER_PREFIX.format(i)
            mine = {}
            for key, v in moments.items():
                kind, name = key.split(".", 1)
                if name.startswith(prefix):
                    mine[f"{kind}.{name[len(prefix):]}"] = v
            state.load_numpy(mine, self.stream)
        for p in self.head_params():
            for kind, buf in (("exp_avg", p.exp_avg), ("exp_avg_sq", p.exp_avg_sq)):
                if f"{kind}.{p.name}" not in moments:
                    raise CheckpointError(f"the checkpoint has no AdamW moments {kind} of {p.name}")
                buf.copy_from_numpy(np.ascontiguousarray(moments[f"{kind}.{p.name}"], dtype=np.float32), self.stream)
        self.stream.synchronize()  # the host arrays may go once this returns
