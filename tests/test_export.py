"""Hugging Face export: transformers loads the weights (same logits), the tokenizer (same
ids) and runs the text-generation pipeline; the model card states the validation loss."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_model.checkpoint import load_model
from mlx_model.config import GPTConfig
from mlx_model.data import Vocab, read_tokens
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


# ----- the Hub folder of a trained model (shakespeare-gpt export) -----

HUB_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip


def stage_path(hub_export, stage: str) -> Path:
    return Path(hub_export["manifest"]["stages"][stage]["path"])


def test_hub_folder_has_no_end_of_text_token(hub_export):
    out = hub_export["out"]
    assert {p.name for p in out.iterdir()} == HUB_FILES
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for ids in (config, generation):
        assert ids["eos_token_id"] is None and ids["bos_token_id"] is None
        assert ids["pad_token_id"] is None
    assert generation["max_length"] == config["n_positions"] == 128


def test_pipeline_generates_100_characters_with_the_projects_first_logits(hub_export):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out, prompt = hub_export["out"], "ROMEO:\n"
    vocab = Vocab.load(stage_path(hub_export, "train") / "vocab.json")
    ours = load_model(stage_path(hub_export, "train") / "best")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt)["input_ids"]
    assert ids == vocab.encode(prompt).tolist()  # one id per character, nothing added
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1].numpy()
    first = np.array(ours(mx.array([ids], dtype=mx.int32))[0, -1])
    np.testing.assert_allclose(first, theirs, atol=1e-4, rtol=0)

    generate = transformers.pipeline("text-generation", model=str(out))
    text = generate(prompt, max_new_tokens=110, do_sample=True)[0]["generated_text"]
    assert text.startswith(prompt)
    new = text[len(prompt) :]
    assert len(new) == 110 and set(new) <= set(vocab.chars)  # not stopped at a newline


def test_tokenizer_round_trips_the_validation_text(hub_export):
    transformers = pytest.importorskip("transformers")
    vocab = Vocab.load(stage_path(hub_export, "train") / "vocab.json")
    val_ids, _ = read_tokens(stage_path(hub_export, "tokenize") / "val.arrow")
    text = vocab.decode(val_ids)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hub_export["out"])
    ids = tokenizer(text)["input_ids"]
    assert ids == val_ids.tolist()
    assert tokenizer.decode(ids) == text


def test_tokenizer_refuses_characters_outside_the_vocabulary(hub_export):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hub_export["out"])
    with pytest.raises(Exception, match=r"Missing \[UNK\] token"):
        tokenizer("ROMEO: caf\u00e9")


def test_model_card_states_data_configuration_and_validation_loss(hub_export):
    from huggingface_hub import ModelCard

    card = ModelCard.load(hub_export["out"] / "README.md")
    evaluation = json.loads((stage_path(hub_export, "evaluate") / "eval.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["loss"] == round(evaluation["val_loss"], 4)
    assert results["bpc"] == round(evaluation["bits_per_char"], 4)
    assert card.data.datasets == ["karpathy/tiny_shakespeare"]
    assert card.data.pipeline_tag == "text-generation"
    config = card.data.training_config
    assert config["model"]["block_size"] == 128 and config["training"]["max_iters"] == 30
    assert f"**{evaluation['val_loss']:.4f}** nats per character" in card.text
    assert "/" not in card.text.split("Data: Tiny Shakespeare (")[1].split(";")[0]  # no path


def test_an_export_never_overwrites_files_that_are_not_an_earlier_export(tmp_path):
    """Exporting into a project folder replaced its README.md with the model card."""
    from tasks.preflight import check_export_target

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "README.md").write_text("# my project\n")
    (folder / "notes.txt").write_text("mine\n")
    with pytest.raises(ValueError, match="already holds README.md, not from an earlier export"):
        check_export_target(str(folder))
    (folder / "README.md").unlink()
    check_export_target(str(folder))  # other files are left alone
    export_hf(GPT(CONFIGS[0]), folder)
    (folder / ".git").mkdir()  # a Hub clone
    check_export_target(str(folder))  # an earlier export is updated in place
    assert (folder / "notes.txt").read_text() == "mine\n"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):  # readable as any file the user writes
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
