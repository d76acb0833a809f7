"""Data of the classify pipeline: JSONL examples, the label vocabulary, tokenization, and packing
into variable-length batches without padding.

The flow, top to bottom::

    examples = read_jsonl("train.jsonl")                  # [Example(text, label, line, path)]
    labels = LabelMap.from_examples(examples)             # or LabelMap.load(checkpoint config.json)
    train, valid = split_validation(examples, 0.1, seed=0)
    tokenizer = load_tokenizer("path/to/model")           # its tokenizer.json
    data = tokenize(train, tokenizer, max_length=512, label_map=labels)
    for indices in pack_batches(data.lengths, token_budget=8192, shuffle=True, seed=0, epoch=e):
        batch = make_batch(data, indices)                 # host arrays for one device step

Every problem with the user's data raises :class:`~cudablocks.errors.DataError` whose message
starts with ``file:line`` where the example came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import tokenizers

from cudablocks import ops
from cudablocks.classify.atomic import atomic_write_text
from cudablocks.errors import CheckpointError, DataError, InvalidArgumentError

__all__ = [
    "Batch",
    "Example",
    "LabelMap",
    "TokenizedSet",
    "load_tokenizer",
    "make_batch",
    "pack_batches",
    "read_jsonl",
    "split_validation",
    "tokenize",
]


@dataclass(frozen=True)
class Example:
    """One JSONL record: its ``text``, its ``label`` (an int class id, a class name, or None for
    unlabeled prediction data), its 1-based ``line`` and the ``path`` of its file (for messages)."""

    text: str
    label: int | str | None
    line: int
    path: str = ""

    @property
    def where(self) -> str:
        """``path:line`` (or ``line N`` when the path is unknown), the prefix of data errors."""
        return f"{self.path}:{self.line}" if self.path else f"line {self.line}"


# ---------------------------------------------------------------------------------------------
# Reading JSONL


def read_jsonl(path: str | os.PathLike[str], *, require_label: bool = True) -> list[Example]:
    """The examples of a JSONL file: one JSON object per non-blank line with a string ``"text"``
    and a ``"label"`` (an int class id or a string class name; other keys are ignored).

    With ``require_label=False`` (prediction data) the label may be missing or null.
    Raises DataError, naming the file and line, for a missing or unreadable file, bytes that are
    not UTF-8, malformed JSON, a line that is not an object, missing or ill-typed keys, and a file
    without examples.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"{name}: cannot read the data file ({e.strerror or e})") from e

    examples = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            # utf-8-sig on the first line drops a byte-order mark that some editors write.
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        if not text.strip():
            continue
        examples.append(_parse_record(text, name, number, require_label))
    if not examples:
        raise DataError(f"{name}: no examples (the file is empty or has only blank lines)")
    return examples


def _parse_record(text: str, path: str, line: int, require_label: bool) -> Example:
    """One JSONL line as an Example, or a DataError that says what is wrong with it."""
    where = f"{path}:{line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise DataError(f'{where}: expected a JSON object with "text" and "label", got {type(record).__name__}')
    if "text" not in record:
        raise DataError(f'{where}: missing key "text"')
    if not isinstance(record["text"], str):
        raise DataError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')

    label = record.get("label")
    if label is None:
        if require_label:
            raise DataError(f'{where}: missing key "label"' if "label" not in record else f'{where}: "label" is null')
    # bool is a subclass of int in Python, but true/false are never class ids.
    elif isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f'{where}: "label" must be an integer class id or a string class name, got {json.dumps(label)}')
    return Example(text=record["text"], label=label, line=line, path=path)


# ---------------------------------------------------------------------------------------------
# Labels


class LabelMap:
    """The label vocabulary: class ids ``0..num_labels-1`` and their names.

    Integer labels in the data are class ids (names ``"0"``, ``"1"``, ...); string labels are
    class names, given ids in sorted order. A map saved with a checkpoint is loaded to encode
    evaluation data, so that ids mean the same classes as in training.
    """

    def __init__(self, names: Sequence[str]) -> None:
        names = list(names)
        if not names:
            raise InvalidArgumentError("a label map needs at least one class")
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"label names must be distinct, got {names}")
        self._names = names
        self._ids = {name: i for i, name in enumerate(names)}

    @classmethod
    def from_examples(cls, examples: Sequence[Example], num_labels: int | None = None) -> LabelMap:
        """The vocabulary of training data. Integer labels give ``num_labels`` classes (default:
        the largest label + 1); string labels give their sorted distinct names (``num_labels``,
        if given, must match their count). Mixed, missing, negative or out-of-range labels raise
        DataError naming the example's line."""
        if not examples:
            raise DataError("no examples to take labels from")
        if num_labels is not None and num_labels < 1:
            raise InvalidArgumentError(f"num_labels must be at least 1, got {num_labels}")
        for ex in examples:
            if ex.label is None:
                raise DataError(f"{ex.where}: the example has no label")
            if isinstance(ex.label, str) != isinstance(examples[0].label, str):
                raise DataError(
                    f"{ex.where}: label {ex.label!r} mixes integer class ids and string class names "
                    f"(line {examples[0].line} has {examples[0].label!r}); use one kind throughout"
                )

        if isinstance(examples[0].label, str):
            names = sorted({str(ex.label) for ex in examples})
            if num_labels is not None and num_labels != len(names):
                raise DataError(f"num_labels is {num_labels} but the data has {len(names)} distinct labels: {names}")
            return cls(names)

        ids = [int(cast(int, ex.label)) for ex in examples]  # all ints, checked above
        for ex, label in zip(examples, ids):
            if label < 0:
                raise DataError(f"{ex.where}: label {label} is negative; class ids start at 0")
            if num_labels is not None and label >= num_labels:
                raise DataError(f"{ex.where}: label {label} is out of range for num_labels={num_labels}")
        count = num_labels if num_labels is not None else max(ids) + 1
        return cls([str(i) for i in range(count)])

    @property
    def names(self) -> list[str]:
        """The class names, by id."""
        return list(self._names)

    @property
    def num_labels(self) -> int:
        """The number of classes."""
        return len(self._names)

    def encode(self, example: Example) -> int:
        """The class id of an example's label: an int label must be a valid id, a string label a
        known name; anything else raises DataError naming the example's line."""
        label = example.label
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < self.num_labels:
                raise DataError(f"{example.where}: label {label} is out of range for {self.num_labels} classes")
            return label
        if isinstance(label, str):
            if label not in self._ids:
                raise DataError(f"{example.where}: unknown label {label!r}; the known labels are {self._names}")
            return self._ids[label]
        if label is None:
            raise DataError(f"{example.where}: the example has no label")
        raise DataError(f"{example.where}: label {label!r} is neither an integer class id nor a class name")

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}``, as a transformers
        config.json stores them."""
        return {
            "id2label": {str(i): name for i, name in enumerate(self._names)},
            "label2id": {name: i for i, name in enumerate(self._names)},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelMap:
        """The map of a dict holding ``id2label`` (a transformers config.json, or :meth:`to_json`);
        ids must be ``0..n-1``. Raises InvalidArgumentError otherwise."""
        try:
            return cls(_names_of_id2label(data))
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from e

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes :meth:`to_json` to ``path`` as JSON, atomically (a reader never sees half a file)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabelMap:
        """The map saved by :meth:`save`, or the one in a transformers config.json. Raises
        CheckpointError naming the file when it is missing or has no valid ``id2label``."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return cls(_names_of_id2label(data))
        except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(f"{os.fspath(path)}: cannot read the label map ({e})") from e

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self._names == other._names

    def __repr__(self) -> str:
        return f"LabelMap({self._names!r})"


def _names_of_id2label(data: Any) -> list[str]:
    """The class names of an ``id2label`` dict, by id; ValueError if it is not ``0..n-1``."""
    id2label = data.get("id2label") if isinstance(data, dict) else None
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError('expected an object with a non-empty "id2label"')
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except ValueError as e:
        raise ValueError(f"id2label keys must be integers, got {sorted(id2label)}") from e
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
    names = [by_id[i] for i in range(len(by_id))]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"id2label names must be distinct strings, got {names}")
    return names


def split_validation(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """``(train, valid)``: a random ``fraction`` of the examples held out for validation.

    Deterministic for a seed (a permutation from ``numpy.random.default_rng(seed)``); each side
    keeps the file order. With ``fraction > 0`` and at least two examples, both sides get at
    least one. ``fraction`` must be in [0, 1), else InvalidArgumentError.
    """
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgumentError(f"the validation fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_valid = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    valid = np.sort(perm[:n_valid])
    train = np.sort(perm[n_valid:])
    return [examples[i] for i in train], [examples[i] for i in valid]


# ---------------------------------------------------------------------------------------------
# Tokenization


def load_tokenizer(path_or_dir: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """The ``tokenizers`` tokenizer of a tokenizer.json file, or of the one in a model directory.
    Raises CheckpointError naming the file when it is missing or invalid."""
    path = Path(path_or_dir)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a model directory or a tokenizer.json)")
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found (the model directory needs a tokenizer.json)")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions for every kind of bad file
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from e


@dataclass
class TokenizedSet:
    """Tokenized examples: ``ids[i]`` int32 token ids of example ``i``, ``labels`` int32 class ids
    (-1 where unlabeled), ``lines`` and ``paths`` where each came from, and how many texts were
    ``truncated`` to the maximum length."""

    ids: list[np.ndarray]
    labels: np.ndarray
    lines: list[int]
    paths: list[str]
    truncated: int

    @property
    def lengths(self) -> np.ndarray:
        """The token count of each example, int64 (what :func:`pack_batches` takes)."""
        return np.array([len(t) for t in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(
    examples: Sequence[Example],
    tokenizer: tokenizers.Tokenizer,
    max_length: int,
    truncate: bool = True,
    *,
    label_map: LabelMap | None = None,
) -> TokenizedSet:
    """Encodes the texts with the tokenizer (with its own special tokens) and the labels with
    ``label_map`` (None: unlabeled data, labels -1).

    A text longer than ``max_length`` tokens keeps its first ``max_length`` (counted in
    ``truncated``), or with ``truncate=False`` raises DataError naming its line. A text that
    encodes to no tokens raises DataError too.
    """
    if max_length < 1:
        raise InvalidArgumentError(f"max_length must be at least 1, got {max_length}")
    labels = np.array([label_map.encode(ex) if label_map is not None else -1 for ex in examples], dtype=np.int32)

    # Our own truncation is counted and packing needs no padding, so a tokenizer.json that sets
    # either is used through a copy with both off (the caller's tokenizer is left as it is).
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()

    encodings = tokenizer.encode_batch([ex.text for ex in examples])
    ids = []
    truncated = 0
    for ex, enc in zip(examples, encodings):
        tokens = np.asarray(enc.ids, dtype=np.int32)
        if tokens.size == 0:
            raise DataError(f"{ex.where}: the text encodes to no tokens")
        if tokens.size > max_length:
            if not truncate:
                raise DataError(
                    f"{ex.where}: the text has {tokens.size} tokens, more than max_length={max_length}; "
                    "raise max_length or allow truncation"
                )
            tokens = tokens[:max_length]
            truncated += 1
        ids.append(tokens)
    lines = [ex.line for ex in examples]
    paths = [ex.path for ex in examples]
    return TokenizedSet(ids=ids, labels=labels, lines=lines, paths=paths, truncated=truncated)


# ---------------------------------------------------------------------------------------------
# Packing


def pack_batches(
    lengths: np.ndarray,
    token_budget: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    max_sequences: int | None = None,
) -> list[np.ndarray]:
    """Example indices grouped into batches of at most ``token_budget`` tokens (and at most
    ``max_sequences`` sequences, if given), packed back to back without padding.

    Every index appears exactly once. The order is the given one, or with ``shuffle`` a
    permutation from ``numpy.random.default_rng((seed, epoch))`` (the same for the same seed and
    epoch, different across epochs); batches are then filled greedily in that order. A sequence
    longer than the budget raises DataError.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise InvalidArgumentError(f"lengths must be a 1-D integer array, got {lengths.dtype} of shape {lengths.shape}")
    if token_budget < 1:
        raise InvalidArgumentError(f"token_budget must be at least 1, got {token_budget}")
    if max_sequences is not None and max_sequences < 1:
        raise InvalidArgumentError(f"max_sequences must be at least 1, got {max_sequences}")
    if lengths.size and lengths.min() < 1:
        raise InvalidArgumentError(f"every sequence needs a token, but sequence {int(lengths.argmin())} has none")
    if lengths.size and lengths.max() > token_budget:
        i = int(lengths.argmax())
        raise DataError(
            f"sequence {i} has {int(lengths[i])} tokens, more than the token budget of {token_budget}; "
            "use a larger token budget or a smaller max length"
        )

    order = np.random.default_rng((seed, epoch)).permutation(lengths.size) if shuffle else np.arange(lengths.size)
    batches = []
    start, tokens = 0, 0
    for pos, index in enumerate(order):
        full = tokens + lengths[index] > token_budget or (max_sequences is not None and pos - start == max_sequences)
        if full:
            batches.append(order[start:pos])
            start, tokens = pos, 0
        tokens += int(lengths[index])
    if lengths.size:
        batches.append(order[start:])
    return batches


@dataclass
class Batch:
    """The host arrays of one packed batch of B sequences and T tokens.

    ``ids`` int32 [T] tokens back to back, ``seq_lens`` their lengths, ``cu_seqlens`` int32 [B+1]
    cumulative lengths (sequence b is ``ids[cu_seqlens[b]:cu_seqlens[b+1]]``), ``labels`` int32
    [B], ``indices`` the examples' indices in their TokenizedSet.
    """

    ids: np.ndarray
    seq_lens: list[int]
    cu_seqlens: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    @property
    def num_tokens(self) -> int:
        """T, the batch's token count."""
        return int(self.ids.size)

    @property
    def embedding_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`cudablocks.ops.embedding_backward_index` of ``ids``: computed when asked, as only
        a step that trains the embedding needs it."""
        return ops.embedding_backward_index(self.ids)


def make_batch(tokenized: TokenizedSet, indices: np.ndarray) -> Batch:
    """The batch of the examples at ``indices`` (one of :func:`pack_batches`' groups)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise InvalidArgumentError(f"a batch needs a non-empty 1-D array of indices, got shape {indices.shape}")
    parts = [tokenized.ids[i] for i in indices]
    seq_lens = [len(p) for p in parts]
    cu_seqlens = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(seq_lens, out=cu_seqlens[1:])
    ids = np.concatenate(parts).astype(np.int32, copy=False)
    return Batch(
        ids=ids,
        seq_lens=seq_lens,
        cu_seqlens=cu_seqlens,
        labels=tokenized.labels[indices],
        indices=indices,
    )


def packed_batches(tok: TokenizedSet, budget: int, *, shuffle: bool, seed: int, epoch: int = 0) -> list[Batch]:
    """The batches of one pass over ``tok`` (:func:`pack_batches` then :func:`make_batch`); a text
    over the budget is a DataError naming its file and line."""
    too_long = np.flatnonzero(tok.lengths > budget)
    if too_long.size:  # checked here, where the example's file and line are known
        i = int(too_long[0])
        where = f"{tok.paths[i]}:{tok.lines[i]}" if tok.paths[i] else f"line {tok.lines[i]}"
        raise DataError(f"{where}: the text has {len(tok.ids[i])} tokens, more than the token budget of {budget}; "
                        "use a larger --token-budget")
    groups = pack_batches(tok.lengths, budget, shuffle=shuffle, seed=seed, epoch=epoch)
    return [make_batch(tok, g) for g in groups]


def check_vocab(tok: TokenizedSet, vocab_size: int, what: str) -> None:
    """DataError naming the first text whose token ids fall outside the model's vocabulary."""
    for i, ids in enumerate(tok.ids):
        if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            raise DataError(f"{tok.paths[i]}:{tok.lines[i]}: the tokenizer gives token id {int(ids.max())}, "
                            f"outside the model's vocabulary of {vocab_size} ({what}: tokenizer and model disagree)")
