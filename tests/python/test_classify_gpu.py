"""The classify pipeline on a CUDA device against the CPU backend (the CPU side is itself checked
against transformers, torch and peft in test_classify_train.py): the same run on both devices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from cudablocks.classify.inference import predict  # noqa: E402
from cudablocks.classify.trainer import train  # noqa: E402
from test_classify_train import WORDS, make_data, make_model_dir, settings_for  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["full", "lora", "head"])
def test_fp32_training_on_the_gpu_matches_the_cpu(mode: str, tmp_path: Path, rng: np.random.Generator) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 80)
    kw = dict(mode=mode, max_steps=10, pooling="last", train_embeddings=mode == "full", recompute=mode == "lora")
    if mode == "lora":
        kw.update(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj", "down_proj"), lr=5e-3)
    cpu = train(settings_for(model_dir, data, tmp_path / "cpu", device="cpu", **kw), log=lambda *a: None)
    gpu = train(settings_for(model_dir, data, tmp_path / "gpu", device="cuda:0", **kw), log=lambda *a: None)
    # fp32 on both: only the order of the sums differs.
    np.testing.assert_allclose(gpu.train_losses, cpu.train_losses, rtol=0, atol=1e-4)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(6)]
    p_cpu = np.array([list(r["probs"].values()) for r in predict(tmp_path / "cpu", texts, device="cpu")])
    p_gpu = np.array([list(r["probs"].values()) for r in predict(tmp_path / "gpu", texts, device="cuda:0")])
    np.testing.assert_allclose(p_gpu, p_cpu, atol=1e-4)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_training_on_the_gpu_learns(precision: str, tmp_path: Path, rng: np.random.Generator) -> None:
    model_dir = make_model_dir(tmp_path, int(rng.integers(1 << 30)))
    data = make_data(tmp_path / "train.jsonl", rng, 120)
    for mode in ("full", "lora"):
        kw = dict(mode=mode, precision=precision, max_steps=24, device="cuda:0")
        if mode == "lora":
            kw.update(lora_rank=8, lora_alpha=16.0, lr=5e-3)
        fp32 = train(settings_for(model_dir, data, tmp_path / f"{mode}-fp32", **{**kw, "precision": "fp32"}),
                     log=lambda *a: None)
        fast = train(settings_for(model_dir, data, tmp_path / f"{mode}-{precision}", **kw), log=lambda *a: None)
        # Reduced-precision products: the same training curve within their rounding, and it goes down.
        np.testing.assert_allclose(fast.train_losses, fp32.train_losses, rtol=0, atol=5e-2)
        assert np.mean(fast.train_losses[-4:]) < np.mean(fast.train_losses[:4])
