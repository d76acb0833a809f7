"""Sequence-classification fine-tuning on cudablocks blocks (the ``cudablocks classify`` command).

A Hugging Face decoder model directory, a ``tokenizer.json`` and JSONL data (``{"text", "label"}``)
become a classifier: embedding, blocks, final norm, last-token pooling, the ``score`` head and
cross-entropy, trained with AdamW in one of three modes (full, lora, head).
"""
