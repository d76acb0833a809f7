"""Running a trained classifier: evaluation on labelled data and prediction.

:func:`load_classifier` puts a trained classifier on a device from a run directory, a checkpoint
or an exported ``...ForSequenceClassification`` directory; :func:`evaluate` and :func:`predict`
(``cudablocks classify eval`` / ``predict``) run it forward only, and :func:`run_eval` is the pass
the training loop's evaluations share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cudablocks._core import CudaStream
from cudablocks.classify import data as dataset
from cudablocks.classify.checkpoint import is_checkpoint, read_checkpoint
from cudablocks.classify.data import check_vocab, packed_batches
from cudablocks.classify.loading import build_classifier, resolve_device
from cudablocks.classify.metrics import accuracy, confusion_matrix, macro_f1
from cudablocks.classify.model import Classifier, Mode, Pooling
from cudablocks.classify.settings import TrainSettings
from cudablocks.classify.weights import ModelFiles
from cudablocks.errors import CheckpointError, DataError, InvalidArgumentError

__all__ = ["EvalResult", "evaluate", "load_classifier", "predict", "run_eval"]

# A classifier that only runs forward: no training state, and the layers share one set of saved
# activations (nothing reads them back).
_FORWARD_ONLY: dict[str, Any] = {"trainable": False, "recompute": True}


@dataclass
class EvalResult:
    """Metrics of one pass over a labelled set; ``preds``, ``probs`` and ``labels`` per example in
    order."""

    loss: float
    accuracy: float
    macro_f1: float
    confusion: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    names: list[str]
    labels: np.ndarray


def run_eval(model: Classifier, batches: Sequence[dataset.Batch], weights: np.ndarray | None, names: list[str],
             n_examples: int) -> EvalResult:
    """Forward passes over ``batches``; the loss is weighted like the training loss."""
    probs = np.zeros((n_examples, model.num_labels), dtype=np.float32)
    labels = np.full(n_examples, -1, dtype=np.int64)
    model.loss_sum.fill(0.0, model.stream)
    weight_sum = 0.0
    for b in batches:
        model.forward(b.ids, b.seq_lens, b.cu_seqlens, b.labels, train=False, probs=True)
        probs[b.indices] = model.probabilities(len(b.seq_lens))
        labels[b.indices] = b.labels
        weight_sum += float(np.sum(weights[b.labels])) if weights is not None else len(b.seq_lens)
    loss = model.loss_value() / max(weight_sum, 1e-30)
    preds = probs.argmax(axis=1)
    C = model.num_labels
    return EvalResult(loss=loss, accuracy=accuracy(preds, labels), macro_f1=macro_f1(preds, labels, C),
                      confusion=confusion_matrix(preds, labels, C), preds=preds, probs=probs, names=names,
                      labels=labels)


def load_classifier(path: str | Path, *, device: str = "auto", token_budget: int | None = None,
                    progress: bool = False) -> tuple[Classifier, dataset.LabelMap, dict[str, Any], Any]:
    """A trained classifier from a run directory, a checkpoint directory or an exported full
    classifier: (model, label map, settings, tokenizer)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if token_budget is not None and token_budget < 1:
        raise InvalidArgumentError(f"--token-budget {token_budget}: must be at least 1")
    ckpt_dir = path / "best" if is_checkpoint(path / "best") else path
    dev = resolve_device(device)
    stream = CudaStream(dev)
    if is_checkpoint(ckpt_dir):
        ckpt = read_checkpoint(ckpt_dir, optimizer=False)
        s = TrainSettings(**ckpt.settings)
        label_map = dataset.LabelMap.from_json(ckpt.label_map)
        files = ModelFiles.open(s.model_dir())
        budget = token_budget or s.token_budget
        model = build_classifier(files, mode=Mode(s.mode), num_labels=label_map.num_labels, device=dev, stream=stream,
                                 max_tokens=budget, precision=s.precision, pooling=Pooling(s.pooling),
                                 lora=s.lora_config(), train_embedding=False, seed=s.seed,
                                 trained=ckpt.trainable, progress=progress, **_FORWARD_ONLY)
        return model, label_map, ckpt.settings, dataset.load_tokenizer(s.model_dir())
    files = ModelFiles.open(path)  # an exported ...ForSequenceClassification directory
    score = files.score()
    if score is None:
        raise CheckpointError(f"{path} is neither a cudablocks checkpoint nor a sequence classifier (no score.weight)")
    label_map = dataset.LabelMap.from_json(files.raw_config)
    s = TrainSettings(model=str(path), mode="head", precision="fp32")
    budget = token_budget or s.token_budget
    model = build_classifier(files, mode=Mode.HEAD, num_labels=score.shape[0], device=dev, stream=stream,
                             max_tokens=budget, precision="fp32", pooling=Pooling.LAST, lora=None,
                             train_embedding=False, seed=0, progress=progress, **_FORWARD_ONLY)
    return model, label_map, s.result_defining(), dataset.load_tokenizer(path)


def evaluate(path: str | Path, data_file: str | Path, *, device: str = "auto", token_budget: int | None = None,
             progress: bool = True) -> EvalResult:
    """Accuracy, macro-F1 and the confusion matrix of a trained classifier on a labelled JSONL file."""
    model, label_map, settings, tokenizer = load_classifier(path, device=device, token_budget=token_budget,
                                                            progress=progress)
    examples = dataset.read_jsonl(data_file)
    tok = dataset.tokenize(examples, tokenizer, int(settings.get("max_length", 512)),
                           bool(settings.get("truncate", True)), label_map=label_map)
    check_vocab(tok, model.blocks[0].config.vocab_size, "evaluation data")
    batches = packed_batches(tok, model.max_tokens, shuffle=False, seed=0, epoch=0)
    return run_eval(model, batches, None, label_map.names, len(tok))


def predict(path: str | Path, texts: Sequence[str], *, device: str = "auto", token_budget: int | None = None,
            progress: bool = False) -> list[dict[str, Any]]:
    """The label and class probabilities of each text: ``{"label": name, "probs": {name: p}}``."""
    model, label_map, settings, tokenizer = load_classifier(path, device=device, token_budget=token_budget,
                                                            progress=progress)
    if not texts:
        raise DataError("nothing to predict: no texts given")
    examples = [dataset.Example(text=t, label=None, line=i + 1) for i, t in enumerate(texts)]
    tok = dataset.tokenize(examples, tokenizer, int(settings.get("max_length", 512)), bool(settings.get("truncate", True)))
    check_vocab(tok, model.blocks[0].config.vocab_size, "input texts")
    tok.labels = np.zeros(len(tok), dtype=np.int32)  # any valid class: the loss of unlabelled texts is not used
    batches = packed_batches(tok, model.max_tokens, shuffle=False, seed=0, epoch=0)
    probs = run_eval(model, batches, None, label_map.names, len(tok)).probs
    names = label_map.names
    return [{"label": names[int(p.argmax())], "probs": {n: float(x) for n, x in zip(names, p)}} for p in probs]
