"""The training run of the classify pipeline.

:func:`train` is ``cudablocks classify train``: it reads the model directory layer by layer onto
the device, tokenizes and packs the data, and runs optimizer steps of ``grad_accum`` packed
micro-batches each (one host synchronisation per step, to read the loss), evaluating, logging
and checkpointing as it goes. The output directory holds::

    settings.json  label_map.json  metrics.jsonl  metrics.png
    last/      the latest resumable checkpoint       best/   the best one by --metric
    adapter/   (lora mode) a PEFT adapter of best/    model/  (--export) a full classifier of best/
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cudablocks._core import CudaStream
from cudablocks.classify import data as dataset
from cudablocks.classify.atomic import atomic_write_text
from cudablocks.classify.checkpoint import Checkpoint, Progress, is_checkpoint, read_checkpoint, write_checkpoint
from cudablocks.classify.data import check_vocab, packed_batches
from cudablocks.classify.export import export_model, save_peft_adapter
from cudablocks.classify.inference import EvalResult, run_eval
from cudablocks.classify.loading import build_classifier, layer_tensors, progress_bar, resolve_device
from cudablocks.classify.metrics import MetricsLog, read_metrics
from cudablocks.classify.model import Mode, OptimizerHyper, Pooling
from cudablocks.classify.plot import plot_metrics
from cudablocks.classify.schedule import lr_factor
from cudablocks.classify.settings import TrainSettings
from cudablocks.classify.weights import ModelFiles
from cudablocks.errors import CheckpointError, DataError, InvalidArgumentError

__all__ = ["TrainResult", "train"]

@dataclass
class TrainResult:
    """What a training run ends with."""

    output_dir: Path
    steps: int
    train_losses: list[float]
    best_metric: float | None
    best_step: int | None
    last_eval: EvalResult | None
    stopped_early: bool
    interrupted: bool


# ---- data -------------------------------------------------------------------------------------

def _class_weights(spec: str | None, labels: np.ndarray, num_labels: int) -> np.ndarray | None:
    if spec is None:
        return None
    if spec == "balanced":  # scikit-learn's "balanced": n / (classes * count)
        counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
        weights = np.where(counts > 0, labels.size / (num_labels * np.maximum(counts, 1)), 0.0)
        return weights.astype(np.float32)
    try:
        weights = np.array([float(x) for x in spec.split(",")], dtype=np.float32)
    except ValueError as e:
        raise InvalidArgumentError(f"--class-weights {spec!r}: not 'balanced' or comma-separated numbers") from e
    if weights.size != num_labels or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise InvalidArgumentError(f"--class-weights {spec!r}: need {num_labels} finite non-negative numbers")
    return weights


# ---- running ----------------------------------------------------------------------------------

@contextmanager
def _interrupt_flag() -> Iterator[dict[str, bool]]:
    """The first Ctrl-C sets a flag (the loop saves and stops after the current step); the second
    interrupts at once."""
    flag = {"set": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def train(settings: TrainSettings, log: Any = print) -> TrainResult:
    """Runs ``cudablocks classify train`` with ``settings`` (see :class:`TrainSettings`)."""
    settings.validate()
    out = Path(settings.output_dir)
    last_dir, best_dir = out / "last", out / "best"
    if is_checkpoint(last_dir) and not (settings.resume or settings.overwrite):
        raise CheckpointError(f"{out} already holds a checkpoint: pass --resume to continue it or --overwrite "
                              "to start again (the old checkpoints are replaced only once new ones are written)")
    resumed: Checkpoint | None = None
    if settings.resume and is_checkpoint(last_dir):
        resumed = read_checkpoint(last_dir)
        if resumed.settings != settings.result_defining():
            changed = sorted(k for k in set(resumed.settings) | set(settings.result_defining())
                             if resumed.settings.get(k) != settings.result_defining().get(k))
            raise CheckpointError(f"{last_dir} was trained with other settings ({', '.join(changed)}): "
                                  "resuming must use the same ones")
    mode, pooling = Mode(settings.mode), Pooling(settings.pooling)
    device = resolve_device(settings.device)
    stream = CudaStream(device)

    # Data.
    tokenizer = dataset.load_tokenizer(settings.model_dir())
    train_examples = dataset.read_jsonl(settings.train_path())
    valid_path = settings.valid_path()
    if valid_path is not None:
        valid_examples = dataset.read_jsonl(valid_path)
    elif settings.valid_fraction > 0:
        train_examples, valid_examples = dataset.split_validation(train_examples, settings.valid_fraction, settings.seed)
    else:
        valid_examples = []
    label_map = (dataset.LabelMap.from_json(resumed.label_map) if resumed is not None
                 else dataset.LabelMap.from_examples(train_examples, settings.num_labels))
    train_tok = dataset.tokenize(train_examples, tokenizer, settings.max_length, settings.truncate, label_map=label_map)
    valid_tok = (dataset.tokenize(valid_examples, tokenizer, settings.max_length, settings.truncate, label_map=label_map)
                 if valid_examples else None)
    files = ModelFiles.open(settings.model_dir())
    check_vocab(train_tok, files.config.vocab_size, "training data")
    if valid_tok is not None:
        check_vocab(valid_tok, files.config.vocab_size, "validation data")
    C = label_map.num_labels
    if C < 2:
        raise DataError(f"{settings.train_path()}: a classifier needs at least 2 labels, found {label_map.names}")
    class_weights = _class_weights(settings.class_weights, train_tok.labels, C)

    batches_per_epoch = len(dataset.pack_batches(train_tok.lengths, settings.token_budget, shuffle=False, seed=0))
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum)
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    warmup = int(settings.warmup_ratio * total_steps)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"--output {out}: cannot create the run directory ({e.strerror or e})") from e
    log(f"cudablocks classify train: {mode.value} mode on {device.name} ({device.type}); "
        f"{len(train_tok)} training and {len(valid_tok) if valid_tok else 0} validation texts, "
        f"{C} labels; {total_steps} steps of {settings.grad_accum} x {settings.token_budget} tokens")
    if train_tok.truncated:
        log(f"note: {train_tok.truncated} training texts were truncated to {settings.max_length} tokens")

    model = build_classifier(
        files, mode=mode, num_labels=C, device=device, stream=stream, max_tokens=settings.token_budget,
        precision=settings.precision, pooling=pooling, lora=settings.lora_config(),
        train_embedding=settings.train_embeddings, seed=settings.seed, class_weights=class_weights,
        trained=resumed.trainable if resumed is not None else None, progress=settings.progress,
        recompute=settings.recompute)
    if resumed is not None:
        model.load_moments(resumed.optimizer)
    # The run directory changes only now that the model is on the device: a run that fails to
    # start (bad data, out of memory) leaves an earlier run's files as they were.
    atomic_write_text(out / "settings.json", json.dumps(asdict(settings), indent=2, default=list) + "\n")
    label_map.save(out / "label_map.json")
    prog = resumed.progress if resumed is not None else Progress()
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=prog.step if resumed is not None else None)
    valid_batches = (packed_batches(valid_tok, settings.token_budget, shuffle=False, seed=0, epoch=0)
                     if valid_tok is not None else [])
    eval_every = settings.eval_every or steps_per_epoch

    saved: dict[str, Any] = {}  # the progress of the latest last/ checkpoint

    def checkpoint(*paths: Path) -> None:
        """Writes the current state to each of ``paths``, copying it from the device once."""
        values, moments = model.trainable_state()
        for path in paths:
            write_checkpoint(path, Checkpoint(progress=prog, settings=settings.result_defining(),
                                              label_map=label_map.to_json(), trainable=values, optimizer=moments))
        if last_dir in paths:
            saved.update(asdict(prog))

    def evaluate_now() -> EvalResult | None:
        if not valid_batches:
            return None
        assert valid_tok is not None
        r = run_eval(model, valid_batches, class_weights, label_map.names, len(valid_tok))
        metrics.log({"step": prog.step, "epoch": prog.step / steps_per_epoch, "split": "valid", "loss": r.loss,
                     "accuracy": r.accuracy, "macro_f1": r.macro_f1})
        return r

    losses: list[float] = []
    last_eval: EvalResult | None = None
    interrupted = False
    bar = progress_bar(None, settings.progress, "training", total=total_steps, initial=prog.step)

    def say(message: str) -> None:
        """A line of output that does not break the progress bar."""
        if bar is not None:
            bar.write(message)
        else:
            log(message)

    start = time.perf_counter()
    first_step, first_tokens = prog.step, prog.tokens
    with _interrupt_flag() as stop:
        while prog.step < total_steps and not prog.stopped_early:
            groups = packed_batches(train_tok, settings.token_budget, shuffle=True, seed=settings.seed, epoch=prog.epoch)
            steps = [groups[i:i + settings.grad_accum] for i in range(0, len(groups), settings.grad_accum)]
            while prog.step_in_epoch < len(steps) and prog.step < total_steps:
                t0 = time.perf_counter()
                group = steps[prog.step_in_epoch]
                weight_sum = sum(float(np.sum(class_weights[b.labels])) if class_weights is not None
                                 else len(b.seq_lens) for b in group)
                if weight_sum <= 0:
                    raise DataError("a training step's examples all have class weight 0")
                model.zero_grad()
                for micro, b in enumerate(group):
                    model.forward(b.ids, b.seq_lens, b.cu_seqlens, b.labels, train=True, grad_scale=1.0 / weight_sum,
                                  step=(prog.step + 1, micro))
                    model.backward(b.seq_lens, b.embedding_index if model.embedding is not None else None)
                lr = settings.peak_lr * lr_factor(prog.step, total=total_steps, warmup=warmup, schedule=settings.schedule)
                model.optimizer_step(prog.step + 1, OptimizerHyper(
                    lr=lr, beta1=settings.beta1, beta2=settings.beta2, eps=settings.adam_eps,
                    weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm))
                loss = model.loss_value() / weight_sum  # the step's one synchronisation
                grad_norm = model.grad_norm_value()
                tokens = sum(b.num_tokens for b in group)
                prog.step += 1
                prog.step_in_epoch += 1
                prog.tokens += tokens
                losses.append(loss)
                dt = time.perf_counter() - t0
                metrics.log({"step": prog.step, "epoch": prog.epoch + prog.step_in_epoch / len(steps),
                             "split": "train", "loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens_per_s": tokens / dt, "time": time.perf_counter() - start})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
                if not math.isfinite(grad_norm):
                    say(f"step {prog.step}: non-finite gradient norm, the update was skipped")
                at_eval = prog.step % eval_every == 0 or prog.step == total_steps
                due: list[Path] = []  # the checkpoints this step writes
                if at_eval:
                    r = evaluate_now()
                    if r is not None:
                        last_eval = r
                        value = {"accuracy": r.accuracy, "macro_f1": r.macro_f1, "loss": r.loss}[settings.metric]
                        improved = _better(settings.metric, value, prog.best_metric)
                        say(f"step {prog.step}/{total_steps}: validation loss {r.loss:.4f}, accuracy "
                            f"{r.accuracy:.4f}, macro-F1 {r.macro_f1:.4f}" + (" (best so far)" if improved else ""))
                        if improved:
                            prog.best_metric, prog.best_step, prog.evals_without_improvement = value, prog.step, 0
                            due.append(best_dir)
                        else:
                            prog.evals_without_improvement += 1
                            if settings.patience and prog.evals_without_improvement >= settings.patience:
                                prog.stopped_early = True
                        _plot(out)
                if at_eval or (settings.save_every and prog.step % settings.save_every == 0) or stop["set"]:
                    due.append(last_dir)
                if due:
                    checkpoint(*due)
                if stop["set"]:
                    interrupted = True
                    break
                if prog.stopped_early:
                    break
            if interrupted or prog.stopped_early:
                break
            if prog.step_in_epoch >= len(steps):
                prog.epoch += 1
                prog.step_in_epoch = 0
        if bar is not None:
            bar.close()
    if not interrupted:
        final = [] if saved == asdict(prog) else [last_dir]  # unless this very state was just saved
        if not valid_batches:  # nothing to choose by: the final weights are the result
            final.append(best_dir)
        if final:
            checkpoint(*final)
    metrics.close()
    _plot(out)
    elapsed = time.perf_counter() - start
    if prog.step > first_step:
        log(f"trained {prog.step - first_step} steps in {elapsed:.1f} s "
            f"({(prog.tokens - first_tokens) / elapsed:,.0f} tokens/s including evaluation and checkpoints)")
    if interrupted:
        log(f"interrupted: a resumable checkpoint is in {last_dir} (continue with --resume)")
    else:
        _write_outputs(out, best_dir, settings, files, label_map, log)
    return TrainResult(output_dir=out, steps=prog.step, train_losses=losses, best_metric=prog.best_metric,
                       best_step=prog.best_step, last_eval=last_eval, stopped_early=prog.stopped_early,
                       interrupted=interrupted)


def _plot(out: Path) -> None:
    records = read_metrics(out / "metrics.jsonl")
    if not records:
        return
    try:
        plot_metrics(records, out / "metrics.png")
    except ImportError as e:  # an install without its dependencies (pip --no-deps): train on, unplotted
        warnings.warn(f"metrics.png not written: {e}", stacklevel=2)


def _write_outputs(out: Path, best_dir: Path, settings: TrainSettings, files: ModelFiles,
                   label_map: dataset.LabelMap, log: Any) -> None:
    """The PEFT adapter (lora mode) and, with --export, a full classifier, both from best/."""
    best = read_checkpoint(best_dir, optimizer=False)
    cfg = files.config
    lora = settings.lora_config()
    if lora is not None:
        layers = {i: layer_tensors(best.trainable, i) for i in range(cfg.num_hidden_layers)}
        save_peft_adapter(out / "adapter", lora_weights=layers, lora=lora, score_weight=best.trainable["score.weight"],
                          base_model=str(settings.model_dir()), label_map_json=label_map.to_json())
        log(f"PEFT adapter: {out / 'adapter'}")
    if settings.export:
        export_model(best, files, out / "model", lora)
        log(f"full classifier: {out / 'model'}")


