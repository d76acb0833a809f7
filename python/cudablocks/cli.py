"""The ``cudablocks`` command line: ``cudablocks classify train | eval | predict | export``.

User errors (bad data, missing files, bad flags, out of GPU memory) print one ``error:`` line and
exit with status 2; an interrupted run exits with 130 after saving a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cudablocks.errors import CudaBlocksError, InvalidArgumentError, OutOfMemoryError

__all__ = ["main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from cudablocks.classify.settings import DEFAULT_LR, SHIPPED_MODEL_DEFAULTS, TrainSettings

    d = TrainSettings()

    def default(key: str) -> str:
        """Help text of a setting whose default depends on whether a model is given."""
        mine = DEFAULT_LR if key == "lr" else getattr(d, key)
        shipped = SHIPPED_MODEL_DEFAULTS[key]
        if isinstance(mine, tuple):
            mine, shipped = ",".join(mine), ",".join(shipped)
        return f"default: {mine} ({shipped} for the shipped model)"

    p = sub.add_parser(
        "train", help="fine-tune a sequence classifier",
        description="Fine-tune a decoder model (Qwen3, Qwen2, Llama) as a sequence classifier. With no "
                    "arguments, trains on the small model and data set shipped with cudablocks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="Hugging Face model directory (config.json, safetensors, tokenizer.json); "
                                   "default: the shipped small Qwen3 model")
    g.add_argument("--train", dest="train_file", help="training JSONL, one {\"text\": ..., \"label\": ...} per "
                                                      "line (integer labels or names); default: the shipped data")
    g.add_argument("--valid", dest="valid_file", help="validation JSONL; default: --valid-fraction of --train")
    g.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="share of --train held out for validation when --valid is not given (0: none)")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens kept per text")
    g.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="refuse texts longer than --max-length instead of truncating them")
    g.add_argument("--output", dest="output_dir", default=d.output_dir,
                   help="run directory: checkpoints, metrics.jsonl, metrics.png, adapter/")
    g = p.add_argument_group("what to train")
    g.add_argument("--mode", choices=["full", "lora", "head"], default=d.mode,
                   help="full: every weight (fp32 blocks); lora: LoRA adapters on frozen NF4 blocks (QLoRA); "
                        "head: the classification head only")
    g.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=d.precision,
                   help="how the blocks' matrix products compute on a GPU (the CPU computes in fp32)")
    g.add_argument("--pooling", choices=["last", "mean"], default=d.pooling,
                   help="last: the last token's state, as transformers' classifiers; mean: the average")
    g.add_argument("--lora-rank", type=int, help="LoRA rank r; " + default("lora_rank"))
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale = alpha / r); " + default("lora_alpha"))
    g.add_argument("--lora-targets", help="comma-separated projections that get adapters; " + default("lora_targets"))
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout,
                   help="LoRA dropout (PEFT's lora_dropout) while training: each element of an adapter's input is "
                        "dropped with this probability and the rest scaled by 1/(1-p); the masks follow from "
                        "--seed and the step, so --resume continues exactly")
    g.add_argument("--train-embeddings", action="store_true", help="also train the token embedding (full mode)")
    g = p.add_argument_group("optimization")
    g.add_argument("--token-budget", type=int,
                   help="tokens per micro-batch: texts are packed back to back without padding; "
                        + default("token_budget"))
    g.add_argument("--recompute", action="store_true",
                   help="keep one layer's activations instead of every layer's, recomputing each layer's "
                        "forward in the backward (gradient checkpointing: far less GPU memory, ~1/3 more compute)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, help="passes over the training data; " + default("epochs"))
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, help="peak learning rate; by mode " + default("lr"))
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.schedule,
                   help="decay after warmup")
    g.add_argument("--warmup-ratio", type=float, help="share of steps with linear warmup; " + default("warmup_ratio"))
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (not applied to norm weights)")
    g.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW epsilon")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="clip the global gradient norm to this (inf: no clipping)")
    g.add_argument("--num-labels", type=int,
                   help="with integer labels: the number of classes (default: the largest label + 1); a label "
                        "outside [0, N) is an error naming its line")
    g.add_argument("--class-weights", help="'balanced' or comma-separated weights of the cross-entropy per label")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of data order and initialisation")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: each epoch)")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="steps between resumable checkpoints (0: at each evaluation)")
    g.add_argument("--metric", choices=["accuracy", "macro_f1", "loss"], default=d.metric,
                   help="validation metric that picks the best checkpoint")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many evaluations without improvement (0: never)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start again in an --output that holds a run")
    g.add_argument("--export", action="store_true",
                   help="also write a full ...ForSequenceClassification directory (LoRA merged) to OUTPUT/model")
    g.add_argument("--device", default=d.device, help="cpu, cuda:N, or auto (the first GPU if any)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, macro-F1 and confusion matrix on labelled data",
                       description="Evaluate a trained classifier (a run directory, a checkpoint or an exported "
                                   "classifier directory) on a labelled JSONL file.")
    p.add_argument("checkpoint", help="run directory (its best/ checkpoint), checkpoint, or exported classifier")
    p.add_argument("data", help="labelled JSONL file")
    p.add_argument("--device", default="auto", help="cpu, cuda:N, or auto")
    p.add_argument("--token-budget", type=int, help="tokens per batch (default: the training run's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label texts",
                       description="Label texts with a trained classifier; prints or writes one JSON object per "
                                   "text with its label and the probability of every label.")
    p.add_argument("checkpoint", help="run directory (its best/ checkpoint), checkpoint, or exported classifier")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to label (repeatable)")
    src.add_argument("--input", help="JSONL file with a \"text\" per line (labels, if any, are ignored)")
    p.add_argument("--output", help="JSONL file to write (default: standard output)")
    p.add_argument("--device", default="auto", help="cpu, cuda:N, or auto")
    p.add_argument("--token-budget", type=int, help="tokens per batch (default: the training run's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a full ...ForSequenceClassification directory",
                       description="Write the best checkpoint of a run as a full transformers sequence "
                                   "classifier (LoRA merged; NF4 weights dequantized), loadable with "
                                   "AutoModelForSequenceClassification.from_pretrained.")
    p.add_argument("checkpoint", help="run directory (its best/ checkpoint) or checkpoint directory")
    p.add_argument("output", help="directory to write (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the written weights")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line."""
    from cudablocks import __version__

    parser = argparse.ArgumentParser(prog="cudablocks", description="Decoder-transformer blocks on NVIDIA GPUs.")
    parser.add_argument("--version", action="version", version=f"cudablocks {__version__}")
    top = parser.add_subparsers(dest="command", required=True)
    classify = top.add_parser("classify", help="fine-tune and use sequence classifiers",
                              description="Fine-tune and use sequence classifiers.")
    sub = classify.add_subparsers(dest="action", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _export_parser(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from cudablocks.classify.settings import TrainSettings
    from cudablocks.classify.trainer import train

    values = {k: v for k, v in vars(args).items() if k not in ("command", "action")}
    if values["lora_targets"] is not None:
        values["lora_targets"] = tuple(t.strip() for t in values["lora_targets"].split(",") if t.strip())
    result = train(TrainSettings.create(**values))
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.last_eval is not None:
        r = result.last_eval
        print(f"validation: loss {r.loss:.4f}, accuracy {r.accuracy:.4f}, macro-F1 {r.macro_f1:.4f}"
              + (f" (best {result.best_metric:.4f} at step {result.best_step})" if result.best_metric is not None else ""))
    print(f"run directory: {result.output_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cudablocks.classify.inference import evaluate
    from cudablocks.classify.metrics import format_report

    r = evaluate(args.checkpoint, args.data, device=args.device, token_budget=args.token_budget,
                 progress=args.progress)
    if args.json:
        print(json.dumps({"loss": r.loss, "accuracy": r.accuracy, "macro_f1": r.macro_f1,
                          "labels": r.names, "confusion": r.confusion.tolist()}))
    else:
        print(f"examples  {len(r.preds)}\nloss      {r.loss:.4f}")
        print(format_report(r.preds, r.labels, r.names))
        print("(confusion matrix: rows are the true labels, columns the predicted ones)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from cudablocks.classify.data import read_jsonl
    from cudablocks.classify.inference import predict

    texts = args.text if args.text else [ex.text for ex in read_jsonl(args.input, require_label=False)]
    rows = predict(args.checkpoint, texts, device=args.device, token_budget=args.token_budget,
                   progress=args.progress)
    lines = [json.dumps({"text": t, **row}) for t, row in zip(texts, rows)]
    if args.output:
        try:
            Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
        except OSError as e:
            raise InvalidArgumentError(f"--output {args.output}: cannot write ({e.strerror or e})") from e
    else:
        print("\n".join(lines))
    return 0


def _export(args: argparse.Namespace) -> int:
    from cudablocks.classify.export import export_run

    print(f"full classifier: {export_run(args.checkpoint, args.output, args.dtype)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error that argparse has already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    run = {"train": _train, "eval": _eval, "predict": _predict, "export": _export}[args.action]
    try:
        return run(args)
    except OutOfMemoryError as e:
        print(f"error: out of memory: {e}\nhint: try a smaller --token-budget", file=sys.stderr)
        return EXIT_USER_ERROR
    except CudaBlocksError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
