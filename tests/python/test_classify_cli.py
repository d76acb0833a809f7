"""The ``cudablocks classify`` command line, through ``cli.main`` on the CPU.

* every flag of train / eval / predict is documented in ``--help``;
* user errors (missing or bad files, bad data, bad flags, unsupported models, an existing run)
  exit with status 2 and one ``error:`` line, no traceback, and leave the run's checkpoints as
  they were;
* eval's metrics agree with predict's probabilities (recomputed with scikit-learn), an exported
  classifier evaluates like its run and loads in transformers, and the shipped default run learns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
metrics = pytest.importorskip("sklearn.metrics")

from cudablocks import cli  # noqa: E402
from cudablocks.classify.data import load_tokenizer  # noqa: E402
from test_classify_train import LABELS, WORDS, make_data, make_model_dir  # noqa: E402

ACTIONS = ["train", "eval", "predict", "export"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_STEPS = 3


@dataclass
class Env:
    """A tiny model, its data, and a finished full-mode run (with --export) shared by the tests."""

    model: Path
    train: Path
    valid: Path
    run: Path


def train_argv(env: Env, out: Path, *extra: str) -> list[str]:
    """A fast full-mode training command on the tiny model; ``extra`` flags override earlier ones."""
    return ["classify", "train", "--model", str(env.model), "--train", str(env.train), "--valid", str(env.valid),
            "--output", str(out), "--device", "cpu", "--no-progress", "--mode", "full", "--precision", "fp32",
            "--max-steps", str(TRAIN_STEPS), "--token-budget", "128", "--max-length", "32", "--lr", "2e-3",
            "--eval-every", "1", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("cli")
    e = Env(model=make_model_dir(root, int(rng.integers(1 << 30))), train=make_data(root / "train.jsonl", rng, 60),
            valid=make_data(root / "valid.jsonl", rng, 40), run=root / "run")
    assert cli.main(train_argv(e, e.run, "--export")) == 0
    return e


def checkpoints(run: Path) -> dict[str, bytes]:
    """Every file of the run's last/ and best/ checkpoints and its metrics log, by relative path."""
    files = [p for d in ("last", "best") for p in sorted((run / d).rglob("*")) if p.is_file()]
    assert len(files) >= 8, f"{run} holds no checkpoints"
    return {str(p.relative_to(run)): p.read_bytes() for p in [*files, run / "metrics.jsonl"]}


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Runs ``argv``, checks that it failed as a user error, and returns its one ``error:`` line."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def subparser(action: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in ("classify", action):
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser


# ---- help -------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ACTIONS)
def test_help_documents_every_flag(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["classify", action, "--help"]) == 0
    out = capsys.readouterr().out
    arguments = subparser(action)._actions
    assert len(arguments) > 3
    for a in arguments:
        assert a.help and a.help.strip() and a.help != argparse.SUPPRESS, f"{a.option_strings or a.dest}: no help"
        for name in a.option_strings or [a.dest]:  # as a whole word: "--train" is not "--train-embeddings"
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), f"{name} missing from --help"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["classify", "train", "--mode", "everything"], ["classify", "predict", "RUN"],
                 ["classify", "train", "--max-steps", "two"], ["classify"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err


# ---- user errors of train ---------------------------------------------------------------------

def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_lines(n: int) -> list[str]:
    return [json.dumps({"text": f"w{i} w{i + 1} w{i + 2}", "label": LABELS[i % 3]}) for i in range(n)]


def model_copy(env: Env, tmp: Path, *, drop: str | None = None, model_type: str | None = None) -> Path:
    path = Path(shutil.copytree(env.model, tmp / "model-copy"))
    if drop is not None:
        (path / drop).unlink()
    if model_type is not None:
        config = json.loads((path / "config.json").read_text())
        config["model_type"] = model_type
        (path / "config.json").write_text(json.dumps(config))
    return path


Case = Callable[[Env, Path], tuple[list[str], list[str]]]


def missing_train(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "absent.jsonl"
    return ["--train", str(path)], [str(path)]


def missing_model(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    path = tmp / "no-such-model"
    return ["--model", str(path)], [str(path), "does not exist"]


def no_tokenizer(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    return ["--model", str(model_copy(env, tmp, drop="tokenizer.json"))], ["tokenizer.json"]


def malformed_json(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    path = write_lines(tmp / "bad.jsonl", good_lines(2) + ['{"text": "w1 w2", "label": '] + good_lines(3))
    return ["--train", str(path)], [f"{path}:3", "JSON"]


def no_text(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    path = write_lines(tmp / "notext.jsonl", good_lines(1) + ['{"label": "red"}'] + good_lines(3))
    return ["--train", str(path)], [f"{path}:2", '"text"']


def empty_train(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    path = write_lines(tmp / "empty.jsonl", [])
    return ["--train", str(path)], [str(path), "no examples"]


def too_long(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    long_text = json.dumps({"text": " ".join(WORDS[:40]), "label": "red"})
    path = write_lines(tmp / "long.jsonl", good_lines(3) + [long_text] + good_lines(3))
    return ["--train", str(path), "--no-truncate", "--max-length", "32"], [f"{path}:4", "32"]


def label_out_of_range(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    lines = [json.dumps({"text": "w1 w2 w3", "label": i % 3}) for i in range(6)]
    path = write_lines(tmp / "ints.jsonl", lines + [json.dumps({"text": "w4 w5", "label": 3})])
    return ["--train", str(path), "--num-labels", "3"], [f"{path}:7", "3"]


def unsupported_model_type(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    return ["--model", str(model_copy(env, tmp, model_type="gpt2"))], ["gpt2"]


def changed_flag_on_resume(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    return ["--resume", "--lr", "5e-4"], ["lr", "same"]


def missing_device(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    return ["--device", "cuda:99"], ["cuda:99"]


def flag(name: str, value: str, *more: str) -> Case:
    def case(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
        return [name, value, *more], [name]
    case.__name__ = f"flag{name}={value}"
    return case


def output_is_a_file(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    path = write_lines(tmp / "a-file", ["not a directory"])
    return ["--output", str(path)], ["--output", str(path)]


def out_of_memory(env: Env, tmp: Path) -> tuple[list[str], list[str]]:
    # 2e9 tokens x hidden 64 x 4 bytes per activation buffer: far beyond any host's memory.
    return ["--token-budget", "2000000000"], ["out of memory", "bytes"]


TRAIN_ERRORS: list[Case] = [
    missing_train, missing_model, no_tokenizer, malformed_json, no_text, empty_train, too_long,
    unsupported_model_type, changed_flag_on_resume, missing_device, output_is_a_file,
    flag("--lr", "-1"), flag("--lr", "nan"), flag("--token-budget", "16", "--max-length", "32"),
    flag("--max-steps", "0"), flag("--grad-accum", "0"), flag("--valid-fraction", "1.0"),
    flag("--beta1", "1.5"), flag("--beta2", "-0.1"), flag("--adam-eps", "0"), flag("--weight-decay", "-0.1"),
    flag("--lora-alpha", "0", "--mode", "lora"), flag("--lora-targets", "q_proj,bogus_proj", "--mode", "lora"),
    flag("--class-weights", "1,2"), flag("--token-budget", str(2**31)), out_of_memory,
    flag("--lora-dropout", "1.0", "--mode", "lora"), label_out_of_range, flag("--num-labels", "1"), flag("--lora-dropout", "-0.1", "--mode", "lora"),
]


@pytest.mark.parametrize("case", TRAIN_ERRORS, ids=lambda c: c.__name__)
def test_train_user_errors_keep_the_run(case: Case, env: Env, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(env.run, tmp_path / "run"))
    before = checkpoints(run)
    extra, fragments = case(env, tmp_path)
    # --overwrite where not resuming: a failed restart must not cost the previous checkpoints.
    line = error_line(capsys, train_argv(env, run, *extra, *([] if "--resume" in extra else ["--overwrite"])))
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert checkpoints(run) == before
    assert (run / "settings.json").read_bytes() == (env.run / "settings.json").read_bytes()


def test_existing_run_needs_resume_or_overwrite(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(env.run, tmp_path / "run"))
    before = checkpoints(run)
    line = error_line(capsys, train_argv(env, run))
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert checkpoints(run) == before


# ---- user errors of eval and predict ----------------------------------------------------------

def eval_argv(checkpoint: Path, data: Path, *extra: str) -> list[str]:
    return ["classify", "eval", str(checkpoint), str(data), "--device", "cpu", *extra]


@pytest.mark.parametrize("label, fragment", [("purple", "purple"), (3, "out of range"), (-1, "out of range")])
def test_eval_label_outside_the_runs_labels(label: str | int, fragment: str, env: Env, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Integer labels are class ids of the run's label map (3 classes); names must be known ones.
    path = write_lines(tmp_path / "eval.jsonl", good_lines(4) + [json.dumps({"text": "w1 w2", "label": label})])
    before = checkpoints(env.run)
    line = error_line(capsys, eval_argv(env.run, path))
    assert f"{path}:5" in line and fragment in line
    assert checkpoints(env.run) == before


def test_eval_token_budget(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_lines(3) + [json.dumps({"text": " ".join(WORDS[:12]), "label": "red"})]
    path = write_lines(tmp_path / "eval.jsonl", lines)
    line = error_line(capsys, eval_argv(env.run, path, "--token-budget", "8"))
    assert f"{path}:4" in line and "--token-budget" in line
    for budget in ("0", "-5"):
        assert f"--token-budget {budget}" in error_line(capsys, eval_argv(env.run, path, "--token-budget", budget))


def test_predict_output_that_cannot_be_written(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "no-such-dir" / "out.jsonl"
    line = error_line(capsys, ["classify", "predict", str(env.run), "--text", "w1 w2", "--output", str(out),
                               "--device", "cpu"])
    assert str(out) in line


def test_eval_and_predict_refuse_what_is_not_a_classifier(env: Env, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-run"
    assert str(missing) in error_line(capsys, eval_argv(missing, env.valid))
    # A causal LM directory has no classification head.
    assert str(env.model) in error_line(capsys, ["classify", "predict", str(env.model), "--text", "w1",
                                                 "--device", "cpu"])
    absent = tmp_path / "absent.jsonl"
    assert str(absent) in error_line(capsys, ["classify", "predict", str(env.run), "--input", str(absent),
                                              "--device", "cpu"])


# ---- happy paths ------------------------------------------------------------------------------

def test_eval_agrees_with_predict(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(eval_argv(env.run, env.valid, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    out_file = tmp_path / "out.jsonl"
    assert cli.main(["classify", "predict", str(env.run), "--input", str(env.valid), "--output", str(out_file),
                     "--device", "cpu"]) == 0

    truth = [json.loads(line) for line in env.valid.read_text().splitlines()]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["text"] for r in rows] == [t["text"] for t in truth]
    names = result["labels"]
    assert sorted(names) == sorted(LABELS)
    preds = [max(r["probs"], key=r["probs"].get) for r in rows]
    labels = [t["label"] for t in truth]
    assert [r["label"] for r in rows] == preds
    assert result["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(preds, labels)]), abs=1e-12)
    confusion = np.array(result["confusion"])
    assert confusion.sum() == len(truth)
    np.testing.assert_array_equal(confusion, metrics.confusion_matrix(labels, preds, labels=names))
    assert result["macro_f1"] == pytest.approx(
        metrics.f1_score(labels, preds, labels=names, average="macro", zero_division=0), abs=1e-9)

    # The text report says the same, with scikit-learn's per-class recall.
    assert cli.main(eval_argv(env.run, env.valid, "--no-progress")) == 0
    report = capsys.readouterr().out
    assert f"accuracy  {result['accuracy']:.4f}" in report and f"macro-F1  {result['macro_f1']:.4f}" in report
    recall = metrics.recall_score(labels, preds, labels=names, average=None, zero_division=0)
    for name, r in zip(names, recall):
        row = next(line for line in report.splitlines() if line.startswith(name + " ") and len(line.split()) == 5)
        assert row.split()[2] == f"{r:.4f}"


def test_predict_texts(env: Env, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 15)))) for _ in range(3)]
    argv = ["classify", "predict", str(env.run), "--device", "cpu"]
    for t in texts:
        argv += ["--text", t]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert sorted(r["probs"]) == sorted(LABELS)
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert min(r["probs"].values()) > 0.0
        assert r["label"] == max(r["probs"], key=r["probs"].get)


def test_export_evaluates_like_its_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    results = []
    for checkpoint in (env.run, env.run / "model"):
        assert cli.main(eval_argv(checkpoint, env.valid, "--json")) == 0
        results.append(json.loads(capsys.readouterr().out))
    ours, exported = results
    assert exported["accuracy"] == ours["accuracy"]
    assert exported["confusion"] == ours["confusion"]
    assert exported["loss"] == pytest.approx(ours["loss"], rel=1e-5)

    # transformers' own classifier of the export, on the same texts.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(env.run / "model")
    tokenizer = load_tokenizer(env.run / "model")
    examples = [json.loads(line) for line in env.valid.read_text().splitlines()]
    encoded = [tokenizer.encode(e["text"]).ids for e in examples]
    ids = torch.full((len(encoded), max(map(len, encoded))), model.config.pad_token_id)
    for row, seq in zip(ids, encoded):
        row[:len(seq)] = torch.tensor(seq)  # right padding: the classifier pools the last non-pad token
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != model.config.pad_token_id).long()).logits
    preds = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert ours["accuracy"] == pytest.approx(np.mean([p == e["label"] for p, e in zip(preds, examples)]), abs=1e-12)


def test_metrics_log_and_plot(env: Env) -> None:
    records = [json.loads(line) for line in (env.run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, TRAIN_STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in records if r["split"] == "valid"] == list(range(1, TRAIN_STEPS + 1))
    assert (env.run / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE


def test_default_run_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["classify", "train", "--output", str(tmp_path), "--no-progress", "--device", "cpu",
                     "--max-steps", "30"]) == 0
    assert f"run directory: {tmp_path}" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_valid = [r for r in records if r["split"] == "valid"][-1]
    assert last_valid["step"] == 30
    assert last_valid["accuracy"] > 0.5  # 4 balanced classes: chance is 0.25


def test_console_script_is_installed() -> None:
    """The `cudablocks` command that pip installs runs the same main (skipped in a source checkout)."""
    import shutil
    import subprocess

    exe = shutil.which("cudablocks")
    if exe is None:
        pytest.skip("the cudablocks console script is not installed (source checkout)")
    import cudablocks

    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"cudablocks {cudablocks.__version__}"


def test_num_labels_gives_absent_classes_a_row(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Integer labels 0..2 in the data with --num-labels 5: a 5-way head and label map."""
    lines = [json.dumps({"text": " ".join(WORDS[i: i + 4]), "label": i % 3}) for i in range(12)]
    data = write_lines(tmp_path / "ints.jsonl", lines)
    run = tmp_path / "run"
    argv = train_argv(env, run, "--train", str(data), "--valid", str(data), "--num-labels", "5")
    assert cli.main(argv) == 0
    capsys.readouterr()
    names = json.loads((run / "label_map.json").read_text())["id2label"]
    assert names == {str(i): str(i) for i in range(5)}
    assert cli.main(["classify", "predict", str(run), "--text", "w1 w2", "--device", "cpu", "--no-progress"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert sorted(row["probs"]) == [str(i) for i in range(5)] and abs(sum(row["probs"].values()) - 1) < 1e-5
