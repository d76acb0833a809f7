#!/usr/bin/env python3
"""Generates the default model and data set that ``cudablocks classify train`` uses with no arguments.

Writes, under ``python/cudablocks/classify/assets/`` (or ``--out``):

* ``data/train.jsonl``, ``data/valid.jsonl`` — a synthetic four-topic classification task
  (``{"text": ..., "label": ...}``), built from templates and word lists written here. Some texts
  carry a sentence from another topic, and some slots are filled with words that several topics
  share, so the task is learnable but not trivially 100%.
* ``model/`` — a tiny Qwen3 base model (2 layers, hidden 128) in Hugging Face layout: config.json,
  model.safetensors (bf16, tied embeddings), and a byte-level BPE tokenizer trained on the training
  texts (tokenizer.json, tokenizer_config.json, special_tokens_map.json). The weights are pretrained
  here as a causal LM on the training texts, so that its features mean something.

Everything is seeded, and torch runs on one thread so that reductions happen in the same order on
every machine. torch and transformers are needed here only, not by the generated files.

    python scripts/make_default_assets.py            # regenerate the assets (~1-2 min on a CPU)
    python scripts/make_default_assets.py --check    # fine-tune the shipped assets with transformers
                                                     # (full and LoRA) and print validation accuracy
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification

SEED = 1234
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "python" / "cudablocks" / "classify" / "assets"
EOT = "<|endoftext|>"

N_TRAIN, N_VALID = 2000, 400
MIN_WORDS, MAX_WORDS = 8, 40
BPE_VOCAB = 1024  # merges + byte alphabet; the end-of-text token comes on top

# The model's shape; vocab_size and the token ids are filled in from the tokenizer.
MODEL_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "torch_dtype": "bfloat16",
}

# Causal-LM pretraining on the training texts: one text per row, padded, so that every text starts
# at position 0 as it will when it is classified.
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 30

# ---------------------------------------------------------------------------------------------
# The data: four topics. Each topic has subjects (who acts), verbs (past tense), objects and
# adjectives. Some entries appear under two topics on purpose ("the record", "a new plant",
# "the chips"): they are the ambiguous words. NEUTRAL fills slots with words that say nothing
# about the topic; NAMES, PLACES and TIMES are shared by all.
# ---------------------------------------------------------------------------------------------

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subjects": [
            "the striker", "the goalkeeper", "the coach", "the captain", "the referee", "the home side",
            "the visiting team", "the young sprinter", "the veteran defender", "the relay squad",
            "the Harbor Hawks", "Aldmoor United", "the rookie pitcher", "the cycling team",
            "the tennis champion", "the fans",
        ],
        "verbs": [
            "scored", "missed", "defended", "won", "lost", "tied", "celebrated", "blocked", "chased",
            "trained for", "qualified for", "sprinted through", "dominated", "conceded",
        ],
        "objects": [
            "a late penalty", "the final", "the title", "the second half", "a corner kick", "the derby",
            "the championship", "a hat trick", "the playoff match", "the marathon", "the league table",
            "a free throw", "the opening round", "the record", "the heat", "the season opener",
        ],
        "adjectives": [
            "thrilling", "scoreless", "hard fought", "undefeated", "athletic", "tense", "muddy",
            "overtime", "record breaking", "physical",
        ],
    },
    "science": {
        "subjects": [
            "the researchers", "the chemist", "the lab team", "a graduate student", "the physicist",
            "the biologists", "the telescope crew", "the Orion institute", "the field geologists",
            "the survey team", "a postdoc", "the microscope group", "the climate modelers",
            "the reviewers",
        ],
        "verbs": [
            "measured", "observed", "sequenced", "published", "replicated", "simulated", "analyzed",
            "calibrated", "discovered", "tested", "cultured", "isolated", "detected", "modeled",
        ],
        "objects": [
            "the protein sample", "a faint galaxy", "the gene variant", "the isotope ratio",
            "the cell cultures", "a new enzyme", "the particle decay", "the fossil layer",
            "the magnetic field", "the control group", "the trial", "a new plant", "the mix",
            "the data set", "the crystal structure", "the heat",
        ],
        "adjectives": [
            "peer reviewed", "experimental", "microscopic", "statistical", "molecular", "orbital",
            "controlled", "theoretical", "reproducible", "genetic",
        ],
    },
    "business": {
        "subjects": [
            "the startup", "the board", "the chief executive", "the investors", "the retailer",
            "the bank", "Brightline Corp", "the analysts", "the sales team", "the shareholders",
            "the supplier", "the founders", "the auditors", "the Northfield exchange",
        ],
        "verbs": [
            "acquired", "invested in", "reported", "negotiated", "launched", "priced", "sold",
            "merged with", "cut", "hired for", "forecast", "financed", "audited", "outsourced",
        ],
        "objects": [
            "the quarterly earnings", "a rival firm", "the merger", "the stock offering",
            "the annual revenue", "a new product line", "the loan", "the market share",
            "the profit margin", "the budget", "the record", "a new plant", "the chips",
            "the trial", "the dividend", "the contract",
        ],
        "adjectives": [
            "profitable", "quarterly", "corporate", "fiscal", "wholesale", "bullish", "competitive",
            "overpriced", "lucrative", "volatile",
        ],
    },
    "cooking": {
        "subjects": [
            "the chef", "the baker", "my grandmother", "the line cook", "the pastry team",
            "the kitchen crew", "the home cook", "the food critic", "the Copper Pot bistro",
            "the sous chef", "the caterers", "the dinner guests",
        ],
        "verbs": [
            "baked", "roasted", "simmered", "seasoned", "whisked", "grilled", "kneaded", "tasted",
            "fried", "garnished", "marinated", "plated", "chopped", "served",
        ],
        "objects": [
            "the sourdough", "a garlic sauce", "the lamb stew", "the pie crust", "a lemon tart",
            "the risotto", "the spice rub", "fresh pasta", "the vegetable soup", "the dumplings",
            "the chips", "the mix", "the heat", "the pancake batter", "a roast chicken",
            "the salad dressing",
        ],
        "adjectives": [
            "crispy", "savory", "tender", "buttery", "spicy", "golden", "homemade", "delicious",
            "smoky", "flaky",
        ],
    },
}

NEUTRAL = {
    "subjects": [
        "the group", "everyone", "the new member", "a local crew", "the organizers", "our neighbor",
        "the whole team", "the visitors",
    ],
    "verbs": ["reviewed", "discussed", "mentioned", "changed", "improved", "prepared", "shared", "planned"],
    "objects": [
        "the plan", "the results", "the schedule", "the numbers", "the details", "the whole thing",
        "the next step", "the list",
    ],
    "adjectives": ["unusual", "remarkable", "slow", "quick", "careful", "surprising", "ordinary", "long"],
}

NAMES = [
    "Mara", "Tobin", "Ilse", "Keon", "Rafa", "Juno", "Petra", "Anselm", "Dalia", "Oskar", "Wren",
    "Hollis", "Nadia", "Brisco", "Tamsin", "Eero",
]
PLACES = [
    "Port Vell", "Aldmoor", "Kestrel Bay", "the old town", "Marrowfield", "the valley", "Lindqvist",
    "the capital", "Southgate", "the harbor district",
]
TIMES = [
    "on Monday", "last week", "this morning", "after lunch", "over the weekend", "late at night",
    "yesterday", "in the spring", "before the holidays", "earlier today",
]

# Sentence frames: {s} subject, {v} verb, {o} object, {a} adjective, {n} name, {p} place, {t} time.
TEMPLATES = [
    "{n} said that {s} {v} {o} {t}.",
    "{T}, {s} {v} {o} in {p}.",
    "In {p}, {s} {v} {o} and then {v2} {o2}.",
    "{n} thinks {o} was {a} {t}.",
    "It was {a} when {s} {v} {o}.",
    "Reports from {p} say {s} {v} {o}.",
    "{S} {v} {o}, which surprised {n}.",
    "Everyone agreed that the {a} moment came when {s} {v} {o}.",
    "{S} {v} {o} {t}, and {n} wrote about it.",
    "I heard {s} {v} {o} in {p} {t}.",
    "{n} told me {o} felt {a}.",
    "After {s} {v} {o}, {n} asked for more.",
]

TOPIC_SLOT_PROB = 0.7  # a slot takes a topic word with this probability, else a neutral one
DISTRACTOR_PROB = 0.25  # a text gets one sentence from another topic with this probability


def _slot(rng: random.Random, topic: str, kind: str) -> str:
    pool = TOPICS[topic][kind] if rng.random() < TOPIC_SLOT_PROB else NEUTRAL[kind]
    return rng.choice(pool)


def _capitalize(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def make_sentence(rng: random.Random, topic: str) -> str:
    """One sentence about ``topic``: a template whose slots are topic or neutral words."""
    s = _slot(rng, topic, "subjects")
    n = rng.choice(NAMES)
    t = rng.choice(TIMES)
    return rng.choice(TEMPLATES).format(
        s=s, S=_capitalize(s), n=n, t=t, T=_capitalize(t), p=rng.choice(PLACES),
        v=_slot(rng, topic, "verbs"), v2=_slot(rng, topic, "verbs"),
        o=_slot(rng, topic, "objects"), o2=_slot(rng, topic, "objects"),
        a=_slot(rng, topic, "adjectives"),
    )


def make_example(rng: random.Random, topic: str) -> str:
    """A text of 1-3 sentences about ``topic``, sometimes with one sentence about another topic."""
    while True:
        n_main = rng.choices((1, 2, 3), weights=(0.45, 0.35, 0.2))[0]
        sentences = [make_sentence(rng, topic) for _ in range(n_main)]
        if rng.random() < DISTRACTOR_PROB:
            other = rng.choice([name for name in TOPICS if name != topic])
            sentences.insert(rng.randrange(n_main + 1), make_sentence(rng, other))
        text = " ".join(sentences)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text


def make_dataset(rng: random.Random, n: int) -> list[dict[str, str]]:
    """``n`` examples with the labels balanced and shuffled."""
    names = sorted(TOPICS)
    labels = [names[i % len(names)] for i in range(n)]
    rng.shuffle(labels)
    return [{"text": make_example(rng, label), "label": label} for label in labels]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# The tokenizer: byte-level BPE like Qwen's (no normalizer, nothing added on encode), with the
# end-of-text token appended after the learned vocabulary, where Qwen has it too.
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([EOT])
    return tok


def write_tokenizer_files(tok: Tokenizer, out: Path) -> None:
    """tokenizer.json, and the two small files that ``AutoTokenizer.from_pretrained`` reads."""
    tok.save(str(out / "tokenizer.json"))
    eot_id = tok.token_to_id(EOT)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(eot_id): {
                "content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
        },
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    special_tokens_map = {"eos_token": EOT, "pad_token": EOT}
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens_map)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def model_config(tok: Tokenizer) -> dict[str, object]:
    """MODEL_CONFIG with the vocabulary size (rounded up to a multiple of 64) and token ids."""
    eot_id = tok.token_to_id(EOT)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return {
        **MODEL_CONFIG,
        "vocab_size": -(-vocab // 64) * 64,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
    }


# ---------------------------------------------------------------------------------------------
# Pretraining and saving the model.
# ---------------------------------------------------------------------------------------------


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(cfg: dict[str, object], tok: Tokenizer, texts: list[str], seed: int) -> Qwen3ForCausalLM:
    """A fresh model trained as a causal LM on ``texts`` (each followed by end-of-text)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    eot_id = tok.token_to_id(EOT)
    seqs = [enc.ids + [eot_id] for enc in tok.encode_batch(texts)]
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, PRETRAIN_STEPS, PRETRAIN_WARMUP))
    order = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = 0
    while step < PRETRAIN_STEPS:
        perm = torch.randperm(len(seqs), generator=order).tolist()
        for i in range(0, len(perm) - PRETRAIN_BATCH + 1, PRETRAIN_BATCH):
            ids, mask = pad_batch([seqs[j] for j in perm[i : i + PRETRAIN_BATCH]], eot_id)
            # Padding is masked out of the loss; the end-of-text token that ends each text is not.
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == PRETRAIN_STEPS:
                print(f"  pretrain step {step}/{PRETRAIN_STEPS}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
            if step == PRETRAIN_STEPS:
                break
    return model


def save_model(model: Qwen3ForCausalLM, cfg: dict[str, object], out: Path) -> None:
    """config.json and model.safetensors (bf16; the tied lm_head is not stored, as transformers does)."""
    state = {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def generate(out: Path, seed: int) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    train = make_dataset(rng, N_TRAIN)
    valid = make_dataset(rng, N_VALID)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "valid.jsonl", valid)
    print(f"data: {len(train)} train, {len(valid)} valid lines")

    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    texts = [row["text"] for row in train]
    tok = train_tokenizer(texts)
    write_tokenizer_files(tok, model_dir)
    cfg = model_config(tok)
    print(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens; model vocab_size {cfg['vocab_size']}")

    model = pretrain(cfg, tok, texts, seed)
    save_model(model, cfg, model_dir)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


# ---------------------------------------------------------------------------------------------
# --check: fine-tune the written assets with transformers (and peft) on the CPU, the way
# `cudablocks classify train` will, and print validation accuracy against steps and time.
# ---------------------------------------------------------------------------------------------

CHECK_TOKENS_PER_STEP = 2048
CHECK_SECONDS = 30.0


def token_budget_batches(seqs: list[list[int]], budget: int, rng: random.Random) -> list[list[int]]:
    """One epoch of shuffled batches (indices), each at most ``budget`` real tokens."""
    order = list(range(len(seqs)))
    rng.shuffle(order)
    batches: list[list[int]] = [[]]
    used = 0
    for i in order:
        if used + len(seqs[i]) > budget and batches[-1]:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += len(seqs[i])
    return batches


@torch.no_grad()
def accuracy(model: torch.nn.Module, seqs: list[list[int]], labels: list[int], pad_id: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(seqs), 128):
        ids, mask = pad_batch(seqs[i : i + 128], pad_id)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        correct += int((pred == torch.tensor(labels[i : i + 128])).sum())
    model.train()
    return correct / len(seqs)


def finetune(mode: str, assets: Path, lr: float, total_steps: int, warmup: int, seed: int) -> list[tuple[int, float, float]]:
    """Fine-tunes for ``total_steps`` (or CHECK_SECONDS) in ``mode`` "full", "lora" or "head".

    Returns (step, seconds, validation accuracy) rows. The LR schedule is linear warmup then
    cosine decay over ``total_steps``."""
    torch.manual_seed(seed)
    tok = Tokenizer.from_file(str(assets / "model" / "tokenizer.json"))
    train, valid = read_jsonl(assets / "data" / "train.jsonl"), read_jsonl(assets / "data" / "valid.jsonl")
    names = sorted({row["label"] for row in train})
    train_ids, valid_ids = ([e.ids for e in tok.encode_batch([r["text"] for r in rows])] for rows in (train, valid))
    train_y = [names.index(r["label"]) for r in train]
    valid_y = [names.index(r["label"]) for r in valid]

    model = Qwen3ForSequenceClassification.from_pretrained(
        assets / "model", num_labels=len(names), dtype=torch.float32
    )
    pad_id = model.config.pad_token_id
    if mode == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("score."))
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        # task_type SEQ_CLS makes peft train the score head as well.
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup, floor=0.0))
    rng = random.Random(seed)

    rows = [(0, 0.0, accuracy(model, valid_ids, valid_y, pad_id))]
    print(f"  {mode}: {sum(p.numel() for p in params)} trainable parameters; step 0 accuracy {rows[0][2]:.3f}")
    model.train()
    step, elapsed = 0, 0.0
    while step < total_steps and elapsed < CHECK_SECONDS:
        for batch in token_budget_batches(train_ids, CHECK_TOKENS_PER_STEP, rng):
            start = time.perf_counter()
            ids, mask = pad_batch([train_ids[i] for i in batch], pad_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([train_y[i] for i in batch])).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            elapsed += time.perf_counter() - start  # training time only, evaluation not counted
            step += 1
            if step % 10 == 0 or step == total_steps:
                rows.append((step, elapsed, accuracy(model, valid_ids, valid_y, pad_id)))
                print(f"  {mode}: step {step:4d}  {elapsed:5.1f} s  loss {loss.item():.3f}  valid accuracy {rows[-1][2]:.3f}")
            if step == total_steps or elapsed >= CHECK_SECONDS:
                break
    return rows


def check(assets: Path, seed: int) -> None:
    torch.set_num_threads(1)
    train = read_jsonl(assets / "data" / "train.jsonl")
    tok = Tokenizer.from_file(str(assets / "model" / "tokenizer.json"))
    n_tokens = sum(len(e.ids) for e in tok.encode_batch([r["text"] for r in train]))
    steps_per_epoch = math.ceil(n_tokens / CHECK_TOKENS_PER_STEP)
    n_labels = len({r["label"] for r in train})
    print(f"{len(train)} training texts, {n_tokens} tokens: ~{steps_per_epoch} steps of {CHECK_TOKENS_PER_STEP} tokens an epoch; chance {1 / n_labels:.3f}")
    summary = []
    for mode, lr in (("full", 1e-3), ("lora", 2e-3), ("head", 5e-3)):
        rows = finetune(mode, assets, lr=lr, total_steps=3 * steps_per_epoch, warmup=10, seed=seed)
        best = max(rows, key=lambda row: row[2])
        summary.append(f"{mode} (lr {lr:g}): {rows[-1][2]:.3f} after {rows[-1][0]} steps ({rows[-1][1]:.0f} s); best {best[2]:.3f} at step {best[0]}")
    print("\n".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assets directory (default: the package's)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="fine-tune the existing assets and report accuracy")
    args = parser.parse_args()
    if args.check:
        check(args.out, args.seed)
    else:
        generate(args.out, args.seed)


if __name__ == "__main__":
    main()
