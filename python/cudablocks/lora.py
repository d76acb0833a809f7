"""LoRA adapters (PEFT semantics) for nf4 blocks: :class:`LoraConfig`.

An adapter on a projection ``y = x W^T`` adds ``scale * (x A^T) B^T`` with ``A`` ``[rank, in]``
(PEFT's ``kaiming_uniform_(a=sqrt(5))``: uniform in ``±1/sqrt(in)``) and ``B`` ``[out, rank]``
(zeros), ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``). The tensors are
named as PEFT names them, relative to the layer: ``self_attn.q_proj.lora_A.weight``, ...

**Dropout** (PEFT's ``lora_dropout``, inverted): with ``dropout = p > 0`` a training forward computes
``y = x W^T + scale * (dropout(x) A^T) B^T``, each adapted projection with a mask of its own over
its input ``[tokens, in_features]`` (q, k and v read the same ``x`` under three masks), kept
elements multiplied by ``1 / (1 - p)``; the frozen product never sees the mask. ``forward`` and
``backward_lora`` take the training step as ``dropout_step`` (equal for the two; the classify
trainer passes its optimizer step and the micro-batch's index); without one (inference) nothing is
dropped. A mask is a pure function of (``seed``, layer index, projection, ``dropout_step``, token
row, feature), the same bits on the CPU and CUDA backends, so a resumed run draws the masks of the
original. With all arithmetic on unsigned 64-bit integers modulo 2^64::

    mix(z)       = splitmix64's output function:  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
                                                  z = (z ^ (z >> 27)) * 0x94D049BB133111EB
                                                  z =  z ^ (z >> 31)
    G            = 0x9E3779B97F4A7C15
    absorb(k, w) = mix((k ^ w) + G)
    key          = absorb(absorb(absorb(absorb(0, seed), layer_idx), projection), dropout_step)
    kept(t, f)   = mix(key + (t * in_features + f + 1) * G) >> 32  >=  floor(p * 2^32)

with ``projection`` the index of the name in :data:`LORA_TARGETS` and ``t`` the token's row in the
packed batch. :func:`cudablocks.ops.dropout` applies such a mask for a given key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["LORA_TARGETS", "LoraConfig"]

#: The projections an adapter may target (PEFT's ``target_modules`` names).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """``rank`` (PEFT's ``r``), ``alpha`` (``lora_alpha``), ``targets`` (``target_modules``),
    ``use_rslora``, ``dropout`` (``lora_dropout``, in [0, 1); see the module's docstring) and
    ``seed`` (of A's init and of the dropout masks).

    Validated when a block is made with it: unknown targets, a rank below 1, a non-positive alpha
    or a dropout outside [0, 1) raise InvalidArgumentError.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))
    use_rslora: bool = False
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        """The factor on ``(x A^T) B^T``: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank
