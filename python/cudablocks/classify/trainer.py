"""Training, evaluation and prediction runs of the classify pipeline.

:func:`train` is ``cudablocks classify train``: it reads the model directory layer by layer onto
the device, tokenizes and packs the data, and runs optimizer steps of ``grad_accum`` packed
micro-batches each (one host synchronisation per step, to read the loss), evaluating, logging
and checkpointing as it goes. The output directory holds::

    settings.json  label_map.json  metrics.jsonl  metrics.png
    last/      the latest resumable checkpoint       best/   the best one by --metric
    adapter/   (lora mode) a PEFT adapter of best/    model/  (--export) a full classifier of best/

:func:`evaluate` and :func:`predict` load a checkpoint (or an exported classifier directory) the
same way and run forward only.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cudablocks
from cudablocks import nf4
from cudablocks._core import BlockArena, CudaBlock, CudaStream, Device
from cudablocks.classify import data as dataset
from cudablocks.classify.atomic import atomic_write_text
from cudablocks.classify.checkpoint import Checkpoint, Progress, is_checkpoint, read_checkpoint, write_checkpoint
from cudablocks.classify.export import export_classifier, merge_lora, save_peft_adapter
from cudablocks.classify.metrics import MetricsLog, accuracy, confusion_matrix, macro_f1, read_metrics
from cudablocks.classify.model import LAYER_PREFIX, Classifier, Mode, OptimizerHyper, Pooling
from cudablocks.classify.plot import plot_metrics
from cudablocks.classify.schedule import lr_factor
from cudablocks.classify.settings import TrainSettings
from cudablocks.classify.weights import ModelFiles
from cudablocks.errors import CheckpointError, DataError, InvalidArgumentError
from cudablocks.lora import LoraConfig

__all__ = ["EvalResult", "TrainResult", "evaluate", "export_run", "load_classifier", "predict", "train"]

#: The block size NF4 blocks quantize float weights with (bitsandbytes' default).
NF4_BLOCKSIZE = 64


@dataclass
class EvalResult:
    """Metrics of one pass over a labelled set; ``preds`` and ``probs`` per example in order."""

    loss: float
    accuracy: float
    macro_f1: float
    confusion: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    names: list[str]


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


def resolve_device(spec: str) -> Device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return Device("cuda:0" if cudablocks.cuda_device_count() > 0 else "cpu")
    return Device(spec)


# ---- building the model on the device ----------------------------------------------------------

def _score_init(num_labels: int, hidden: int, files: ModelFiles, seed: int) -> np.ndarray:
    """transformers' init of the ``score`` Linear: normal(0, initializer_range), seeded here."""
    std = float(files.raw_config.get("initializer_range", 0.02))
    return np.random.default_rng([seed, 1]).normal(0.0, std, (num_labels, hidden)).astype(np.float32)


def _layer_tensors(trainable: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    prefix = LAYER_PREFIX.format(layer)
    return {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)}


def build_classifier(
    files: ModelFiles,
    *,
    mode: Mode,
    num_labels: int,
    device: Device,
    stream: CudaStream,
    max_tokens: int,
    precision: str,
    pooling: Pooling,
    lora: LoraConfig | None,
    train_embedding: bool,
    seed: int,
    class_weights: np.ndarray | None = None,
    trained: dict[str, np.ndarray] | None = None,
    progress: bool = False,
    recompute: bool = False,
) -> Classifier:
    """The model of ``files`` on ``device``, one layer at a time (host memory peaks near one
    layer). ``trained`` holds tensors of a checkpoint that replace the files' (and LoRA's init).
    The blocks share one arena for their transient memory and, with ``recompute``, their saved
    activations too (see :class:`Classifier`)."""
    cfg = files.config
    trained = trained or {}
    blocks: list[CudaBlock] = []
    memory: dict[str, Any] = dict(arena=BlockArena(device), share_activations=recompute)
    quantized = files.quantization is not None
    if quantized and mode is Mode.FULL:
        raise InvalidArgumentError(f"{files.path} is a 4-bit checkpoint: full mode needs float weights; use --mode lora or head")
    layers = range(cfg.num_hidden_layers)
    for i in _progress(layers, progress, "loading layers"):
        weights = files.layer_weights(i)
        ours = _layer_tensors(trained, i)
        if mode is Mode.LORA or (mode is Mode.HEAD and quantized):
            compute = "fp32" if precision == "fp32" else precision
            block = CudaBlock.nf4(cfg, i, weights, device, max_tokens, lora=lora, compute=compute, **memory)
            lora_part = {k: v for k, v in ours.items() if ".lora_" in k}
            if lora_part:
                block.upload_lora_weights(lora_part, stream)
        else:
            weights.update(ours)
            block = CudaBlock.fp32(cfg, i, weights, device, max_tokens, precision=precision, **memory)
        blocks.append(block)
        del weights
    emb_name, norm_name = "model.embed_tokens.weight", "model.norm.weight"
    if emb_name in trained:
        embedding = trained[emb_name]
    else:
        embedding = files.embedding("float32" if train_embedding else files.embedding_dtype())
    final_norm = trained.get(norm_name, files.final_norm())
    if "score.weight" in trained:
        score = trained["score.weight"]
    else:
        existing = files.score()
        score = existing if existing is not None and existing.shape[0] == num_labels else _score_init(
            num_labels, cfg.hidden_size, files, seed)
    return Classifier(blocks, embedding, final_norm, score, mode=mode, pooling=pooling, eps=cfg.rms_norm_eps,
                      device=device, stream=stream, train_embedding=train_embedding, class_weights=class_weights,
                      recompute=recompute)


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


def _batches(tok: dataset.TokenizedSet, budget: int, *, shuffle: bool, seed: int, epoch: int) -> list[dataset.Batch]:
    too_long = np.flatnonzero(tok.lengths > budget)
    if too_long.size:  # checked here, where the example's file and line are known
        i = int(too_long[0])
        where = f"{tok.paths[i]}:{tok.lines[i]}" if tok.paths[i] else f"line {tok.lines[i]}"
        raise DataError(f"{where}: the text has {len(tok.ids[i])} tokens, more than the token budget of {budget}; "
                        "use a larger --token-budget")
    groups = dataset.pack_batches(tok.lengths, budget, shuffle=shuffle, seed=seed, epoch=epoch)
    return [dataset.make_batch(tok, g) for g in groups]


def _check_vocab(tok: dataset.TokenizedSet, vocab_size: int, what: str) -> None:
    for i, ids in enumerate(tok.ids):
        if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            raise DataError(f"{tok.paths[i]}:{tok.lines[i]}: the tokenizer gives token id {int(ids.max())}, "
                            f"outside the model's vocabulary of {vocab_size} ({what}: tokenizer and model disagree)")


# ---- running ----------------------------------------------------------------------------------

def _progress(items: Any, enabled: bool, desc: str, total: int | None = None, initial: int = 0) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, initial=initial, dynamic_ncols=True, leave=False)


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
                      confusion=confusion_matrix(preds, labels, C), preds=preds, probs=probs, names=names)


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
    _check_vocab(train_tok, files.config.vocab_size, "training data")
    if valid_tok is not None:
        _check_vocab(valid_tok, files.config.vocab_size, "validation data")
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
    valid_batches = (_batches(valid_tok, settings.token_budget, shuffle=False, seed=0, epoch=0)
                     if valid_tok is not None else [])
    eval_every = settings.eval_every or steps_per_epoch

    def checkpoint(path: Path) -> None:
        values, moments = model.trainable_state()
        write_checkpoint(path, Checkpoint(progress=prog, settings=settings.result_defining(),
                                          label_map=label_map.to_json(), trainable=values, optimizer=moments))

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
    bar = _progress(None, settings.progress, "training", total=total_steps, initial=prog.step)

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
            groups = _batches(train_tok, settings.token_budget, shuffle=True, seed=settings.seed, epoch=prog.epoch)
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
                            checkpoint(best_dir)
                        else:
                            prog.evals_without_improvement += 1
                            if settings.patience and prog.evals_without_improvement >= settings.patience:
                                prog.stopped_early = True
                        _plot(out)
                if at_eval or (settings.save_every and prog.step % settings.save_every == 0) or stop["set"]:
                    checkpoint(last_dir)
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
        checkpoint(last_dir)
        if not valid_batches:  # nothing to choose by: the final weights are the result
            checkpoint(best_dir)
    metrics.close()
    _plot(out)
    elapsed = time.perf_counter() - start
    if prog.step > first_step:
        log(f"trained {prog.step - first_step} steps in {elapsed:.1f} s "
            f"({(prog.tokens - first_tokens) / elapsed:,.0f} tokens/s including evaluation and checkpoints)")
    if interrupted:
        log(f"interrupted: a resumable checkpoint is in {last_dir} (continue with --resume)")
    else:
        _write_outputs(out, best_dir, settings, files, label_map, device, log)
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
                   label_map: dataset.LabelMap, device: Device, log: Any) -> None:
    """The PEFT adapter (lora mode) and, with --export, a full classifier, both from best/."""
    best = read_checkpoint(best_dir, optimizer=False)
    cfg = files.config
    lora = settings.lora_config()
    if lora is not None:
        layers = {i: _layer_tensors(best.trainable, i) for i in range(cfg.num_hidden_layers)}
        save_peft_adapter(out / "adapter", lora_weights=layers, lora=lora, score_weight=best.trainable["score.weight"],
                          base_model=str(settings.model_dir()), label_map_json=label_map.to_json())
        log(f"PEFT adapter: {out / 'adapter'}")
    if settings.export:
        export_model(best, files, out / "model", lora)
        log(f"full classifier: {out / 'model'}")


def _nf4_round_trip(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The projection weights as the NF4 blocks compute with them (quantized as the blocks do)."""
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith("_proj.weight"):
            out[name] = nf4.dequantize(nf4.quantize(w, NF4_BLOCKSIZE), "float32").to_numpy()
    return out


def _dequantized(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A layer of a bitsandbytes 4-bit checkpoint with its projections dequantized to float32 (the
    values its NF4 blocks compute with) and the bitsandbytes entries dropped."""
    out = {name: w for name, w in weights.items() if not name.endswith("_proj.weight") and "_proj.weight." not in name}
    for name in weights:
        if name.endswith("_proj.weight"):
            t = nf4.Nf4Tensor.from_bnb_state_dict(weights, name[: -len("weight")])
            out[name] = nf4.dequantize(t, "float32").to_numpy()
    return out


def export_model(ckpt: Checkpoint, files: ModelFiles, directory: Path, lora: LoraConfig | None,
                 dtype: str = "float32") -> None:
    """A full ``...ForSequenceClassification`` directory of a checkpoint, in ``dtype``. Where the
    blocks were NF4 (lora mode, or a 4-bit checkpoint) the projections are the dequantized weights
    with the adapters merged, so the export computes what the trained model computed."""
    cfg = files.config
    quantized = files.quantization is not None

    def layers() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(cfg.num_hidden_layers):
            weights = files.layer_weights(i)
            ours = _layer_tensors(ckpt.trainable, i)
            if quantized:
                weights = _dequantized(weights)
            elif lora is not None:
                weights = _nf4_round_trip(weights)
            if lora is not None:
                weights = merge_lora(weights, ours, lora.scale)
            else:
                weights.update(ours)
            yield i, weights

    config = files.raw_config
    config.pop("quantization_config", None)
    export_classifier(directory, config_dict=config, layers=layers(),
                      embedding=ckpt.trainable.get("model.embed_tokens.weight", files.embedding("float32")),
                      final_norm=ckpt.trainable.get("model.norm.weight", files.final_norm()),
                      score_weight=ckpt.trainable["score.weight"], label_map_json=ckpt.label_map,
                      dtype=dtype, tokenizer_dir=files.path)


def export_run(run: str | Path, directory: str | Path, dtype: str = "float32") -> Path:
    """``cudablocks classify export``: a full classifier directory from a run's best checkpoint
    (or from a checkpoint directory itself)."""
    run = Path(run)
    ckpt_dir = run / "best" if is_checkpoint(run / "best") else run
    if not is_checkpoint(ckpt_dir):
        raise CheckpointError(f"{run} is neither a classify run directory nor a checkpoint")
    ckpt = read_checkpoint(ckpt_dir, optimizer=False)
    s = TrainSettings(**ckpt.settings)
    export_model(ckpt, ModelFiles.open(s.model_dir()), Path(directory), s.lora_config(), dtype)
    return Path(directory)


# ---- evaluation and prediction ------------------------------------------------------------------

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
                                 trained=ckpt.trainable, progress=progress)
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
                             train_embedding=False, seed=0, progress=progress)
    return model, label_map, s.result_defining(), dataset.load_tokenizer(path)


def evaluate(path: str | Path, data_file: str | Path, *, device: str = "auto", token_budget: int | None = None,
             progress: bool = True) -> EvalResult:
    """Accuracy, macro-F1 and the confusion matrix of a trained classifier on a labelled JSONL file."""
    model, label_map, settings, tokenizer = load_classifier(path, device=device, token_budget=token_budget,
                                                            progress=progress)
    examples = dataset.read_jsonl(data_file)
    tok = dataset.tokenize(examples, tokenizer, int(settings.get("max_length", 512)),
                           bool(settings.get("truncate", True)), label_map=label_map)
    _check_vocab(tok, model.blocks[0].config.vocab_size, "evaluation data")
    batches = _batches(tok, model.max_tokens, shuffle=False, seed=0, epoch=0)
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
    _check_vocab(tok, model.blocks[0].config.vocab_size, "input texts")
    tok.labels = np.zeros(len(tok), dtype=np.int32)  # any valid class: the loss of unlabelled texts is not used
    batches = _batches(tok, model.max_tokens, shuffle=False, seed=0, epoch=0)
    probs = run_eval(model, batches, None, label_map.names, len(tok)).probs
    names = label_map.names
    return [{"label": names[int(p.argmax())], "probs": {n: float(x) for n, x in zip(names, p)}} for p in probs]
