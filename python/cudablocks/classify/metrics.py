"""Evaluation metrics of the classify pipeline and the metrics log.

``preds`` and ``labels`` are integer class ids ``0..num_labels-1``. Macro-F1 matches
scikit-learn's ``f1_score(average="macro", zero_division=0)``: the mean F1 over the classes that
occur in the labels or the predictions (a class absent from both is left out of the mean).

:class:`MetricsLog` writes one JSON object per line (``metrics.jsonl``), e.g.
``{"step": 100, "epoch": 0.5, "split": "train", "loss": 0.41, "lr": 2e-05, "tokens_per_s": 51234.0,
"time": 12.3}`` or ``{"step": 100, "split": "valid", "loss": 0.38, "accuracy": 0.87, "macro_f1": 0.85}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from cudablocks.classify.atomic import atomic_write_text
from cudablocks.errors import DataError, InvalidArgumentError, ShapeError

__all__ = [
    "MetricsLog",
    "accuracy",
    "confusion_matrix",
    "format_confusion",
    "format_report",
    "macro_f1",
    "read_metrics",
]


def _class_ids(preds: Any, labels: Any, num_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """preds and labels as int64 arrays of one non-empty length, ids checked against num_labels."""
    p = np.asarray(preds)
    t = np.asarray(labels)
    if p.ndim != 1 or p.shape != t.shape:
        raise ShapeError(f"preds and labels must be 1-D of the same length, got shapes {p.shape} and {t.shape}")
    if p.size == 0:
        raise InvalidArgumentError("no predictions to score")
    if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
        raise InvalidArgumentError(f"preds and labels must be integer class ids, got {p.dtype} and {t.dtype}")
    if num_labels is not None:
        for name, a in (("preds", p), ("labels", t)):
            if a.min() < 0 or a.max() >= num_labels:
                raise InvalidArgumentError(f"{name} hold class ids outside 0..{num_labels - 1}")
    return p.astype(np.int64), t.astype(np.int64)


def accuracy(preds: Any, labels: Any) -> float:
    """The fraction of predictions equal to their label."""
    p, t = _class_ids(preds, labels)
    return float(np.mean(p == t))


def confusion_matrix(preds: Any, labels: Any, num_labels: int) -> np.ndarray:
    """int64 ``[num_labels, num_labels]`` counts: row = true class, column = predicted class."""
    p, t = _class_ids(preds, labels, num_labels)
    return np.bincount(t * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (0 where undefined, as zero_division=0) and support."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    # 2tp / (2tp + fp + fn) is F1 without dividing by precision + recall, which may both be 0.
    denominator = predicted + support
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return precision, recall, f1, support


def _macro_f1_of(matrix: np.ndarray) -> float:
    """The mean F1 over the classes that occur in the labels or the predictions."""
    _, _, f1, _ = _per_class(matrix)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    return float(f1[present].mean())


def macro_f1(preds: Any, labels: Any, num_labels: int) -> float:
    """The unweighted mean of the per-class F1 scores over the classes present in the labels or
    the predictions (scikit-learn's ``f1_score(average="macro", zero_division=0)``)."""
    return _macro_f1_of(confusion_matrix(preds, labels, num_labels))


def format_confusion(matrix: np.ndarray, names: Sequence[str]) -> str:
    """The confusion matrix as an aligned text table, true classes down, predicted across."""
    matrix = np.asarray(matrix)
    if matrix.shape != (len(names), len(names)):
        n = len(names)
        raise ShapeError(f"a confusion matrix of {n} classes must have shape ({n}, {n}), got {matrix.shape}")
    corner = "true \\ pred"
    first = max([len(corner), *map(len, names)])
    width = max([len(n) for n in names] + [len(str(v)) for v in matrix.ravel()])
    lines = [corner.ljust(first) + "".join(f"  {n:>{width}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(first) + "".join(f"  {int(v):>{width}}" for v in row))
    return "\n".join(lines)


def format_report(preds: Any, labels: Any, names: Sequence[str]) -> str:
    """A text report: accuracy, macro-F1, per-class precision/recall/F1/support and the
    confusion matrix, for class ids ``preds`` and ``labels`` of the classes ``names``."""
    matrix = confusion_matrix(preds, labels, len(names))
    precision, recall, f1, support = _per_class(matrix)
    total = int(matrix.sum())
    first = max([len("class"), *map(len, names)])
    lines = [
        f"accuracy  {np.trace(matrix) / total:.4f}  ({int(np.trace(matrix))}/{total})",
        f"macro-F1  {_macro_f1_of(matrix):.4f}",
        "",
        f"{'class':<{first}}  precision  recall      f1  support",
    ]
    for i, name in enumerate(names):
        lines.append(f"{name:<{first}}  {precision[i]:9.4f}  {recall[i]:6.4f}  {f1[i]:6.4f}  {int(support[i]):7d}")
    lines += ["", format_confusion(matrix, names)]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers, which json can write."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to the metrics log")


class MetricsLog:
    """Appends metric records to a JSONL file, one object per line, flushed after each record so
    that a crash loses nothing already logged and the file can be watched while training runs.

    A new log (``resume_step=None``) replaces any file at ``path``. Resuming from a checkpoint at
    step S (``resume_step=S``) keeps the records up to step S and drops later ones, which the
    resumed run will log again.
    """

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        # Rewritten atomically so that an interrupted start leaves the old log whole.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        """Appends one record: ``step`` (int) and ``split`` ("train" or "valid") are required,
        other fields (loss, lr, accuracy, macro_f1, epoch, tokens_per_s, time, ...) optional."""
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise InvalidArgumentError(f"a metrics record needs an integer 'step', got {step!r}")
        split = record.get("split")
        if split not in ("train", "valid"):
            raise InvalidArgumentError(f"a metrics record needs 'split' 'train' or 'valid', got {split!r}")
        self._file.write(json.dumps(record, default=_plain) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file (further :meth:`log` calls fail)."""
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log, in order. A last line without its newline (a write cut
    short by a crash) is ignored; any other bad line raises DataError naming the line."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: cannot read the metrics log ({e})") from e
    lines = text.split("\n")
    records = []
    # After the final "\n" comes "" (a complete file) or a torn last record; either way, skip it.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{number}: malformed JSON ({e.msg})") from e
        if not isinstance(record, dict) or "step" not in record or "split" not in record:
            raise DataError(f'{name}:{number}: a metrics record must be an object with "step" and "split"')
        records.append(record)
    return records
