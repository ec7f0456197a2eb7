"""Export a trained model as a Hugging Face Hub folder: GPT-2 weights, tokenizer, model card.

`transformers.GPT2LMHeadModel.from_pretrained(directory)` loads the weights. The
mapping is exact: GPT-2's Conv1D stores weights as (in, out), so every Linear
matrix is transposed; the activation is GELU's tanh approximation ("gelu_new"),
layer-norm epsilon 1e-5. A model without biases exports zero biases, and an untied
head exports `lm_head.weight` with `tie_word_embeddings: false`: both give the
same function.

Given the vocabulary, the folder is also what `AutoTokenizer`, `pipeline("text-generation")`
and the Hub read: `tokenizer.json` (built with the `tokenizers` library: one token per
character, no special tokens), `tokenizer_config.json`, `generation_config.json` and a
model card (`README.md` with the Hub's YAML metadata). A character model has no
end-of-text token, so no end, start or padding id is set anywhere: generation runs for
the length asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from mlx.utils import tree_flatten
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from .checkpoint import save_arrays
from .config import GPTConfig, SampleConfig
from .data import Vocab
from .files import atomic_path, write_text_atomic
from .model import GPT

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"
# everything `export_hf` writes (a folder holding other files of these names is refused)
EXPORT_FILES = (HF_WEIGHTS, HF_CONFIG, TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG, MODEL_CARD)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier export (its weights and a GPT-2 config.json)."""
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return (folder / HF_WEIGHTS).is_file() and config.get("model_type") == "gpt2"


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
        # explicit nulls: GPT2Config's defaults (50256) would otherwise stand in
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
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


def char_tokenizer(vocab: Vocab) -> Tokenizer:
    """A `tokenizers.Tokenizer` that gives each character its id in `vocab`, and nothing else.

    Every character is its own pre-token (the pattern `[\\s\\S]` matches newlines too),
    each looked up in a word-level table; no normaliser, no special tokens, and a
    decoder that joins tokens without spaces, so decode(encode(text)) == text. A
    character outside the vocabulary makes `encode` raise ("WordLevel error: Missing
    [UNK] token from the vocabulary"): the table has no unknown token to fall back on.
    """
    table = {ch: i for i, ch in enumerate(vocab.chars)}
    tokenizer = Tokenizer(models.WordLevel(table, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def tokenizer_config(cfg: GPTConfig) -> dict:
    """`tokenizer_config.json`: the fast tokenizer class, no special tokens, no clean-up
    (transformers' default clean-up would delete the space before '.', ',', '!' ...)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def generation_config(cfg: GPTConfig, sampling: SampleConfig) -> dict:
    """`generation_config.json`: sampling as `shakespeare-gpt sample` does by default, no
    end-of-text token (`generate` stops only at the length asked for), and a default
    length of one context (`max_length`), as far as GPT-2's learned positions reach."""
    config: dict[str, Any] = {
        "do_sample": sampling.temperature > 0,
        "max_length": cfg.block_size,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if sampling.temperature > 0:
        config["temperature"] = sampling.temperature
    if sampling.top_k is not None:
        config["top_k"] = sampling.top_k
    if sampling.top_p is not None:
        config["top_p"] = sampling.top_p
    return config


@dataclass(frozen=True)
class CardFacts:
    """What the model card states about the exported checkpoint.

    `evaluation` is `mlx_model.evaluate.evaluate`'s result on the validation split
    (val_loss in nats per character, perplexity, bits_per_char, tokens);
    `configuration` the settings it was trained with ({"model": ..., "training": ...,
    "data": ...}); `source` where the corpus came from (URL or path) and its SHA-256.
    """

    name: str
    evaluation: dict[str, float]
    configuration: dict[str, Any]
    source: str
    sha256: str


HUB_DATASET = "karpathy/tiny_shakespeare"


def model_card(facts: CardFacts, vocab: Vocab, model: GPT) -> str:
    """`README.md` for the Hub: YAML metadata (data set, metrics, training configuration,
    the model-index results) and a short body saying what the model is and how to run it."""
    ev, cfg = facts.evaluation, model.config
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))

    def result(metric: str, value: float, name: str) -> EvalResult:
        return EvalResult(
            task_type="text-generation",
            task_name="Character-level text generation",
            dataset_type=HUB_DATASET,
            dataset_name="Tiny Shakespeare",
            dataset_split="validation",
            metric_type=metric,
            metric_value=round(float(value), 4),
            metric_name=name,
        )

    data = ModelCardData(
        model_name=facts.name,
        language="en",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "character-level", "mlx", "shakespeare"],
        datasets=[HUB_DATASET],
        metrics=["loss", "perplexity", "bpc"],
        eval_results=[
            result("loss", ev["val_loss"], "validation loss (nats per character)"),
            result("perplexity", ev["perplexity"], "validation perplexity"),
            result("bpc", ev["bits_per_char"], "bits per character"),
        ],
        training_config=facts.configuration,
    )
    split = facts.configuration.get("data", {}).get("val_fraction")
    split_text = f"the last {split:.0%} of the characters" if split else "a held-out tail"
    body = f"""
# {facts.name}

A GPT-2-style character model trained on Tiny Shakespeare with shakespeare-gpt (MLX),
exported as `GPT2LMHeadModel`: {cfg.n_layer} layers, {cfg.n_head} heads, width
{cfg.n_emb}, context {cfg.block_size} characters, {n_params:,} parameters.

## Evaluation

On the validation split ({split_text}, {int(ev["tokens"])} predicted characters):
validation loss **{ev["val_loss"]:.4f}** nats per character, perplexity
{ev["perplexity"]:.3f}, **{ev["bits_per_char"]:.4f}** bits per character.

## Use

```python
from transformers import pipeline

generate = pipeline("text-generation", model="PATH_OR_HUB_ID")
text = generate("ROMEO:\\n", max_new_tokens={cfg.block_size - 8}, do_sample=True)
print(text[0]["generated_text"])
```

The tokenizer has one token per character and no special tokens. It knows exactly
these {vocab.size} characters and raises on any other ("Missing [UNK] token"):

    {vocab.chars!r}

There is no end-of-text token, so generation runs for the length asked
(`max_new_tokens`; by default one context, `max_length` {cfg.block_size}). GPT-2 has
learned positions, so prompt plus generation must fit in {cfg.block_size} characters
(`shakespeare-gpt sample` and `shakespeare-gpt api` slide the context and have no
such limit).

## Training

Data: Tiny Shakespeare ({facts.source}; SHA-256 `{facts.sha256}`): {split_text} for
validation, the rest for training. The full configuration is in the metadata above
(`training_config`).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def export_hf(
    model: GPT,
    out_dir: Path,
    vocab: Vocab | None = None,
    sampling: SampleConfig | None = None,
    card: CardFacts | None = None,
) -> Path:
    """Write the GPT2LMHeadModel weights and `config.json` into `out_dir`; with `vocab`,
    also the tokenizer files and `generation_config.json`; with `card` too, `README.md`.

    Raises ValueError naming what prevents it when the model cannot be expressed as
    GPT-2, or when the vocabulary's size differs from the model's.
    """
    blockers = export_blockers(model)
    if vocab is not None and vocab.size != model.config.vocab_size:
        blockers.append(f"vocabulary of {vocab.size} for a model of {model.config.vocab_size}")
    if blockers:
        raise ValueError("cannot export as Hugging Face GPT-2: " + "; ".join(blockers))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    weights = {k: np.array(v) for k, v in hf_state_dict(model).items()}  # float32
    with atomic_path(out_dir / HF_WEIGHTS) as tmp:  # a full disk: an OSError naming the file
        save_arrays(weights, tmp, metadata={"format": "pt"})
    write_json_atomic(out_dir / HF_CONFIG, hf_config(cfg))
    if vocab is None:
        return out_dir
    with atomic_path(out_dir / TOKENIZER) as tmp:
        char_tokenizer(vocab).save(str(tmp))
    write_json_atomic(out_dir / TOKENIZER_CONFIG, tokenizer_config(cfg))
    write_json_atomic(
        out_dir / GENERATION_CONFIG, generation_config(cfg, sampling or SampleConfig())
    )
    if card is not None:
        write_text_atomic(out_dir / MODEL_CARD, model_card(card, vocab, model))
    return out_dir


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
