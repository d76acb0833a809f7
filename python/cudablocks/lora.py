"""LoRA adapters (PEFT semantics) for nf4 blocks: :class:`LoraConfig`.

An adapter on a projection ``y = x W^T`` adds ``scale * (x A^T) B^T`` with ``A`` ``[rank, in]``
(PEFT's ``kaiming_uniform_(a=sqrt(5))``: uniform in ``±1/sqrt(in)``) and ``B`` ``[out, rank]``
(zeros), ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``). The tensors are
named as PEFT names them, relative to the layer: ``self_attn.q_proj.lora_A.weight``, ...
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
    ``use_rslora``, ``dropout`` (``lora_dropout``; only 0 for now) and ``seed`` (of A's init).

    Validated when a block is made with it: unknown targets raise InvalidArgumentError, dropout > 0
    UnsupportedOperationError.
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
