"""Data of the classify pipeline: JSONL reading and its errors (file and line), label maps
(against transformers' config id2label/label2id), the validation split, tokenization against a
direct vocabulary lookup, packing invariants on random lengths, batches, and the embedding
backward index against a direct loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cudablocks.classify.data import (
    Example,
    LabelMap,
    load_tokenizer,
    make_batch,
    pack_batches,
    read_jsonl,
    split_validation,
    tokenize,
)
from cudablocks.errors import CheckpointError, DataError, InvalidArgumentError

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def random_text(rng: np.random.Generator, max_words: int = 12) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words + 1))))


def word_level_tokenizer() -> tokenizers.Tokenizer:
    """A tiny WordLevel tokenizer splitting on whitespace; unknown words map to [UNK] (id 0)."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tok


# ---------------------------------------------------------------------------------------------
# read_jsonl


def test_read_jsonl_reads_texts_labels_and_lines(tmp_path: Path, rng: np.random.Generator) -> None:
    records, lines, expected_lines = [], [], []
    for _ in range(int(rng.integers(5, 30))):
        if rng.random() < 0.2:
            lines.append("   ")  # blank lines are skipped but still counted
        record = {"text": random_text(rng), "label": int(rng.integers(0, 5)), "extra": 1}
        records.append(record)
        lines.append(json.dumps(record, ensure_ascii=bool(rng.random() < 0.5)))
        expected_lines.append(len(lines))
    path = write_lines(tmp_path / "train.jsonl", lines)

    examples = read_jsonl(path)
    assert [(e.text, e.label, e.line) for e in examples] == [
        (r["text"], r["label"], n) for r, n in zip(records, expected_lines)
    ]
    assert all(e.path == str(path) for e in examples)


BAD_LINES = {
    "malformed JSON": '{"text": "a", "label": 1',
    "not an object": '["a", 1]',
    "missing text": '{"label": 1}',
    "missing label": '{"text": "a"}',
    "text not a string": '{"text": 3, "label": 1}',
    "float label": '{"text": "a", "label": 1.5}',
    "bool label": '{"text": "a", "label": true}',
    "list label": '{"text": "a", "label": [1]}',
    "null label": '{"text": "a", "label": null}',
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_read_jsonl_names_file_and_line_of_a_bad_record(tmp_path: Path, rng: np.random.Generator, bad: str) -> None:
    lines = [json.dumps({"text": random_text(rng), "label": 0}) for _ in range(int(rng.integers(1, 10)))]
    at = int(rng.integers(0, len(lines) + 1))
    lines.insert(at, bad)
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError, match=f"data.jsonl:{at + 1}:"):
        read_jsonl(path)


def test_read_jsonl_names_the_line_of_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError, match="latin1.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_read_jsonl_refuses_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.jsonl"):
        read_jsonl(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_read_jsonl_without_required_labels_reads_unlabeled_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "predict.jsonl", ['{"text": "a"}', '{"text": "b", "label": "x"}'])
    assert [e.label for e in read_jsonl(path, require_label=False)] == [None, "x"]


# ---------------------------------------------------------------------------------------------
# LabelMap


def examples_of(labels: list[int | str]) -> list[Example]:
    return [Example(text="t", label=label, line=i + 1, path="d.jsonl") for i, label in enumerate(labels)]


def test_label_map_of_integer_labels(rng: np.random.Generator) -> None:
    labels = [int(v) for v in rng.integers(0, 6, size=40)]
    examples = examples_of(labels)
    lm = LabelMap.from_examples(examples)
    assert lm.num_labels == max(labels) + 1
    assert lm.names == [str(i) for i in range(max(labels) + 1)]
    assert [lm.encode(e) for e in examples] == labels

    wider = LabelMap.from_examples(examples, num_labels=max(labels) + 3)
    assert wider.num_labels == max(labels) + 3

    bad = int(rng.integers(0, 10))
    with pytest.raises(DataError, match=f"d.jsonl:{bad + 1}: label 5 is out of range for num_labels=5"):
        LabelMap.from_examples(examples_of([0] * bad + [5]), num_labels=5)
    with pytest.raises(DataError, match=f"d.jsonl:{bad + 1}: label -1 is negative"):
        LabelMap.from_examples(examples_of([0] * bad + [-1]))


def test_label_map_of_string_labels_is_sorted(rng: np.random.Generator) -> None:
    names = ["pos", "neg", "neutral", "Zed"]
    labels = [str(v) for v in rng.choice(names, size=30)]
    examples = examples_of(labels)
    lm = LabelMap.from_examples(examples)
    assert lm.names == sorted(set(labels))
    assert [lm.names[lm.encode(e)] for e in examples] == labels
    with pytest.raises(DataError, match="d.jsonl:1: unknown label 'other'"):
        lm.encode(examples_of(["other"])[0])
    with pytest.raises(DataError, match="distinct labels"):
        LabelMap.from_examples(examples, num_labels=len(set(labels)) + 1)


def test_label_map_refuses_mixed_labels() -> None:
    with pytest.raises(DataError, match="d.jsonl:3: .*mixes integer class ids and string class names"):
        LabelMap.from_examples(examples_of([0, 1, "two"]))


def test_label_map_round_trips_through_transformers_config(tmp_path: Path, rng: np.random.Generator) -> None:
    transformers = pytest.importorskip("transformers")
    lm = LabelMap([f"class-{v}" for v in rng.permutation(7)])
    assert LabelMap.from_json(lm.to_json()) == lm

    # Ours, read by transformers.
    lm.save(tmp_path / "labels.json")
    cfg = transformers.PretrainedConfig.from_json_file(str(tmp_path / "labels.json"))
    assert cfg.id2label == dict(enumerate(lm.names))
    assert cfg.label2id == {n: i for i, n in enumerate(lm.names)}

    # Transformers' config.json, read by us.
    hf = transformers.PretrainedConfig(id2label=dict(enumerate(lm.names)))
    hf.save_pretrained(tmp_path / "model")
    assert LabelMap.load(tmp_path / "model" / "config.json") == lm


def test_label_map_loaded_from_a_checkpoint_refuses_unseen_labels(tmp_path: Path) -> None:
    LabelMap.from_examples(examples_of(["a", "b"])).save(tmp_path / "labels.json")
    lm = LabelMap.load(tmp_path / "labels.json")
    with pytest.raises(DataError, match="d.jsonl:1: unknown label 'c'"):
        lm.encode(examples_of(["c"])[0])
    with pytest.raises(DataError, match="d.jsonl:1: label 2 is out of range"):
        lm.encode(examples_of([2])[0])


def test_label_map_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.json"):
        LabelMap.load(tmp_path / "missing.json")
    (tmp_path / "gap.json").write_text(json.dumps({"id2label": {"0": "a", "2": "b"}}))
    with pytest.raises(CheckpointError, match="gap.json.*0..1"):
        LabelMap.load(tmp_path / "gap.json")
    with pytest.raises(InvalidArgumentError):
        LabelMap.from_json({"label2id": {"a": 0}})


# ---------------------------------------------------------------------------------------------
# split_validation


def test_split_validation_is_a_deterministic_partition(rng: np.random.Generator) -> None:
    examples = examples_of([int(v) for v in rng.integers(0, 3, size=int(rng.integers(2, 200)))])
    fraction = float(rng.uniform(0.001, 0.999))
    seed = int(rng.integers(0, 2**31))
    train, valid = split_validation(examples, fraction, seed)

    assert (train, valid) == split_validation(examples, fraction, seed)
    assert sorted(e.line for e in train + valid) == [e.line for e in examples]
    assert len(train) >= 1 and len(valid) >= 1
    assert abs(len(valid) - fraction * len(examples)) <= 1
    assert [e.line for e in train] == sorted(e.line for e in train)  # file order kept

    assert split_validation(examples, 0.0, seed) == (examples, [])
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InvalidArgumentError):
            split_validation(examples, bad, seed)


def test_split_validation_depends_on_the_seed(rng: np.random.Generator) -> None:
    examples = examples_of(list(range(100)))
    seed = int(rng.integers(0, 2**31))
    splits = {tuple(e.line for e in split_validation(examples, 0.3, s)[1]) for s in (seed, seed + 1, seed + 2)}
    assert len(splits) == 3


# ---------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_matches_vocabulary_lookup_and_counts_truncation(rng: np.random.Generator) -> None:
    tok = word_level_tokenizer()
    texts = [random_text(rng, 20) + (" unknownword" if rng.random() < 0.3 else "") for _ in range(50)]
    examples = [Example(text=t, label=int(rng.integers(0, 3)), line=i + 1) for i, t in enumerate(texts)]
    lm = LabelMap.from_examples(examples, num_labels=3)
    max_length = int(rng.integers(3, 15))

    data = tokenize(examples, tok, max_length, label_map=lm)

    vocab = tok.get_vocab()
    expected = [[vocab.get(w, 0) for w in t.split()] for t in texts]
    assert len(data) == len(examples)
    assert data.truncated == sum(len(e) > max_length for e in expected)
    for got, want in zip(data.ids, expected):
        assert got.dtype == np.int32
        assert got.tolist() == want[:max_length]
    assert data.labels.dtype == np.int32
    assert data.labels.tolist() == [e.label for e in examples]
    assert data.lengths.tolist() == [min(len(e), max_length) for e in expected]
    assert data.lines == [e.line for e in examples]


def test_tokenize_without_truncation_names_the_long_text() -> None:
    examples = [Example("alpha beta", 0, 1, "d.jsonl"), Example("alpha beta gamma delta", 0, 4, "d.jsonl")]
    with pytest.raises(DataError, match="d.jsonl:4: the text has 4 tokens, more than max_length=3"):
        tokenize(examples, word_level_tokenizer(), 3, truncate=False)
    with pytest.raises(DataError, match="d.jsonl:7: the text encodes to no tokens"):
        tokenize([Example("   ", 0, 7, "d.jsonl")], word_level_tokenizer(), 3)


def test_tokenize_ignores_the_tokenizers_own_padding_and_truncation() -> None:
    tok = word_level_tokenizer()
    tok.enable_padding(length=16, pad_id=0)
    tok.enable_truncation(max_length=2)
    data = tokenize([Example("alpha beta gamma", None, 1)], tok, 8)
    assert data.ids[0].tolist() == [1, 2, 3]
    assert data.labels.tolist() == [-1]
    assert tok.padding is not None and tok.truncation is not None  # the caller's tokenizer is untouched


def test_load_tokenizer_from_a_directory_or_file(tmp_path: Path) -> None:
    word_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path, tmp_path / "tokenizer.json"):
        assert load_tokenizer(where).encode("beta gamma").ids == [2, 3]
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir_that_is_missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad/tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("max_sequences", [None, 3])
def test_pack_batches_invariants(rng: np.random.Generator, max_sequences: int | None) -> None:
    lengths = rng.integers(1, 300, size=int(rng.integers(1, 500)))
    budget = int(rng.integers(lengths.max(), 2000))
    seed = int(rng.integers(0, 2**31))

    for shuffle in (False, True):
        batches = pack_batches(lengths, budget, shuffle=shuffle, seed=seed, max_sequences=max_sequences)
        order = np.concatenate(batches)
        assert sorted(order.tolist()) == list(range(lengths.size))  # each index exactly once
        if not shuffle:
            assert order.tolist() == list(range(lengths.size))
        for i, b in enumerate(batches):
            assert b.size >= 1 and lengths[b].sum() <= budget
            assert max_sequences is None or b.size <= max_sequences
            if i + 1 < len(batches):  # greedy: the next sequence did not fit
                next_len = lengths[batches[i + 1][0]]
                assert lengths[b].sum() + next_len > budget or b.size == max_sequences


def test_pack_batches_shuffle_is_deterministic_per_seed_and_epoch(rng: np.random.Generator) -> None:
    lengths = rng.integers(1, 100, size=200)
    seed = int(rng.integers(0, 2**31))

    def order(epoch: int, s: int = seed) -> list[int]:
        return np.concatenate(pack_batches(lengths, 500, shuffle=True, seed=s, epoch=epoch)).tolist()

    assert order(0) == order(0)
    assert order(1) == order(1)
    assert order(0) != order(1)
    assert order(0) != order(0, seed + 1)
    assert order(0) == np.random.default_rng((seed, 0)).permutation(200).tolist()


def test_pack_batches_refuses_a_sequence_over_the_budget() -> None:
    with pytest.raises(DataError, match="sequence 2 has 65 tokens.*larger token budget or a smaller max length"):
        pack_batches(np.array([10, 64, 65, 3]), 64, shuffle=False, seed=0)
    assert pack_batches(np.array([], dtype=np.int64), 64, shuffle=True, seed=0) == []


def test_make_batch_concatenates_the_examples(rng: np.random.Generator) -> None:
    tok = word_level_tokenizer()
    examples = [Example(random_text(rng), int(rng.integers(0, 4)), i + 1) for i in range(30)]
    data = tokenize(examples, tok, 16, label_map=LabelMap.from_examples(examples, num_labels=4))
    indices = rng.permutation(len(examples))[: int(rng.integers(1, 10))]

    batch = make_batch(data, indices)
    assert batch.ids.dtype == batch.cu_seqlens.dtype == batch.labels.dtype == np.int32
    assert batch.seq_lens == [len(data.ids[i]) for i in indices]
    assert batch.num_tokens == sum(batch.seq_lens) == batch.ids.size
    assert batch.cu_seqlens.tolist() == [0, *np.cumsum(batch.seq_lens).tolist()]
    for b, i in enumerate(indices):
        assert batch.ids[batch.cu_seqlens[b]:batch.cu_seqlens[b + 1]].tolist() == data.ids[i].tolist()
        assert batch.labels[b] == examples[i].label
    assert batch.indices.tolist() == indices.tolist()
    rows, _, _ = batch.embedding_index
    assert rows.tolist() == sorted(set(batch.ids.tolist()))
