"""The classify pipeline end to end on the CPU backend, against transformers, torch and peft.

* full mode: our training losses over 24 steps equal those of Qwen3ForSequenceClassification +
  torch.optim.AdamW on the same weights, batches and hyperparameters (fp32; max |diff| <= 1e-4);
* lora mode: against peft's LoRA on the NF4-dequantized weights (<= 1e-3), with LoRA dropout too
  (peft's dropout modules replaced by ones applying our documented masks);
* resuming continues exactly; a failed checkpoint write keeps the previous checkpoint;
* the PEFT adapter and the full export load in peft / transformers and reproduce our logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import cudablocks as cb  # noqa: E402
from cudablocks.classify import data as dataset  # noqa: E402
from cudablocks.classify.settings import TrainSettings  # noqa: E402
from cudablocks.classify.inference import load_classifier, predict, run_eval  # noqa: E402
from cudablocks.classify.loading import init_score  # noqa: E402
from cudablocks.classify.trainer import train  # noqa: E402
from cudablocks.classify.weights import ModelFiles  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]
LABELS = ["red", "green", "blue"]
PAD = "<pad>"


def make_model_dir(root: Path, seed: int, model_type: str = "qwen3") -> Path:
    """A tiny random decoder model (fp32 safetensors) with a WordLevel tokenizer.json. "llama" is a
    Llama 3.1-style model: llama3 RoPE scaling, with original_max_position_embeddings small enough
    (16) that the scaling changes the rotation at our lengths."""
    vocab = {PAD: 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, initializer_range=0.05)
    if model_type == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
        model = transformers.Qwen3ForCausalLM(config)
    elif model_type == "llama":
        scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
        config = transformers.LlamaConfig(rope_scaling=scaling, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # visible norm weights, so that their gradients matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = root / "model"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def make_data(path: Path, rng: np.random.Generator, n: int) -> Path:
    """Texts of 3-20 random words; the label is a function of the words (learnable)."""
    lines = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 21)))
        label = LABELS[sum(int(w[1:]) for w in words[:3]) % 3]
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def settings_for(model_dir: Path, train_file: Path, out: Path, **kw: Any) -> TrainSettings:
    base = dict(model=str(model_dir), train_file=str(train_file), valid_fraction=0.0, output_dir=str(out),
                mode="full", precision="fp32", device="cpu", max_steps=24, lr=2e-3, token_budget=96,
                max_length=32, grad_accum=2, warmup_ratio=0.1, weight_decay=0.05, max_grad_norm=0.5,
                progress=False, seed=3)
    base.update(kw)
    return TrainSettings.create(**base)


def steps_of(s: TrainSettings, tok: dataset.TokenizedSet, total: int) -> list[list[dataset.Batch]]:
    """The micro-batches of each optimizer step, in the trainer's order."""
    steps: list[list[dataset.Batch]] = []
    epoch = 0
    while len(steps) < total:
        groups = [dataset.make_batch(tok, g) for g in
                  dataset.pack_batches(tok.lengths, s.token_budget, shuffle=True, seed=s.seed, epoch=epoch)]
        steps += [groups[i:i + s.grad_accum] for i in range(0, len(groups), s.grad_accum)]
        epoch += 1
    return steps[:total]


def padded(batch: dataset.Batch) -> tuple[Any, Any]:
    width = max(batch.seq_lens)
    ids = torch.zeros((len(batch.seq_lens), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (lo, hi) in enumerate(zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])):
        ids[b, : hi - lo] = torch.from_numpy(batch.ids[lo:hi].astype(np.int64))
        mask[b, : hi - lo] = 1
    return ids, mask


def torch_losses(model: Any, params: list[tuple[str, Any]], s: TrainSettings, steps: list[list[dataset.Batch]],
                 class_weights: Any = None,
                 before_batch: Callable[[int, int, dataset.Batch], None] | None = None) -> list[float]:
    """transformers + torch.optim.AdamW over the same steps; no decay on norms (as ours).
    ``before_batch(step, micro, batch)`` (1-based step) runs before each micro-batch's forward."""
    decay = [p for n, p in params if "norm" not in n]
    no_decay = [p for n, p in params if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.peak_lr, betas=(s.beta1, s.beta2),
                            eps=s.adam_eps)
    total = len(steps)
    sched = transformers.get_cosine_schedule_with_warmup(opt, int(s.warmup_ratio * total), total)
    losses = []
    for group in steps:
        opt.zero_grad()
        w_sum = sum(float(class_weights[torch.from_numpy(b.labels.astype(np.int64))].sum())
                    if class_weights is not None else len(b.seq_lens) for b in group)
        total_loss = 0.0
        for micro, b in enumerate(group):
            if before_batch is not None:
                before_batch(len(losses) + 1, micro, b)
            ids, mask = padded(b)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(b.labels.astype(np.int64)),
                                                     weight=class_weights, reduction="sum") / w_sum
            loss.backward()
            total_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_([p for _, p in params], s.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(total_loss)
    return losses


def seq_cls_model(model_dir: Path, num_labels: int, score: np.ndarray) -> Any:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, torch_dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(score))
    return model


@pytest.mark.parametrize(("model_type", "train_embeddings"),
                         [("qwen3", False), ("qwen2", False), ("llama", False), ("qwen3", True)])
def test_full_mode_losses_match_transformers(model_type: str, train_embeddings: bool, tmp_path: Path,
                                             rng: np.random.Generator) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)), model_type)
    s = settings_for(model_dir, make_data(tmp_path / "train.jsonl", rng, 120), tmp_path / "run",
                     train_embeddings=train_embeddings)
    result = train(s, log=lambda *a: None)
    assert result.steps == s.max_steps and len(result.train_losses) == s.max_steps

    tok_set = dataset.tokenize(dataset.read_jsonl(s.train_path()), dataset.load_tokenizer(model_dir), s.max_length,
                               label_map=dataset.LabelMap.from_examples(dataset.read_jsonl(s.train_path())))
    files = ModelFiles.open(model_dir)
    model = seq_cls_model(model_dir, 3, init_score(3, 64, files, s.seed))
    model.model.embed_tokens.weight.requires_grad_(train_embeddings)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = torch_losses(model, params, s, steps_of(s, tok_set, s.max_steps))
    diff = np.abs(np.array(result.train_losses) - np.array(ref))
    assert diff.max() <= 1e-4, (diff.max(), result.train_losses, ref)
    assert ref[-1] < ref[0]  # it learned something: the comparison is not between two flat lines


class MeanPooled(torch.nn.Module):
    """A sequence classifier whose head reads the mean of the (final-normed) hidden states of the
    real tokens instead of the last one's."""

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        hidden = self.classifier.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        return SimpleNamespace(logits=self.classifier.score((hidden * mask).sum(1) / mask.sum(1)))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_head_mode_losses_match_transformers(pooling: str, tmp_path: Path, rng: np.random.Generator) -> None:
    """Only the score head trains; with mean pooling the reference averages transformers' normed
    hidden states over each sequence (what ``--pooling mean`` computes) before the head."""
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    s = settings_for(model_dir, make_data(tmp_path / "train.jsonl", rng, 120), tmp_path / "run", mode="head",
                     pooling=pooling, lr=2e-2, class_weights="1,0.5,2")
    result = train(s, log=lambda *a: None)

    examples = dataset.read_jsonl(s.train_path())
    label_map = dataset.LabelMap.from_examples(examples)
    tok_set = dataset.tokenize(examples, dataset.load_tokenizer(model_dir), s.max_length, label_map=label_map)
    model = seq_cls_model(model_dir, 3, init_score(3, 64, ModelFiles.open(model_dir), s.seed))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("score."))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if pooling == "mean":
        model = MeanPooled(model)
    weights = torch.tensor([1.0, 0.5, 2.0])
    ref = torch_losses(model, params, s, steps_of(s, tok_set, s.max_steps), class_weights=weights)
    diff = np.abs(np.array(result.train_losses) - np.array(ref))
    assert diff.max() <= 1e-4, (diff.max(), result.train_losses, ref)
    assert max(ref) - min(ref) > 1e-2  # the head moved: the comparison is not between two flat lines


def peft_twin(model_dir: Path, s: TrainSettings) -> tuple[Any, list[tuple[str, Any]]]:
    """peft's LoRA (no dropout) on the NF4-dequantized model with our initial adapters and score,
    and its trainable parameters."""
    peft = pytest.importorskip("peft")
    files = ModelFiles.open(model_dir)
    cfg = files.config
    model = seq_cls_model(model_dir, 3, init_score(3, 64, files, s.seed))
    lora = s.lora_config()
    init: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):  # the base weights as the NF4 blocks see them
            block = cb.CudaBlock.nf4(cfg, i, files.layer_weights(i), "cpu", 8, lora=lora, compute="fp32")
            init.update({f"model.layers.{i}.{k}": v for k, v in block.download_lora_weights().items()})
            for name, module in layer.named_modules():
                if name.split(".")[-1] in cb.LORA_TARGETS:
                    q = cb.nf4.quantize(module.weight.detach().numpy(), 64)
                    module.weight.copy_(torch.from_numpy(cb.nf4.dequantize(q, "float32").to_numpy()))
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=lora.rank, lora_alpha=lora.alpha,
                                                    lora_dropout=0.0, target_modules=list(lora.targets)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                key = name.replace("base_model.model.", "").replace(".default", "")
                p.copy_(torch.from_numpy(init[key]))
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert any("score" in n for n, _ in params)
    return pm, params


def train_set(model_dir: Path, s: TrainSettings) -> dataset.TokenizedSet:
    return dataset.tokenize(dataset.read_jsonl(s.train_path()), dataset.load_tokenizer(model_dir), s.max_length,
                            label_map=dataset.LabelMap.from_examples(dataset.read_jsonl(s.train_path())))


def test_lora_mode_losses_match_peft(tmp_path: Path, rng: np.random.Generator) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    targets = ("q_proj", "v_proj", "down_proj")
    s = settings_for(model_dir, make_data(tmp_path / "train.jsonl", rng, 120), tmp_path / "run", mode="lora",
                     lora_rank=4, lora_alpha=8.0, lora_targets=targets, max_steps=20, lr=5e-3)
    result = train(s, log=lambda *a: None)
    pm, params = peft_twin(model_dir, s)
    ref = torch_losses(pm, params, s, steps_of(s, train_set(model_dir, s), s.max_steps))
    diff = np.abs(np.array(result.train_losses) - np.array(ref))
    assert diff.max() <= 1e-3, (diff.max(), result.train_losses, ref)
    assert ref[-1] < ref[0]


class PaddedMask(torch.nn.Module):
    """Stands in for a peft lora_dropout module: multiplies the adapter's padded input
    [batch, width, in] by the mask set for the current micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: Any = None

    def forward(self, x: Any) -> Any:
        return x * self.mask


def test_lora_dropout_losses_match_peft_with_the_same_masks(tmp_path: Path, rng: np.random.Generator) -> None:
    """Each micro-batch's masks are those of the documented hash at (step, micro-batch): peft with
    those masks in place of its dropout gives our losses; without them, other losses."""
    from test_lora_dropout import PROJECTION_IDS, dropout_key, keep_mask

    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    # q and v share their input; up is one half of the gate/up product; down reads the SwiGLU output.
    targets = ("q_proj", "v_proj", "up_proj", "down_proj")
    s = settings_for(model_dir, make_data(tmp_path / "train.jsonl", rng, 80), tmp_path / "run", mode="lora",
                     lora_rank=4, lora_alpha=8.0, lora_targets=targets, lora_dropout=0.5, max_steps=10, lr=1e-2)
    result = train(s, log=lambda *a: None)
    steps = steps_of(s, train_set(model_dir, s), s.max_steps)

    pm, params = peft_twin(model_dir, s)
    ref_plain = torch_losses(pm, params, s, steps)
    pm, params = peft_twin(model_dir, s)
    masks: dict[tuple[int, str], tuple[int, PaddedMask]] = {}  # (layer, target): (in_features, module)
    for i, layer in enumerate(pm.base_model.model.model.layers):
        for name, module in list(layer.named_modules()):
            target = name.split(".")[-1]
            if target in targets:
                masks[i, target] = (module.in_features, PaddedMask())
                module.lora_dropout["default"] = masks[i, target][1]

    def set_masks(step: int, micro: int, batch: dataset.Batch) -> None:
        T, width = int(batch.cu_seqlens[-1]), max(batch.seq_lens)
        for (i, target), (in_features, module) in masks.items():
            key = dropout_key(s.seed, i, PROJECTION_IDS[target], (step << 32) | micro)
            packed = keep_mask(key, T, in_features, s.lora_dropout) / np.float32(1 - s.lora_dropout)
            mask = np.zeros((len(batch.seq_lens), width, in_features), np.float32)
            for b, (lo, hi) in enumerate(zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])):
                mask[b, : hi - lo] = packed[lo:hi]
            module.mask = torch.from_numpy(mask)

    ref = torch_losses(pm, params, s, steps, before_batch=set_masks)
    diff = np.abs(np.array(result.train_losses) - np.array(ref))
    assert diff.max() <= 1e-3, (diff.max(), result.train_losses, ref)
    assert np.abs(np.array(ref_plain) - np.array(ref)).max() > 1e-2  # the masks matter at this tolerance


def test_resume_continues_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 80)
    whole = train(settings_for(model_dir, data, tmp_path / "a", max_steps=12, save_every=5), log=lambda *a: None)
    first = train(settings_for(model_dir, data, tmp_path / "b", max_steps=12, save_every=5), log=lambda *a: None)
    assert first.train_losses == whole.train_losses  # deterministic

    # A run cut short at step 5 (Ctrl-C saves a resumable checkpoint), then resumed.
    partial = _train_until(settings_for(model_dir, data, tmp_path / "d", max_steps=12, save_every=5), 5)
    assert partial.interrupted and partial.steps == 5
    with pytest.raises(cb.CheckpointError, match="--resume"):
        train(settings_for(model_dir, data, tmp_path / "d", max_steps=12, save_every=5), log=lambda *a: None)
    with pytest.raises(cb.CheckpointError, match="lr"):
        train(settings_for(model_dir, data, tmp_path / "d", max_steps=12, save_every=5, lr=1e-3, resume=True),
              log=lambda *a: None)
    rest = train(settings_for(model_dir, data, tmp_path / "d", max_steps=12, save_every=5, resume=True),
                 log=lambda *a: None)
    assert partial.train_losses + rest.train_losses == whole.train_losses
    records = dataset_metrics(tmp_path / "d")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))


def test_resume_with_lora_dropout_continues_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    """The masks follow from the seed and the step: a resumed run draws the original's."""
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    kw: dict[str, Any] = dict(mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets=("k_proj", "gate_proj", "up_proj"),
                              lora_dropout=0.4, lr=1e-2, max_steps=7, save_every=3)
    whole = train(settings_for(model_dir, data, tmp_path / "a", **kw), log=lambda *a: None)
    partial = _train_until(settings_for(model_dir, data, tmp_path / "b", **kw), 3)
    assert partial.interrupted and partial.steps == 3
    with pytest.raises(cb.CheckpointError, match="lora_dropout"):
        train(settings_for(model_dir, data, tmp_path / "b", resume=True, **{**kw, "lora_dropout": 0.2}),
              log=lambda *a: None)
    rest = train(settings_for(model_dir, data, tmp_path / "b", resume=True, **kw), log=lambda *a: None)
    assert partial.train_losses + rest.train_losses == whole.train_losses
    undropped = train(settings_for(model_dir, data, tmp_path / "c", **{**kw, "lora_dropout": 0.0}), log=lambda *a: None)
    assert undropped.train_losses != whole.train_losses


def test_lora_dropout_setting() -> None:
    from cudablocks.cli import build_parser

    args = build_parser().parse_args(["classify", "train", "--lora-dropout", "0.25"])
    s = TrainSettings.create(**{k: v for k, v in vars(args).items() if k not in ("command", "action")})
    assert s.lora_dropout == 0.25 and s.result_defining()["lora_dropout"] == 0.25
    config = s.lora_config()
    assert config is not None and config.dropout == 0.25
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(cb.InvalidArgumentError, match="--lora-dropout"):
            TrainSettings(lora_dropout=bad).validate()


def dataset_metrics(run: Path) -> list[dict[str, Any]]:
    from cudablocks.classify.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl")


def _train_until(s: TrainSettings, stop_after: int) -> Any:
    """train() with Ctrl-C pressed once while step ``stop_after`` runs."""
    import signal

    from cudablocks.classify.model import Classifier

    original = Classifier.optimizer_step
    calls = {"n": 0}

    def step(self: Any, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)
        calls["n"] += 1
        if calls["n"] == stop_after:
            signal.raise_signal(signal.SIGINT)

    Classifier.optimizer_step = step  # type: ignore[method-assign]
    try:
        return train(s, log=lambda *a: None)
    finally:
        Classifier.optimizer_step = original  # type: ignore[method-assign]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, rng: np.random.Generator,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    s = settings_for(model_dir, data, tmp_path / "run", max_steps=4, save_every=2, eval_every=100)
    train(s, log=lambda *a: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "last").iterdir()}

    from cudablocks.classify import checkpoint as ck

    def full_disk(*args: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(cb.CheckpointError, match="previous one is kept"):
        train(settings_for(model_dir, data, tmp_path / "run", max_steps=4, save_every=2, eval_every=100,
                           overwrite=True), log=lambda *a: None)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run" / "last").iterdir()}
    assert after == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name not in ("last", "best", "metrics.jsonl",
                                                                            "metrics.png", "settings.json",
                                                                            "label_map.json")]


def test_exports_reproduce_our_logits(tmp_path: Path, rng: np.random.Generator) -> None:
    peft = pytest.importorskip("peft")
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    s = settings_for(model_dir, data, tmp_path / "run", mode="lora", lora_rank=4, lora_alpha=8.0,
                     lora_targets=("q_proj", "o_proj", "up_proj"), max_steps=6, lr=1e-2, export=True)
    train(s, log=lambda *a: None)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(5)]
    ours = np.array([[r["probs"][n] for n in LABELS] for r in predict(tmp_path / "run", texts, device="cpu")])

    tok = dataset.load_tokenizer(model_dir)
    names = json.loads((tmp_path / "run" / "label_map.json").read_text())
    order = [names["label2id"][n] for n in LABELS]

    def probs_of(model: Any) -> np.ndarray:
        out = []
        with torch.no_grad():
            for t in texts:
                ids = torch.tensor([tok.encode(t).ids])
                out.append(torch.softmax(model(input_ids=ids).logits[0], -1).numpy()[order])
        return np.array(out)

    # The merged full export in transformers (its NF4 base dequantized into the weights).
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert exported.config.id2label[order[0]] == LABELS[0]
    np.testing.assert_allclose(probs_of(exported), ours, atol=2e-5)
    # The PEFT adapter on the base model whose projections are the NF4-dequantized weights.
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    with torch.no_grad():
        for layer in base.model.layers:
            for name, module in layer.named_modules():
                if name.split(".")[-1] in cb.LORA_TARGETS:
                    q = cb.nf4.quantize(module.weight.detach().numpy(), 64)
                    module.weight.copy_(torch.from_numpy(cb.nf4.dequantize(q, "float32").to_numpy()))
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    np.testing.assert_allclose(probs_of(adapted), ours, atol=2e-5)


def test_mean_pooling_and_class_weights_train(tmp_path: Path, rng: np.random.Generator) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    s = settings_for(model_dir, data, tmp_path / "run", mode="head", pooling="mean", class_weights="1,2,0.5",
                     max_steps=6, lr=1e-2, valid_fraction=0.25)
    result = train(s, log=lambda *a: None)
    assert result.last_eval is not None and math.isfinite(result.last_eval.loss)
    model, label_map, _, _ = load_classifier(tmp_path / "run", device="cpu")
    assert label_map.names == sorted(LABELS) and model.mode.value == "head"
    tok = dataset.tokenize(dataset.read_jsonl(data), dataset.load_tokenizer(model_dir), 32, label_map=label_map)
    batches = [dataset.make_batch(tok, g) for g in dataset.pack_batches(tok.lengths, 96, shuffle=False, seed=0)]
    r = run_eval(model, batches, None, label_map.names, len(tok))
    assert r.confusion.sum() == len(tok) and np.allclose(r.probs.sum(1), 1.0, atol=1e-5)


def make_bnb_twins(model_dir: Path, root: Path) -> tuple[Path, Path]:
    """A bf16 copy of the model and its bitsandbytes 4-bit twin (NF4 projections, blocksize 64, as
    transformers saves one): (float_dir, bnb_dir)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    files = ModelFiles.open(model_dir)
    bf16 = {n: files.tensor(n).astype(np.float32).astype(ml_dtypes.bfloat16) for n in files.tensor_names()}
    stored: dict[str, np.ndarray] = {}
    for name, a in bf16.items():
        if name.endswith("_proj.weight"):
            stored.update(cb.nf4.quantize(a, 64).to_bnb_state_dict(name[: -len("weight")]))
        else:
            stored[name] = a
    float_dir, bnb_dir = root / "float", root / "bnb"
    for d in (float_dir, bnb_dir):
        d.mkdir()
        (d / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    (float_dir / "config.json").write_text(json.dumps(config))
    save_file(bf16, str(float_dir / "model.safetensors"))
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                                     "bnb_4bit_compute_dtype": "bfloat16"}
    (bnb_dir / "config.json").write_text(json.dumps(config))
    save_file(stored, str(bnb_dir / "model.safetensors"))
    return float_dir, bnb_dir


def test_lora_on_a_bitsandbytes_checkpoint_equals_lora_on_its_float_twin(tmp_path: Path,
                                                                          rng: np.random.Generator) -> None:
    """A bitsandbytes 4-bit checkpoint (as transformers saves one) trains exactly as the bf16 model
    it was quantized from: the NF4 blocks quantize the float weights to the same bytes."""
    float_dir, bnb_dir = make_bnb_twins(make_model_dir(tmp_path, int(rng.integers(1 << 30))), tmp_path)
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    kw = dict(mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "gate_proj"), max_steps=6, lr=5e-3)
    twin = train(settings_for(float_dir, data, tmp_path / "a", **kw), log=lambda *a: None)
    quantized = train(settings_for(bnb_dir, data, tmp_path / "b", **kw), log=lambda *a: None)
    assert quantized.train_losses == twin.train_losses
    with pytest.raises(cb.InvalidArgumentError, match="4-bit"):
        train(settings_for(bnb_dir, data, tmp_path / "c", mode="full"), log=lambda *a: None)


@pytest.mark.parametrize("mode", ["full", "lora", "lora-dropout"])
def test_recompute_gives_the_same_losses(mode: str, tmp_path: Path, rng: np.random.Generator) -> None:
    """Shared saved activations with a forward again before each backward: the same arithmetic
    (with LoRA dropout, the forward again draws the same masks)."""
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    kw: dict[str, Any] = dict(mode=mode.split("-")[0], max_steps=5, train_embeddings=mode == "full", pooling="mean")
    if mode != "full":
        kw.update(lora_rank=4, lora_alpha=8.0, lora_targets=("k_proj", "down_proj"), lr=5e-3,
                  lora_dropout=0.3 if mode == "lora-dropout" else 0.0)
    plain = train(settings_for(model_dir, data, tmp_path / "a", **kw), log=lambda *a: None)
    recomputed = train(settings_for(model_dir, data, tmp_path / "b", recompute=True, **kw), log=lambda *a: None)
    assert recomputed.train_losses == plain.train_losses


@pytest.mark.parametrize("mode", ["lora", "head"])
def test_export_of_a_bitsandbytes_run_reproduces_its_probabilities(mode: str, tmp_path: Path,
                                                                   rng: np.random.Generator) -> None:
    """`cudablocks classify export` of a run on a 4-bit checkpoint: the dequantized weights (with the
    adapters merged) in transformers give the probabilities the run gives; a bf16 export, nearly."""
    from cudablocks import cli

    _, bnb_dir = make_bnb_twins(make_model_dir(tmp_path, int(rng.integers(1 << 30))), tmp_path)
    data = make_data(tmp_path / "train.jsonl", rng, 60)
    kw: dict[str, Any] = dict(mode=mode, max_steps=5, lr=1e-2)
    if mode == "lora":
        kw.update(lora_rank=4, lora_alpha=8.0, lora_targets=("v_proj", "up_proj"))
    train(settings_for(bnb_dir, data, tmp_path / "run", **kw), log=lambda *a: None)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(5)]
    ours = np.array([[r["probs"][n] for n in sorted(LABELS)] for r in predict(tmp_path / "run", texts, device="cpu")])
    tok = dataset.load_tokenizer(bnb_dir)
    for dtype, tol in (("float32", 2e-5), ("bfloat16", 3e-2)):
        out = tmp_path / f"export-{dtype}"
        assert cli.main(["classify", "export", str(tmp_path / "run"), str(out), "--dtype", dtype]) == 0
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out, torch_dtype=torch.float32)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        with torch.no_grad():
            theirs = np.array([torch.softmax(model(input_ids=torch.tensor([tok.encode(t).ids])).logits[0], -1).numpy()
                               for t in texts])
        np.testing.assert_allclose(theirs, ours, atol=tol)
