"""cudablocks.classify.weights.ModelFiles: model directories written by safetensors.torch.save_file
(bf16, fp16, fp32) and by transformers' save_pretrained (sharded, tied embeddings, bare base
models; Qwen3, Qwen2, Llama) read back exactly as torch holds them; bitsandbytes 4-bit
checkpoints handed on entry for entry; missing, malformed and unsupported files refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cudablocks as cb
from cudablocks.classify.weights import ModelFiles, layer_tensor_shapes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tiny_config(model_type: str = "qwen3", **kwargs: Any) -> Any:
    """A transformers config of a 2-layer decoder: hidden 64, 4 heads of 16, 2 kv heads, vocab 100."""
    cls = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=100, intermediate_size=96)
    return cls[model_type](**{**sizes, **kwargs})


def randomized(model: Any, rng: np.random.Generator) -> Any:
    """``model`` with every parameter drawn afresh (norm weights too, which transformers sets to 1)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape))))
    return model.eval()


def numpy_state(model: Any) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays (exact for bf16/fp16/fp32 tensors)."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def layer_of(state: dict[str, np.ndarray], index: int, prefix: str = "model.") -> dict[str, np.ndarray]:
    head = f"{prefix}layers.{index}."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def assert_same(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(expected)
    for k, v in expected.items():
        assert ours[k].dtype == v.dtype, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


def bf16_bits(a: Any) -> np.ndarray:
    """The bit patterns of a bf16 torch tensor or ml_dtypes array, for exact comparison."""
    if isinstance(a, np.ndarray):
        return a.view(np.uint16)
    return a.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_save_file_checkpoint_reads_back_exactly(tmp_path: Path, rng: np.random.Generator, dtype: str) -> None:
    config = tiny_config(num_labels=3)
    model = randomized(transformers.Qwen3ForSequenceClassification(config), rng)
    stored = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    config.save_pretrained(tmp_path)
    safetensors_torch.save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})

    files = ModelFiles.open(tmp_path)
    assert files.config.hidden_size == 64 and files.config.num_hidden_layers == 2 and files.quantization is None
    assert files.raw_config["model_type"] == "qwen3" and files.path == tmp_path
    state = {k: v.float().numpy() for k, v in stored.items()}
    for i in range(2):
        assert_same(files.layer_weights(i), layer_of(state, i))
    np.testing.assert_array_equal(files.embedding(), state["model.embed_tokens.weight"])
    # bfloat16 embedding: as stored for a bf16 file, else rounded as torch rounds.
    emb = files.embedding("bfloat16")
    assert files.embedding_dtype() == ("bfloat16" if dtype == "bfloat16" else "float32")
    assert emb.dtype == ml_dtypes.bfloat16 and emb.shape == (100, 64)
    np.testing.assert_array_equal(bf16_bits(emb), bf16_bits(stored["model.embed_tokens.weight"].to(torch.bfloat16)))
    np.testing.assert_array_equal(files.final_norm(), state["model.norm.weight"])
    np.testing.assert_array_equal(files.score(), state["score.weight"])
    raw = files.tensor("model.layers.1.mlp.up_proj.weight")
    assert raw.dtype == {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
    assert files.has("score.weight") and not files.has("lm_head.weight")


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
def test_sharded_tied_save_pretrained_reads_back_exactly(tmp_path: Path, rng: np.random.Generator,
                                                         model_type: str) -> None:
    config = tiny_config(model_type, tie_word_embeddings=True)
    model = randomized(transformers.AutoModelForCausalLM.from_config(config), rng).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2

    files = ModelFiles.open(tmp_path)
    state = numpy_state(model)
    assert files.config.model_type == model_type and files.config.tie_word_embeddings
    for i in range(2):
        weights = files.layer_weights(i)
        assert sorted(weights) == sorted(layer_tensor_shapes(files.config))  # qwen2: q/k/v biases
        assert_same(weights, layer_of(state, i))
    np.testing.assert_array_equal(files.embedding(), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(bf16_bits(files.embedding("bfloat16")),
                                  bf16_bits(model.model.embed_tokens.weight.detach()))
    np.testing.assert_array_equal(files.final_norm(), state["model.norm.weight"])
    assert files.score() is None and not files.has("lm_head.weight")


def test_bare_base_model_without_prefix(tmp_path: Path, rng: np.random.Generator) -> None:
    model = randomized(transformers.Qwen3Model(tiny_config()), rng)
    model.save_pretrained(tmp_path)
    files = ModelFiles.open(tmp_path)
    state = numpy_state(model)
    assert files.has("layers.0.input_layernorm.weight")
    assert_same(files.layer_weights(1), layer_of(state, 1, prefix=""))
    np.testing.assert_array_equal(files.final_norm(), state["norm.weight"])
    np.testing.assert_array_equal(files.embedding(), state["embed_tokens.weight"])


def bnb_config(double_quant: bool, quant_type: str = "nf4") -> dict[str, Any]:
    """A config.json's quantization_config as transformers writes it for BitsAndBytesConfig."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": ["score"]}


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_4bit_checkpoint_hands_on_its_entries(tmp_path: Path, rng: np.random.Generator,
                                                  double_quant: bool) -> None:
    config = tiny_config()
    state = numpy_state(randomized(transformers.Qwen3ForCausalLM(config), rng))
    stored: dict[str, np.ndarray] = {}
    for name, a in state.items():
        if name.endswith("proj.weight") and ".layers." in name:
            t = cb.nf4.quantize(a.astype(ml_dtypes.bfloat16), 64, double_quant=double_quant)
            stored.update(t.to_bnb_state_dict(name[: -len("weight")]))
        else:
            stored[name] = a.astype(ml_dtypes.bfloat16)
    safetensors_torch.save_file({k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                                 if v.dtype == ml_dtypes.bfloat16 else torch.from_numpy(v)
                                 for k, v in stored.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(),
                                                      "quantization_config": bnb_config(double_quant)}))

    files = ModelFiles.open(tmp_path)
    q = files.quantization
    assert q is not None and q.quant_type == "nf4" and q.double_quant == double_quant
    assert q.compute_dtype == "bfloat16" and q.skip_modules == ("score",)
    for i in range(2):
        weights = files.layer_weights(i)
        expected = {k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v)
                    for k, v in layer_of(stored, i).items()}
        assert_same(weights, expected)
        assert "self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in weights
        assert ("self_attn.q_proj.weight.nested_absmax" in weights) == double_quant
    # The nf4 block takes them as they are and computes what it computes from the same entries.
    weights = files.layer_weights(1)
    x = cb.GpuBuffer.from_numpy(rng.standard_normal((5, 64)).astype(np.float32), "cpu")
    outs = []
    for w in (weights, {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v
                        for k, v in layer_of(stored, 1).items()}):
        out = cb.GpuBuffer.empty((5, 64), "float32", "cpu")
        cb.CudaBlock.nf4(files.config, 1, w, "cpu", 8, compute="fp32").forward(x, out, 5)
        outs.append(out.to_numpy())
    assert np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[0], outs[1])


def write_model(directory: Path, rng: np.random.Generator, **config_changes: Any) -> dict[str, Any]:
    """A small fp32 Qwen3 sequence-classification checkpoint; returns its config dict."""
    config = tiny_config(num_labels=3)
    randomized(transformers.Qwen3ForSequenceClassification(config), rng).save_pretrained(directory)
    raw = {**json.loads((directory / "config.json").read_text()), **config_changes}
    (directory / "config.json").write_text(json.dumps(raw))
    return raw


def test_missing_files_are_named(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(cb.CheckpointError, match="does not exist"):
        ModelFiles.open(tmp_path / "nowhere")
    with pytest.raises(cb.CheckpointError, match="no config.json"):
        ModelFiles.open(tmp_path)
    write_model(tmp_path, rng)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(cb.CheckpointError, match=r"model\.safetensors.*pytorch_model\.bin"):
        ModelFiles.open(tmp_path)

    sharded = tmp_path / "sharded"
    randomized(transformers.Qwen3ForCausalLM(tiny_config()), rng).save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(cb.CheckpointError, match=shard.name):
        ModelFiles.open(sharded)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(cb.CheckpointError, match="config.json"):
        ModelFiles.open(tmp_path)


def test_unsupported_models_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    write_model(tmp_path, rng, model_type="gpt2")
    with pytest.raises(cb.UnsupportedOperationError, match=r"config\.json.*'gpt2'.*qwen3, qwen2, llama"):
        ModelFiles.open(tmp_path)
    write_model(tmp_path, rng, quantization_config=bnb_config(False, quant_type="fp4"))
    with pytest.raises(cb.UnsupportedOperationError, match="'fp4'.*NF4"):
        ModelFiles.open(tmp_path)
    write_model(tmp_path, rng, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(cb.UnsupportedOperationError, match="gptq"):
        ModelFiles.open(tmp_path)
    write_model(tmp_path, rng, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(cb.UnsupportedOperationError, match="8-bit"):
        ModelFiles.open(tmp_path)
    write_model(tmp_path, rng, hidden_size=None)
    with pytest.raises(cb.InvalidArgumentError, match=r"config\.json.*hidden_size"):
        ModelFiles.open(tmp_path)


def test_tensors_that_do_not_fit_the_config_are_named(tmp_path: Path, rng: np.random.Generator) -> None:
    write_model(tmp_path, rng)
    state = safetensors_torch.load_file(tmp_path / "model.safetensors")

    def rewrite(**changes: Any) -> ModelFiles:
        tensors = {**state, **changes}
        safetensors_torch.save_file({k: v for k, v in tensors.items() if v is not None}, tmp_path / "model.safetensors")
        return ModelFiles.open(tmp_path)

    files = rewrite(**{"model.layers.1.self_attn.k_proj.weight": torch.randn(48, 64)})
    files.layer_weights(0)
    with pytest.raises(cb.CheckpointError, match=r"model\.safetensors.*'model\.layers\.1\.self_attn\.k_proj\.weight'"
                                                 r".*\[48, 64\].*\[32, 64\]"):
        files.layer_weights(1)
    files = rewrite(**{"model.layers.0.self_attn.q_norm.weight": None})
    with pytest.raises(cb.CheckpointError, match="'model.layers.0.self_attn.q_norm.weight'"):
        files.layer_weights(0)
    files = rewrite(**{"model.norm.weight": torch.ones(64, dtype=torch.int32)})
    with pytest.raises(cb.CheckpointError, match="'model.norm.weight' is I32"):
        files.final_norm()
    assert len(files.raw_config["id2label"]) == 3
    files = rewrite(**{"score.weight": torch.randn(2, 64)})
    with pytest.raises(cb.CheckpointError, match=r"'score\.weight' has shape \[2, 64\].*\[3, 64\]"):
        files.score()
    with pytest.raises(cb.CheckpointError, match="no embedding"):
        rewrite(**{"model.embed_tokens.weight": None})
    with pytest.raises(cb.InvalidArgumentError, match=r"\[0, 2\)"):
        files.layer_weights(2)
    with pytest.raises(cb.InvalidArgumentError, match="'float32' or 'bfloat16'"):
        files.embedding("float16")
