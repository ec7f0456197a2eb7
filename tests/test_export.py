"""Hugging Face GPT-2 export: transformers loads it and gives the same logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_model.config import GPTConfig
from mlx_model.export import export_blockers, export_hf
from mlx_model.model import GPT

CONFIGS = [
    GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_emb=16, dropout=0.1),
    GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_emb=16, bias=False),
    GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_emb=8, tie_weights=False),
]


def trained_looking(cfg: GPTConfig, seed: int) -> GPT:
    """A model whose biases and norms are not at their initial values (zero / one)."""
    mx.random.seed(seed)
    model = GPT(cfg)
    model.update(tree_map(lambda v: v + 0.05 * mx.random.normal(v.shape), model.parameters()))
    return model


@pytest.mark.parametrize("cfg", CONFIGS, ids=["gpt2", "no-bias", "untied"])
def test_transformers_gives_the_same_logits(cfg, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = trained_looking(cfg, seed=3)
    model.eval()
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == cfg.n_emb
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size))
    ours = model(mx.array(idx, dtype=mx.int32))
    with torch.no_grad():
        theirs = hf(torch.tensor(idx)).logits.numpy()
    np.testing.assert_allclose(np.array(ours), theirs, atol=1e-4, rtol=0)


def test_export_names_what_prevents_it(tmp_path):
    model = GPT(CONFIGS[0])
    model.h[1].ln_2.eps = 1e-6
    assert export_blockers(model) == [
        "layer-norm epsilon [1e-06, 1e-05] (GPT2LMHeadModel here is exported with 1e-5)"
    ]
    with pytest.raises(ValueError, match="cannot export as Hugging Face GPT-2: layer-norm"):
        export_hf(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
