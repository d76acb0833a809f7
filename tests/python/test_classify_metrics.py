"""Metrics of the classify pipeline against scikit-learn on random predictions (absent classes
included), the text tables, the metrics log (round trip, resume, torn last line), and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cudablocks.classify.metrics import (
    MetricsLog,
    accuracy,
    confusion_matrix,
    format_confusion,
    format_report,
    macro_f1,
    read_metrics,
)
from cudablocks.classify.plot import plot_metrics
from cudablocks.errors import DataError, InvalidArgumentError, ShapeError

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def random_predictions(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """preds and labels over num_labels classes, some of which occur in neither, some in only one."""
    num_labels = int(rng.integers(2, 9))
    n = int(rng.integers(1, 60))
    label_classes = rng.choice(num_labels, size=int(rng.integers(1, num_labels + 1)), replace=False)
    pred_classes = rng.choice(num_labels, size=int(rng.integers(1, num_labels + 1)), replace=False)
    labels = rng.choice(label_classes, size=n)
    # Mostly right where the true class may be predicted, so that F1 is not always near 0.
    preds = np.where(np.isin(labels, pred_classes) & (rng.random(n) < 0.6), labels, rng.choice(pred_classes, size=n))
    return preds, labels, num_labels


@pytest.mark.parametrize("trial", range(20))
def test_metrics_match_scikit_learn(rng: np.random.Generator, trial: int) -> None:
    preds, labels, num_labels = random_predictions(rng)
    assert accuracy(preds, labels) == pytest.approx(sklearn_metrics.accuracy_score(labels, preds), abs=1e-12)
    assert macro_f1(preds, labels, num_labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, preds, average="macro", zero_division=0), abs=1e-12
    )
    np.testing.assert_array_equal(
        confusion_matrix(preds, labels, num_labels),
        sklearn_metrics.confusion_matrix(labels, preds, labels=list(range(num_labels))),
    )


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(ShapeError):
        accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(InvalidArgumentError):
        accuracy(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(InvalidArgumentError, match="preds"):
        macro_f1(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(InvalidArgumentError):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 2)


def parse_table(text: str) -> tuple[list[str], list[str], np.ndarray]:
    """Column names, row names and numbers of a format_confusion table."""
    header, *rows = text.splitlines()
    columns = header.split()[3:]  # after "true \\ pred"
    names = [r.split()[0] for r in rows]
    values = np.array([[int(v) for v in r.split()[1:]] for r in rows])
    return columns, names, values


def test_format_confusion_is_an_aligned_table(rng: np.random.Generator) -> None:
    num_labels = int(rng.integers(2, 6))
    names = [f"c{i}" + "x" * int(rng.integers(0, 12)) for i in range(num_labels)]
    matrix = rng.integers(0, 10 ** int(rng.integers(1, 6)), size=(num_labels, num_labels))

    text = format_confusion(matrix, names)
    columns, rows, values = parse_table(text)
    assert columns == names and rows == names
    np.testing.assert_array_equal(values, matrix)
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to one width
    with pytest.raises(ShapeError):
        format_confusion(matrix, names[:-1])


def test_format_report_per_class_numbers_match_scikit_learn(rng: np.random.Generator) -> None:
    preds, labels, num_labels = random_predictions(rng)
    names = [f"class_{i}" for i in range(num_labels)]
    report = format_report(preds, labels, names)

    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, preds, labels=list(range(num_labels)), zero_division=0
    )
    lines = report.splitlines()
    assert lines[0].split()[1] == f"{sklearn_metrics.accuracy_score(labels, preds):.4f}"
    for i, name in enumerate(names):
        row = next(line for line in lines if line.startswith(name + " ") and len(line.split()) == 5)
        assert row.split()[1:] == [f"{precision[i]:.4f}", f"{recall[i]:.4f}", f"{f1[i]:.4f}", str(int(support[i]))]
    assert report.endswith(format_confusion(confusion_matrix(preds, labels, num_labels), names))


def random_records(rng: np.random.Generator, steps: int) -> list[dict]:
    records: list[dict] = []
    for step in range(1, steps + 1):
        records.append({"step": step, "epoch": step / steps, "split": "train", "loss": float(rng.random()),
                        "lr": float(rng.random() * 1e-4), "tokens_per_s": float(rng.random() * 1e5)})
        if step % 5 == 0:
            records.append({"step": step, "split": "valid", "loss": float(rng.random()),
                            "accuracy": float(rng.random()), "macro_f1": float(rng.random())})
    return records


def test_metrics_log_round_trip_flushes_each_record(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 999, "split": "train"}\n')  # a new log replaces an old file
    records = random_records(rng, 12)
    with MetricsLog(path) as log:
        for i, record in enumerate(records):
            # numpy scalars are what a training loop has at hand
            log.log({k: np.float32(v) if k == "loss" else v for k, v in record.items()})
            assert len(read_metrics(path)) == i + 1  # readable while the log is open
    got = read_metrics(path)
    assert [r["step"] for r in got] == [r["step"] for r in records]
    for g, r in zip(got, records):
        assert g.keys() == r.keys()
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6)


def test_metrics_log_resume_keeps_records_up_to_the_step(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "metrics.jsonl"
    records = random_records(rng, 20)
    with MetricsLog(path) as log:
        for record in records:
            log.log(record)
    resume = int(rng.integers(1, 20))
    with MetricsLog(path, resume_step=resume) as log:
        log.log({"step": resume + 1, "split": "train", "loss": 0.5})
    assert read_metrics(path) == [r for r in records if r["step"] <= resume] + [
        {"step": resume + 1, "split": "train", "loss": 0.5}
    ]


def test_metrics_log_refuses_records_without_step_or_split(tmp_path: Path) -> None:
    with MetricsLog(tmp_path / "m.jsonl") as log:
        with pytest.raises(InvalidArgumentError, match="step"):
            log.log({"split": "train", "loss": 1.0})
        with pytest.raises(InvalidArgumentError, match="split"):
            log.log({"step": 1, "split": "test"})


def test_read_metrics_skips_a_torn_last_line_and_names_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    assert read_metrics(path) == [{"step": 1, "split": "train"}]
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2\n{"step": 3, "split": "train"}\n')
    with pytest.raises(DataError, match="m.jsonl:2: malformed JSON"):
        read_metrics(path)
    path.write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(DataError, match="m.jsonl:1:"):
        read_metrics(path)


def test_plot_metrics_writes_a_png(tmp_path: Path, rng: np.random.Generator) -> None:
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    png = tmp_path / "metrics.png"
    plot_metrics(random_records(rng, 30), png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png"]  # no temporary file left
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # the user's pyplot is not touched

    plot_metrics([], png)  # before any record: empty panels, still a valid image
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
