"""Export a trained model in Hugging Face's GPT-2 layout (safetensors + config.json).

`transformers.GPT2LMHeadModel.from_pretrained(directory)` loads the result. The
mapping is exact: GPT-2's Conv1D stores weights as (in, out), so every Linear
matrix is transposed; the activation is GELU's tanh approximation ("gelu_new"),
layer-norm epsilon 1e-5. A model without biases exports zero biases, and an untied
head exports `lm_head.weight` with `tie_word_embeddings: false`: both give the
same function. The character vocabulary is not a Hugging Face tokenizer, so
`vocab.json` (this project's format) goes alongside when given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import save_arrays
from .config import GPTConfig
from .files import atomic_path, write_text_atomic
from .model import GPT

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


def export_blockers(model: GPT) -> list[str]:
    """Reasons this model cannot be expressed as a GPT2LMHeadModel (empty when it can).

    Every GPTConfig option maps exactly (see the module docstring); what GPT-2's
    config cannot carry is a per-layer-norm epsilon other than one shared value.
    """
    eps = {m.eps for m in [model.ln_f, *(n for b in model.h for n in (b.ln_1, b.ln_2))]}
    if len(eps) > 1 or eps != {1e-5}:
        return [f"layer-norm epsilon {sorted(eps)} (GPT2LMHeadModel here is exported with 1e-5)"]
    return []


def hf_config(cfg: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_emb,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_emb,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout if cfg.attention_dropout else 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def hf_state_dict(model: GPT) -> dict[str, mx.array]:
    """The model's parameters under GPT-2's names and layouts, float32."""
    cfg = model.config
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, mx.array] = {
        "transformer.wte.weight": params["wte.weight"],
        "transformer.wpe.weight": params["wpe.weight"],
    }

    def norm(src: str, dst: str, dims: int) -> None:
        out[f"{dst}.weight"] = params[f"{src}.weight"]
        out[f"{dst}.bias"] = params.get(f"{src}.bias", mx.zeros((dims,)))

    def conv1d(src: str, dst: str, n_out: int) -> None:
        out[f"{dst}.weight"] = params[f"{src}.weight"].T  # (out, in) -> Conv1D's (in, out)
        out[f"{dst}.bias"] = params.get(f"{src}.bias", mx.zeros((n_out,)))

    C = cfg.n_emb
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}", f"transformer.h.{i}"
        norm(f"{src}.ln_1", f"{dst}.ln_1", C)
        conv1d(f"{src}.attn.c_attn", f"{dst}.attn.c_attn", 3 * C)
        conv1d(f"{src}.attn.c_proj", f"{dst}.attn.c_proj", C)
        norm(f"{src}.ln_2", f"{dst}.ln_2", C)
        conv1d(f"{src}.mlp.c_fc", f"{dst}.mlp.c_fc", 4 * C)
        conv1d(f"{src}.mlp.c_proj", f"{dst}.mlp.c_proj", C)
    norm("ln_f", "transformer.ln_f", C)
    if not cfg.tie_weights:
        out["lm_head.weight"] = params["lm_head.weight"]
    return {k: mx.contiguous(v.astype(mx.float32)) for k, v in out.items()}


def export_hf(model: GPT, out_dir: Path, vocab_json: Path | None = None) -> Path:
    """Write `model.safetensors` and `config.json` for GPT2LMHeadModel into `out_dir`."""
    blockers = export_blockers(model)
    if blockers:
        raise ValueError("cannot export as Hugging Face GPT-2: " + "; ".join(blockers))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: np.array(v) for k, v in hf_state_dict(model).items()}  # float32
    with atomic_path(out_dir / HF_WEIGHTS) as tmp:  # a full disk: an OSError naming the file
        save_arrays(weights, tmp, metadata={"format": "pt"})
    write_text_atomic(out_dir / HF_CONFIG, json.dumps(hf_config(model.config), indent=2))
    if vocab_json is not None:
        shutil.copyfile(vocab_json, out_dir / "vocab.json")
    return out_dir
