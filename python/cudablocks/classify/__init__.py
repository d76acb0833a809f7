"""Sequence-classification fine-tuning on cudablocks blocks (the ``cudablocks classify`` command).

A Hugging Face decoder model directory, a ``tokenizer.json`` and JSONL data (``{"text", "label"}``)
become a classifier: embedding, blocks, final norm, last-token pooling, the ``score`` head and
cross-entropy, trained with AdamW in one of three modes (full, lora, head)::

    from cudablocks.classify import TrainSettings, evaluate, predict, train

    result = train(TrainSettings.create(model="path/to/Qwen3-4B", train_file="train.jsonl", mode="lora"))
    print(evaluate(result.output_dir, "test.jsonl").accuracy)
    print(predict(result.output_dir, ["some text"]))
"""

from cudablocks.classify.export import export_run
from cudablocks.classify.inference import EvalResult, evaluate, predict
from cudablocks.classify.settings import TrainSettings
from cudablocks.classify.trainer import TrainResult, train

__all__ = ["EvalResult", "TrainResult", "TrainSettings", "evaluate", "export_run", "predict", "train"]
