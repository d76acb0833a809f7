"""The default model and data set shipped in cudablocks.classify.assets (made by scripts/make_default_assets.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import cudablocks as cb

ASSETS = Path(cb.__file__).parent / "classify" / "assets"
MODEL = ASSETS / "model"
DATA = ASSETS / "data"
FILES = [
    MODEL / "config.json",
    MODEL / "model.safetensors",
    MODEL / "tokenizer.json",
    MODEL / "tokenizer_config.json",
    MODEL / "special_tokens_map.json",
    DATA / "train.jsonl",
    DATA / "valid.jsonl",
]
EOT = "<|endoftext|>"


def read_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            assert set(row) == {"text", "label"}, f"{path.name}:{line_no}"
            assert isinstance(row["text"], str) and isinstance(row["label"], str), f"{path.name}:{line_no}"
            assert 8 <= len(row["text"].split()) <= 40, f"{path.name}:{line_no}"
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def config_json() -> dict:
    return json.loads((MODEL / "config.json").read_text(encoding="utf-8"))


def test_files_exist_and_are_small() -> None:
    for file in FILES:
        assert file.is_file(), file
    assert sum(file.stat().st_size for file in FILES) < 3_000_000


def test_config_loads(config_json: dict, tokenizer: Tokenizer) -> None:
    cfg = cb.config.config_from_pretrained(MODEL)
    assert cfg.model_type == "qwen3" and cfg.qk_norm and cfg.tie_word_embeddings
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 2, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    # The embedding covers the tokenizer, padded to a multiple of 64 as Qwen pads it.
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    assert cfg.vocab_size % 64 == 0 and n_tokens <= cfg.vocab_size < n_tokens + 64
    eot = tokenizer.token_to_id(EOT)
    assert config_json["eos_token_id"] == config_json["pad_token_id"] == eot


def test_tokenizer_round_trips(tokenizer: Tokenizer, rng: np.random.Generator) -> None:
    words = read_jsonl(DATA / "valid.jsonl")[int(rng.integers(400))]["text"].split()
    rng.shuffle(words)
    # Byte-level BPE round-trips anything, words it never saw and non-ASCII included.
    text = " ".join(words) + " " + "".join(chr(int(c)) for c in rng.integers(0x20, 0x3000, size=12))
    enc = tokenizer.encode(text)
    assert tokenizer.decode(enc.ids) == text
    # Nothing is added on encode (as with Qwen): no end-of-text, and "" is no tokens.
    assert tokenizer.token_to_id(EOT) not in enc.ids
    assert tokenizer.encode("").ids == []
    # Training worked: a known text takes far fewer tokens than bytes.
    assert len(enc.ids) < len(text.encode("utf-8"))


def test_jsonl_splits_share_every_label() -> None:
    train, valid = read_jsonl(DATA / "train.jsonl"), read_jsonl(DATA / "valid.jsonl")
    assert len(train) >= 1000 and len(valid) >= 200
    labels = {row["label"] for row in train}
    assert len(labels) >= 2 and {row["label"] for row in valid} == labels
    # Roughly balanced, so chance accuracy is 1 / number of labels.
    counts = [sum(row["label"] == label for row in train) for label in labels]
    assert min(counts) > 0.5 * len(train) / len(labels)


def test_transformers_loads_the_pretrained_model(tokenizer: Tokenizer, rng: np.random.Generator) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    assert model.config.model_type == "qwen3"
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    # AutoTokenizer reads the same tokenizer.
    auto = transformers.AutoTokenizer.from_pretrained(MODEL)
    rows = read_jsonl(DATA / "train.jsonl")
    texts = [rows[int(i)]["text"] for i in rng.choice(len(rows), size=8, replace=False)]
    assert auto(texts)["input_ids"] == [e.ids for e in tokenizer.encode_batch(texts)]
    assert auto.pad_token_id == auto.eos_token_id == tokenizer.token_to_id(EOT)

    # Pretraining happened: the LM predicts these texts far better than a uniform guess.
    eot = tokenizer.token_to_id(EOT)
    loss = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text).ids + [eot]])
            loss += model(input_ids=ids, labels=ids).loss.item() / len(texts)
    assert math.isfinite(loss) and loss < 0.5 * math.log(model.config.vocab_size)

    seq_cls = transformers.Qwen3ForSequenceClassification.from_pretrained(MODEL, num_labels=4, dtype=torch.float32)
    logits = seq_cls(input_ids=torch.tensor([tokenizer.encode(texts[0]).ids])).logits
    assert logits.shape == (1, 4) and torch.isfinite(logits).all()
