"""The settings of a classify run, their defaults, and the shipped default model and data.

:class:`TrainSettings` is what ``cudablocks classify train`` parses its flags into and what
:func:`cudablocks.classify.trainer.train` takes. Build it with :meth:`TrainSettings.create`,
which gives a run on the shipped model (no ``model``) the defaults tuned for that model
(:data:`SHIPPED_MODEL_DEFAULTS`) wherever a value is not given. A checkpoint stores the settings
that fix the results (:meth:`TrainSettings.result_defining`); resuming with others is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cudablocks.classify.model import Mode, Pooling
from cudablocks.classify.schedule import SCHEDULES
from cudablocks.errors import InvalidArgumentError
from cudablocks.lora import LORA_TARGETS, LoraConfig

__all__ = ["DEFAULT_LR", "MAX_TOKEN_BUDGET", "SHIPPED_MODEL_DEFAULTS", "TrainSettings", "default_assets"]

_ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: The blocks index packed tokens with 32-bit offsets.
MAX_TOKEN_BUDGET = 2**31 - 2

#: Peak learning rates by mode when ``lr`` is None.
DEFAULT_LR: dict[str, float] = {"full": 2e-5, "lora": 2e-4, "head": 1e-3}
#: What :meth:`TrainSettings.create` puts in the settings not given when no model is given (tuned
#: on the shipped model: about 0.9 validation accuracy in 3 epochs); ``lr`` is by mode.
SHIPPED_MODEL_DEFAULTS: dict[str, Any] = {
    "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ("q_proj", "v_proj"), "token_budget": 2048, "epochs": 3.0,
    "warmup_ratio": 0.1, "lr": {"full": 1e-3, "lora": 2e-3, "head": 5e-3},
}


def default_assets() -> Path:
    """The directory of the small model and data set shipped with the package."""
    return Path(str(resources.files("cudablocks.classify") / "assets"))


@dataclass
class TrainSettings:
    """Everything a training run is given (see ``cudablocks classify train --help``)."""

    model: str | None = None  #: model directory; None: the shipped small model
    train_file: str | None = None  #: JSONL; None: the shipped data
    valid_file: str | None = None  #: JSONL; None: a split of train_file (valid_fraction)
    valid_fraction: float = 0.1
    output_dir: str = "cudablocks-classify"
    mode: str = "lora"
    precision: str = "bf16"  #: block GEMMs: fp32, tf32 or bf16 (the CPU computes in fp32)
    pooling: str = "last"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = _ALL_PROJECTIONS
    lora_dropout: float = 0.0  #: PEFT's lora_dropout on the adapters' inputs while training
    train_embeddings: bool = False
    max_length: int = 512
    truncate: bool = True
    token_budget: int = 4096  #: tokens per micro-batch (packed, no padding)
    recompute: bool = False  #: keep one layer's activations, recomputing each in the backward
    grad_accum: int = 1  #: micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int | None = None  #: overrides epochs when given
    lr: float | None = None  #: None: DEFAULT_LR by mode
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    class_weights: str | None = None  #: None, "balanced" or comma-separated weights
    num_labels: int | None = None  #: integer labels: the number of classes (None: the largest label + 1)
    seed: int = 0
    eval_every: int = 0  #: optimizer steps between evaluations; 0: once per epoch
    save_every: int = 0  #: optimizer steps between resumable checkpoints; 0: at evaluations
    metric: str = "accuracy"  #: accuracy, macro_f1 or loss: picks the best checkpoint
    patience: int = 0  #: evaluations without improvement before stopping; 0: never stop early
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    export: bool = False  #: also write a full ...ForSequenceClassification directory at the end
    progress: bool = True

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)

    @classmethod
    def create(cls, **given: Any) -> TrainSettings:
        """Settings from the values given (None counts as not given); with no ``model`` the shipped
        model's tuned values (:data:`SHIPPED_MODEL_DEFAULTS`) replace the defaults not overridden."""
        values = {k: v for k, v in given.items() if v is not None}
        if values.get("model") is None:
            for key, default in SHIPPED_MODEL_DEFAULTS.items():
                if key not in values:
                    mode = values.get("mode", cls.mode)
                    values[key] = default.get(mode) if key == "lr" else default
        return cls(**values)

    # ---- derived values -------------------------------------------------------------------------

    @property
    def peak_lr(self) -> float:
        """The learning rate after warmup: ``lr``, or :data:`DEFAULT_LR` by mode."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.mode, float("nan"))

    def lora_config(self) -> LoraConfig | None:
        if self.mode != Mode.LORA.value:
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets,
                          dropout=self.lora_dropout, seed=self.seed)

    def model_dir(self) -> Path:
        return Path(self.model) if self.model is not None else default_assets() / "model"

    def train_path(self) -> Path:
        return Path(self.train_file) if self.train_file is not None else default_assets() / "data" / "train.jsonl"

    def valid_path(self) -> Path | None:
        if self.valid_file is not None:
            return Path(self.valid_file)
        if self.train_file is None:
            return default_assets() / "data" / "valid.jsonl"
        return None

    def validate(self) -> None:
        """InvalidArgumentError for a value outside its domain, naming the flag."""
        def bad(flag: str, value: Any, why: str) -> None:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} {value!r}: {why}")

        if self.mode not in [m.value for m in Mode]:
            bad("mode", self.mode, f"must be one of {[m.value for m in Mode]}")
        if self.pooling not in [p.value for p in Pooling]:
            bad("pooling", self.pooling, f"must be one of {[p.value for p in Pooling]}")
        if self.precision not in ("fp32", "tf32", "bf16"):
            bad("precision", self.precision, "must be fp32, tf32 or bf16")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, f"must be one of {SCHEDULES}")
        if self.metric not in ("accuracy", "macro_f1", "loss"):
            bad("metric", self.metric, "must be accuracy, macro_f1 or loss")
        for name in ("lora_rank", "max_length", "token_budget", "grad_accum"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be at least 1")
        for name in ("eval_every", "save_every", "patience", "seed"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be >= 0")
        if self.num_labels is not None and self.num_labels < 2:
            bad("num_labels", self.num_labels, "a classifier needs at least 2 labels")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", self.max_steps, "must be at least 1")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            bad("epochs", self.epochs, "must be a positive number")
        if not 0.0 <= self.valid_fraction < 1.0:
            bad("valid_fraction", self.valid_fraction, "must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            bad("warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if not (self.peak_lr > 0 and math.isfinite(self.peak_lr)):
            bad("lr", self.lr, "must be a positive number")
        if not (self.max_grad_norm > 0):
            bad("max_grad_norm", self.max_grad_norm, "must be positive (inf disables clipping)")
        # The optimizer and LoRA check these too, but only once the model is loaded and the run's
        # logs are replaced; checked here they fail first and name the flag.
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, getattr(self, name), "must be in [0, 1)")
        if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            bad("adam_eps", self.adam_eps, "must be a positive number")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", self.weight_decay, "must be a finite number >= 0")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            bad("lora_alpha", self.lora_alpha, "must be a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.token_budget < self.max_length:
            bad("token_budget", self.token_budget, f"must hold one sequence of --max-length {self.max_length}")
        if self.token_budget > MAX_TOKEN_BUDGET:
            bad("token_budget", self.token_budget, f"must be at most {MAX_TOKEN_BUDGET} (32-bit token offsets)")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            bad("lora_targets", ",".join(self.lora_targets), f"unknown {unknown}; known: {list(LORA_TARGETS)}")

    def result_defining(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original to continue exactly."""
        keep = ("model", "train_file", "valid_file", "valid_fraction", "mode", "precision", "pooling",
                "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "train_embeddings", "max_length", "truncate",
                "token_budget", "grad_accum", "epochs", "max_steps", "lr", "schedule", "warmup_ratio",
                "weight_decay", "beta1", "beta2", "adam_eps", "max_grad_norm", "class_weights", "num_labels", "seed")
        d = asdict(self)
        out = {k: d[k] for k in keep}
        out["lora_targets"] = list(out["lora_targets"])
        return out
