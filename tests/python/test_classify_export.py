"""cudablocks.classify.export and .atomic: a PEFT adapter that peft loads and that computes what
W + scale * B @ A computes, with peft's own file layout; full classifier exports that transformers
loads and that reproduce the logits of the model they came from (fp32, bf16), read back by
ModelFiles; atomic writes that keep the previous checkpoint through failures."""

from __future__ import annotations

import copy
import errno
import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cudablocks as cb
from cudablocks.classify import atomic
from cudablocks.classify.atomic import atomic_directory, atomic_write_text
from cudablocks.classify.export import export_classifier, merge_lora, save_peft_adapter
from cudablocks.classify.weights import ModelFiles

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_classify_weights import bf16_bits, layer_of, numpy_state, randomized, tiny_config  # noqa: E402

PAD = 0
MODULES = {"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj", "down_proj": "mlp.down_proj"}


def label_map(n: int) -> dict[str, Any]:
    names = [f"class_{i}" for i in range(n)]
    return {"id2label": {str(i): name for i, name in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def right_padded_batch(rng: np.random.Generator, lengths: list[int]) -> tuple[Any, Any]:
    """Token ids (no pad among the real tokens) right-padded with PAD, and the attention mask."""
    ids = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, 100, n)
    return torch.from_numpy(ids), torch.from_numpy((ids != PAD).astype(np.int64))


def logits(model: Any, batch: tuple[Any, Any]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits.double().numpy()


def classifier(rng: np.random.Generator, model_type: str = "qwen3", num_labels: int = 3) -> Any:
    config = tiny_config(model_type, num_labels=num_labels, pad_token_id=PAD)
    return randomized(transformers.AutoModelForSequenceClassification.from_config(config), rng)


def base_config_dict(model: Any) -> dict[str, Any]:
    """The config.json of the model's base (no labels), as a model directory would hold it."""
    d = json.loads(model.config.to_json_string())
    for key in ("architectures", "id2label", "label2id", "num_labels"):
        d.pop(key, None)
    return d


def export_of(model: Any, directory: Path, dtype: str = "float32", layers: Any = None, **kwargs: Any) -> None:
    state = numpy_state(model)
    n = model.config.num_hidden_layers
    export_classifier(
        directory, config_dict=base_config_dict(model),
        layers=layers if layers is not None else ((i, layer_of(state, i)) for i in range(n)),
        embedding=state["model.embed_tokens.weight"], final_norm=state["model.norm.weight"],
        score_weight=state["score.weight"], label_map_json=label_map(state["score.weight"].shape[0]), dtype=dtype,
        **kwargs)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_peft_and_merges_like_it(tmp_path: Path, rng: np.random.Generator,
                                                      use_rslora: bool) -> None:
    base = classifier(rng)
    lora = cb.LoraConfig(rank=4, alpha=float(rng.uniform(2, 16)), targets=tuple(MODULES), use_rslora=use_rslora)
    h = 64
    lora_weights: dict[int, dict[str, np.ndarray]] = {}
    for i in range(2):
        lora_weights[i] = {}
        for path in MODULES.values():
            out_f, in_f = base.get_submodule(f"model.layers.{i}.{path}").weight.shape
            lora_weights[i][f"{path}.lora_A.weight"] = rng.normal(0, 0.3, (4, in_f)).astype(np.float32)
            lora_weights[i][f"{path}.lora_B.weight"] = rng.normal(0, 0.3, (out_f, 4)).astype(np.float32)
    score = rng.normal(0, 0.3, (3, h)).astype(np.float32)
    adapter = tmp_path / "adapter"
    base.save_pretrained(tmp_path / "base")  # a local base, so that peft looks for nothing online
    save_peft_adapter(adapter, lora_weights=lora_weights, lora=lora, score_weight=score,
                      base_model=str(tmp_path / "base"), label_map_json=label_map(3))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    assert loaded.peft_config["default"].task_type == "SEQ_CLS"
    # The reference: the base with W + scale * B @ A in every adapted projection and our head.
    manual = copy.deepcopy(base)
    with torch.no_grad():
        for i, named in lora_weights.items():
            for path in MODULES.values():
                a = torch.from_numpy(named[f"{path}.lora_A.weight"]).double()
                b = torch.from_numpy(named[f"{path}.lora_B.weight"]).double()
                w = manual.get_submodule(f"model.layers.{i}.{path}").weight
                w.copy_(w.double() + lora.scale * (b @ a))
        manual.score.weight.copy_(torch.from_numpy(score))
    batch = right_padded_batch(rng, [9, 5, 1])
    expected = logits(manual, batch)
    np.testing.assert_allclose(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - logits(base, batch)).max() > 1e-2  # the adapter changes something

    # peft re-saving what it loaded writes the same files: the same keys and tensors.
    loaded.save_pretrained(tmp_path / "resaved")
    ours = safetensors_torch.load_file(adapter / "adapter_model.safetensors")
    theirs = safetensors_torch.load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    resaved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
                "base_model_name_or_path"):
        assert config[key] == resaved[key], key
    for key in ("target_modules", "modules_to_save"):  # peft may repeat names when re-saving
        assert set(config[key]) == set(resaved[key]), key
    assert json.loads((adapter / "label_map.json").read_text()) == label_map(3)

    # merge_lora + export_classifier give the model peft's merge gives.
    state = numpy_state(base)
    merged = ((i, merge_lora(layer_of(state, i), lora_weights[i], lora.scale)) for i in range(2))
    export_classifier(tmp_path / "merged", config_dict=base_config_dict(base), layers=merged,
                      embedding=state["model.embed_tokens.weight"], final_norm=state["model.norm.weight"],
                      score_weight=score, label_map_json=label_map(3))
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(logits(exported, batch), logits(loaded.merge_and_unload(), batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_exported_classifier_loads_in_transformers(tmp_path: Path, rng: np.random.Generator, model_type: str) -> None:
    model = classifier(rng, model_type, num_labels=4)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    vocab = {"[PAD]": PAD, "[UNK]": 1, **{f"w{i}": i for i in range(2, 100)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tokenizer_dir / "tokenizer.json"))

    export_of(model, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(model)
    assert loaded.config.id2label == {i: f"class_{i}" for i in range(4)} and loaded.config.pad_token_id == PAD
    for lengths in ([11], [11, 4, 7]):  # one sequence; right-padded sequences
        batch = right_padded_batch(rng, lengths)
        np.testing.assert_allclose(logits(loaded, batch), logits(model, batch), rtol=1e-6, atol=1e-6)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode("w5 w7").ids == [5, 7]


def test_export_round_trips_through_model_files(tmp_path: Path, rng: np.random.Generator) -> None:
    model = classifier(rng)
    state = numpy_state(model)
    export_of(model, tmp_path / "fp32")
    files = ModelFiles.open(tmp_path / "fp32")
    for i in range(2):
        for k, v in files.layer_weights(i).items():
            np.testing.assert_array_equal(v, state[f"model.layers.{i}.{k}"], err_msg=k)
    np.testing.assert_array_equal(files.embedding(), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(files.final_norm(), state["model.norm.weight"])
    np.testing.assert_array_equal(files.score(), state["score.weight"])

    # bf16: rounded as torch rounds; the old export is replaced in place.
    export_of(model, tmp_path / "fp32", dtype="bfloat16")
    files = ModelFiles.open(tmp_path / "fp32")
    as_bf16 = model.to(torch.bfloat16).state_dict()
    for i in range(2):
        for k, v in files.layer_weights(i).items():
            np.testing.assert_array_equal(v, as_bf16[f"model.layers.{i}.{k}"].float().numpy(), err_msg=k)
    np.testing.assert_array_equal(bf16_bits(files.embedding("bfloat16")),
                                  bf16_bits(as_bf16["model.embed_tokens.weight"]))
    assert files.tensor("score.weight").dtype == ml_dtypes.bfloat16
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "fp32")
    assert loaded.dtype == torch.bfloat16


def test_export_refuses_inconsistent_input(tmp_path: Path, rng: np.random.Generator) -> None:
    model = classifier(rng)
    state = numpy_state(model)
    with pytest.raises(cb.InvalidArgumentError, match=r"layers \[1\]"):
        export_of(model, tmp_path / "a", layers=[(0, layer_of(state, 0))])
    with pytest.raises(cb.InvalidArgumentError, match="merge_lora"):
        export_of(model, tmp_path / "a", layers=[(0, {**layer_of(state, 0), "mlp.up_proj.lora_A.weight": state[
            "score.weight"]}), (1, layer_of(state, 1))])
    wrong = {**layer_of(state, 1), "mlp.up_proj.weight": state["model.layers.1.mlp.down_proj.weight"]}
    with pytest.raises(cb.ShapeError, match=r"layer 1 mlp\.up_proj\.weight"):
        export_of(model, tmp_path / "a", layers=[(0, layer_of(state, 0)), (1, wrong)])
    with pytest.raises(cb.InvalidArgumentError, match="dtype"):
        export_of(model, tmp_path / "a", dtype="float64")
    with pytest.raises(cb.InvalidArgumentError, match="id2label"):
        save_peft_adapter(tmp_path / "a", lora_weights={}, lora=cb.LoraConfig(), score_weight=state["score.weight"],
                          base_model="x", label_map_json=label_map(2))
    with pytest.raises(cb.InvalidArgumentError, match="no 'self_attn.q_proj.lora_B.weight'"):
        merge_lora(layer_of(state, 0), {"self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32)}, 1.0)
    with pytest.raises(cb.InvalidArgumentError, match="not LoRA tensor names"):
        merge_lora(layer_of(state, 0), {"self_attn.q_proj.weight": np.ones((64, 64), np.float32)}, 1.0)
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_atomic_directory_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        rng: np.random.Generator) -> None:
    final = tmp_path / "checkpoint"
    old = {"weights.bin": rng.bytes(1000), "config.json": b"{}"}
    with atomic_directory(final) as d:
        for name, data in old.items():
            (d / name).write_bytes(data)
    assert files_of(final) == old

    # An exception halfway through writing the new one.
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(final) as d:
            (d / "weights.bin").write_bytes(rng.bytes(500))
            raise RuntimeError("interrupted")
    assert files_of(final) == old and os.listdir(tmp_path) == ["checkpoint"]

    # The disk fills up while writing.
    with pytest.raises(cb.CheckpointError, match="previous one is kept"):
        with atomic_directory(final) as d:
            raise OSError(errno.ENOSPC, "No space left on device", str(d / "weights.bin"))
    assert files_of(final) == old and os.listdir(tmp_path) == ["checkpoint"]

    # Renaming fails: first when moving the old checkpoint aside, then when moving the new one in.
    real_rename = os.rename
    for failing_call in (1, 2):
        calls = []

        def rename(src: Any, dst: Any) -> None:
            calls.append(src)
            if len(calls) == failing_call:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_rename(src, dst)

        monkeypatch.setattr(atomic.os, "rename", rename)
        with pytest.raises(cb.CheckpointError, match="previous one is kept"):
            with atomic_directory(final) as d:
                (d / "weights.bin").write_bytes(rng.bytes(100))
        monkeypatch.setattr(atomic.os, "rename", real_rename)
        assert files_of(final) == old and os.listdir(tmp_path) == ["checkpoint"]

    new = {"weights.bin": rng.bytes(300)}
    with atomic_directory(final) as d:
        (d / "weights.bin").write_bytes(new["weights.bin"])
    assert files_of(final) == new and os.listdir(tmp_path) == ["checkpoint"]


def test_a_crash_between_the_renames_is_undone(tmp_path: Path, rng: np.random.Generator) -> None:
    """The process dies after moving the old checkpoint aside and before moving the new one in: the
    next reader or writer finds the old one back under its name."""
    from cudablocks.classify.checkpoint import is_checkpoint

    final = tmp_path / "last"
    old = {"state.json": b"{}", "weights.bin": rng.bytes(100)}
    with atomic_directory(final) as d:
        for name, data in old.items():
            (d / name).write_bytes(data)
    os.rename(final, tmp_path / ".last.tmp-0123456789ab-old")  # the first rename, then the crash
    assert is_checkpoint(final) and files_of(final) == old
    os.rename(final, tmp_path / ".last.tmp-0123456789ab-old")
    with atomic_directory(final) as d:  # a writer restores it before replacing it
        (d / "state.json").write_bytes(b"{}")
    assert files_of(final) == {"state.json": b"{}"} and os.listdir(tmp_path) == ["last"]


def test_atomic_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old ✓")
    assert path.read_text(encoding="utf-8") == "old ✓"

    def fail(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for function in ("replace", "fsync"):
        with monkeypatch.context() as m:
            m.setattr(atomic.os, function, fail)
            with pytest.raises(cb.CheckpointError, match="metrics.json"):
                atomic_write_text(path, "new")
        assert path.read_text(encoding="utf-8") == "old ✓" and os.listdir(tmp_path) == ["metrics.json"]
    atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "new" and os.listdir(tmp_path) == ["metrics.json"]
