"""Resumable training checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint is a directory, written atomically (the previous one survives a crash mid-write)::

    state.json              progress (step, epoch, position), best metric, early-stopping count,
                            and the run settings that must not change on resume
    trainable.safetensors   every trained tensor, named as in transformers' state dict
                            ("model.layers.3.self_attn.q_proj.lora_A.weight", "score.weight", ...)
    optimizer.safetensors   their AdamW moments: "exp_avg.<name>", "exp_avg_sq.<name>"
    label_map.json          the label names and ids

Data order, LoRA initialisation and the head's initialisation all follow from the seed, so the
progress counters are all the state the data side needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from cudablocks.classify.atomic import atomic_directory, restore_interrupted
from cudablocks.errors import CheckpointError

__all__ = ["CHECKPOINT_VERSION", "Checkpoint", "Progress", "is_checkpoint", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_VERSION = 1


@dataclass
class Progress:
    """Where training stands: optimizer steps taken, the epoch and the next step's index in it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


@dataclass
class Checkpoint:
    """A checkpoint in memory. ``settings`` are the run settings that fix the results."""

    progress: Progress
    settings: dict[str, Any]
    label_map: dict[str, Any]
    trainable: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint written by :func:`write_checkpoint` (restoring it first
    if a crash mid-replacement left it aside)."""
    restore_interrupted(path)
    return (Path(path) / "state.json").is_file()


def write_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Writes ``ckpt`` to the directory ``path``, replacing what is there only once complete."""
    state = {"version": CHECKPOINT_VERSION, "progress": asdict(ckpt.progress), "settings": ckpt.settings}
    with atomic_directory(Path(path)) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in ckpt.trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file({k: np.ascontiguousarray(v) for k, v in ckpt.optimizer.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "label_map.json").write_text(json.dumps(ckpt.label_map, indent=2) + "\n")
        # state.json last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def read_checkpoint(path: str | Path, *, optimizer: bool = True) -> Checkpoint:
    """Reads a checkpoint directory; CheckpointError names what is missing or damaged."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a cudablocks checkpoint (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text())
        label_map = json.loads((path / "label_map.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors")) if optimizer else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the checkpoint in {path}: {e}") from e
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path / 'state.json'}: checkpoint version {state.get('version')!r}, "
                              f"this cudablocks reads version {CHECKPOINT_VERSION}")
    try:
        progress = Progress(**state["progress"])
        settings = dict(state["settings"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'state.json'} is incomplete: {e}") from e
    return Checkpoint(progress=progress, settings=settings, label_map=label_map, trainable=trainable,
                      optimizer=moments)
