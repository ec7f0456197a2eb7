from __future__ import annotations

import json
import os
import subprocess
import sys

from flows.cli import main


def test_unknown_stage_exits_2_naming_it():
    proc = subprocess.run(
        [sys.executable, "-m", "flows", "stage", "smaple"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown stage 'smaple'" in proc.stderr


def test_unknown_preset_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "flows", "run", "--preset", "huge"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown preset 'huge'" in proc.stderr


def test_run_then_rerun_sample_stage(tmp_path, corpus_path, corpus_sha, capsys, prefect_harness):
    common = [
        "--preset",
        "tiny",
        "--artifacts",
        str(tmp_path),
        "--source",
        str(corpus_path),
        "--sha256",
        corpus_sha,
        "--max-tokens",
        "30",
    ]
    assert main(["run", *common]) == 0
    out = capsys.readouterr().out
    assert "----- sample -----" in out and "val_loss " in out
    assert main(["sample", *common, "--prompt", "JULIET:", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "JULIET:" in out
    cached = json.loads(out.split("cached: ")[1].splitlines()[0])
    assert cached == {
        "download": True,
        "vocab": True,
        "tokenize": True,
        "train": True,
        "evaluate": True,
        "sample": False,
    }
    manifest_path = out.split("manifest: ")[1].splitlines()[0]
    manifest = json.loads(open(manifest_path).read())
    assert manifest["stages"]["train"]["cached"] is True
    assert manifest["params"]["sampling"]["prompt"] == "JULIET:"


def test_progress_bars_for_download_and_training(tmp_path, corpus_path, corpus_sha):
    env = {**os.environ, "SHAKESPEARE_GPT_PROGRESS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows", "stage", "train", "--preset", "tiny",
         "--artifacts", str(tmp_path), "--source", corpus_path.as_uri(), "--sha256", corpus_sha],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "download" in proc.stderr and "1.1/1.1 MB" in proc.stderr  # bytes of the corpus
    assert "training" in proc.stderr and "step 30/30" in proc.stderr and "tok/s" in proc.stderr


def test_export_command_trains_if_needed_then_writes_gpt2_layout(
    tmp_path, corpus_path, corpus_sha, prefect_harness, capsys
):
    args = ["--preset", "tiny", "--artifacts", str(tmp_path / "a"), "--source", str(corpus_path)]
    assert main(["export", *args, "--sha256", corpus_sha, "--out", str(tmp_path / "hf")]) == 0
    assert "exported the trained model as GPT2LMHeadModel" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_what_a_flows_first_call_imports_is_imported_while_the_server_boots():
    """`import_flows` (run while the temporary server boots) also imports what Prefect
    imports only at a flow's and a task's first call, after the server answers; in a
    fresh interpreter, none of it is loaded by importing the pipeline alone."""
    import subprocess
    import sys

    late = ["prefect.flow_engine", "prefect.task_engine", "fastapi.encoders",
            "prefect.utilities.visualization"]  # fmt: skip
    code = (
        "import sys\nimport flows.cli as cli\nfrom flows import pipeline\n"
        f"print([m in sys.modules for m in {late!r}])\n"
        "cli.import_flows('run')\n"
        f"print([m in sys.modules for m in {late!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = proc.stdout.splitlines()[-2:]
    assert before == str([False] * len(late)) and after == str([True] * len(late))


def test_the_step_run_ahead_has_the_model_the_train_stage_trains(corpus_path):
    """The compiled step runs ahead only where its signature is the one the train stage's
    run records as warm, and the train stage sets the model's vocabulary size from the
    corpus: for Tiny Shakespeare every GPU preset's own size is the corpus's, so the
    configuration the CLI runs ahead is the one the stage trains."""
    from mlx_model.config import PRESETS
    from mlx_model.data import Vocab

    size = Vocab.from_text(corpus_path.read_text()).size
    for name, preset in PRESETS.items():
        assert preset.model.replace(vocab_size=size) == preset.model, name


def test_a_command_that_trains_loads_the_gpu_attention_while_the_server_boots(
    monkeypatch, tmp_path
):
    import flows.cli as cli
    import flows.temporary_server as temporary_server
    import tasks.sweep
    import tasks.train

    calls = []
    # main sets it where unset; set here, it is restored after the test
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", '["flows.quiet_worker"]')

    class Booting:
        def wait(self):
            calls.append("server answers")

    monkeypatch.setattr(temporary_server, "start_if_needed", lambda: Booting())
    monkeypatch.setattr(cli, "import_flows", lambda command: calls.append("imports"))
    warmed = []

    def prepare_device(model=None, training=None, parallel=None):
        calls.append("attention")
        warmed.append((model, training, parallel))

    monkeypatch.setattr(tasks.train, "prepare_device", prepare_device)
    monkeypatch.setattr(cli, "execute", lambda args, params: calls.append("flow") or 0)
    assert main(["run", "--preset", "tiny", "--set", "training.batch_size=4"]) == 0
    assert calls == ["imports", "attention", "server answers", "flow"]
    # the run's own settings, for its compiled step's warm run
    model, training, parallel = warmed.pop()
    assert (model.n_emb, training.batch_size, parallel.world_size) == (16, 4, 1)
    calls.clear()
    export = ["export", "--out", str(tmp_path / "hf")]
    for command in (["stage", "train"], ["stage", "evaluate"], ["sample"], export):
        assert main([*command, "--preset", "tiny"]) == 0
        assert warmed.pop()[1].max_iters == 30, command  # may train: the step runs ahead
    monkeypatch.setattr(tasks.sweep, "best_trial", lambda root, model: None)
    for command in (["stage", "vocab"], ["sample", "--model", "best-of:s"]):
        assert main([*command, "--preset", "tiny"]) == 0
        assert warmed.pop() == (None, None, None), command  # trains nothing: no step
    calls.clear()
    assert main(["sweep", "--preset", "tiny", "--grid", "training.learning_rate=1e-3"]) == 0
    assert calls == ["imports", "server answers", "flow"]  # a sweep trains in its workers
