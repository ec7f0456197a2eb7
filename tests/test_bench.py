"""The GPU benches' own logic, checked on the CPU: finding the first estimate at or below
the target in a timestamped log, the steady throughput, the ratios, the arguments."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import cudnn_attention_check  # noqa: E402
import gpu_profile  # noqa: E402
import gpu_race  # noqa: E402
import gpu_scaling  # noqa: E402

from mlx_model import warmup  # noqa: E402

# what bench/train_preset.py --every-log prints, timestamped as gpu_race.timed_lines does
PROJECT = [
    (3.0, "log 50 1.900 s 90000 tok/s"),
    (4.0, "log 100 2.400 s 1200000 tok/s"),
    (4.3, "step 100 train 2.0012 val 2.0345 1200000 tok/s"),
    (5.0, "log 150 3.100 s 1000000 tok/s"),  # holds the estimate's time: left out
    (5.6, "log 200 3.700 s 1300000 tok/s"),
    (5.9, "step 200 train 1.4512 val 1.4700 1300000 tok/s"),
    (6.5, "step 300 train 1.4012 val 1.4600 1300000 tok/s"),
    (7.0, '{"steps": 300, "best_est_val_loss": 1.46}'),
]


def test_first_estimate_at_or_below_the_target_is_found_with_its_time():
    assert gpu_race.first_at_target(PROJECT, 1.47) == (5.9, 200, 1.47)
    assert gpu_race.first_at_target(PROJECT, 2.1) == (4.3, 100, 2.0345)
    assert gpu_race.first_at_target(PROJECT, 1.40) is None
    # the reference's estimate lines have no tok/s after them
    assert gpu_race.first_at_target([(9.5, "step 1400 train 1.39 val 1.469")], 1.47) == (
        9.5,
        1400,
        1.469,
    )


def test_steady_throughput_leaves_out_the_first_interval_and_those_with_an_estimate():
    lines = [line for _, line in PROJECT]
    assert gpu_race.steady_tokens_per_sec(lines) == pytest.approx((1_200_000 + 1_300_000) / 2)
    assert gpu_race.steady_tokens_per_sec(lines[:1]) is None
    assert gpu_race.last_json(lines) == {"steps": 300, "best_est_val_loss": 1.46}
    assert gpu_race.last_json(["no json here"]) == {}


def test_flops_per_token_counts_the_models_parameters_without_wpe():
    from mlx.utils import tree_flatten

    from mlx_model.config import get_preset
    from mlx_model.model import GPT

    cfg = get_preset("nanogpt-char").model.replace(vocab_size=65)
    params = GPT(cfg).parameters()
    n = sum(v.size for name, v in tree_flatten(params) if name != "wpe.weight")
    want = 6 * n + 12 * cfg.n_layer * cfg.n_emb * cfg.block_size  # nanoGPT's estimate_mfu
    assert gpu_race.flops_per_token(cfg.n_layer, cfg.n_emb, cfg.block_size, 65) == want


def _run(side, cache, rnd, seconds, tps):
    return gpu_race.Run(side, cache, rnd, seconds_to_target=seconds, tokens_per_sec=tps)


def test_summary_pairs_each_warm_round_with_its_partner():
    runs = [
        _run("project", "cold", 0, 140.0, 1.0e6),
        _run("reference", "cold", 0, 36.0, 1.5e6),
        _run("project", "warm", 1, 12.0, 1.2e6),
        _run("reference", "warm", 1, 24.0, 1.6e6),
        _run("project", "warm", 2, 11.0, 1.1e6),
        _run("reference", "warm", 2, None, 1.0e6),  # never reached the target
        _run("project-same-recipe", "warm", 1, None, 1.4e6),  # tok/s only, no estimates
    ]
    s = gpu_race.summary(runs)
    assert s["project"]["cold_seconds_to_target"] == 140.0
    assert s["project"]["warm_seconds_to_target"] == [11.0, 12.0]
    assert s["reference"]["warm_seconds_to_target"] == [24.0, 24.0]
    ratios = s["project_over_reference"]
    assert sorted(ratios["seconds_to_target"]) == [0.5, round(140 / 36, 3)]
    assert sorted(ratios["tokens_per_sec"]) == [round(1 / 1.5, 3), 0.75, 1.1]
    assert ratios["same_recipe_tokens_per_sec"] == [0.875]
    assert s["project-same-recipe"]["tokens_per_sec"] == [1.4e6, 1.4e6]


def test_race_arguments_are_checked_before_any_run(tmp_path, capsys):
    corpus = tmp_path / "input.txt"
    corpus.write_text("hello")
    with pytest.raises(SystemExit) as err:
        gpu_race.parse_args(["--corpus", str(tmp_path / "missing.txt")])
    assert err.value.code == 2
    assert "--corpus: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_race.parse_args(["--corpus", str(corpus), "--rounds", "-1"])
    assert "--rounds must be >= 0, got -1" in capsys.readouterr().err
    args = gpu_race.parse_args(["--corpus", str(corpus)])
    assert (args.preset, args.reference_preset, args.target) == (
        "nanogpt-char-fast",
        "nanogpt-char",
        1.47,
    )
    smoke = gpu_race.parse_args(["--corpus", str(corpus), "--smoke"])
    assert (smoke.preset, smoke.target) == ("tiny", 10.0)
    assert gpu_race.commands(smoke)["reference"][-3:] == ["--device", "cpu", "--no-compile"]


def test_scaling_speedups_are_over_the_same_rounds_one_gpu_run(tmp_path, capsys):
    runs = [
        {"gpus": 1, "round": 1, "tokens_per_sec": 0.5e6},  # the compiling round: left out
        {"gpus": 2, "round": 1, "tokens_per_sec": 0.4e6},
        {"gpus": 1, "round": 2, "tokens_per_sec": 1.0e6},
        {"gpus": 2, "round": 2, "tokens_per_sec": 1.8e6},
        {"gpus": 1, "round": 3, "tokens_per_sec": 1.2e6},
        {"gpus": 2, "round": 3, "tokens_per_sec": None},  # a failed run
    ]
    assert gpu_scaling.speedups(runs) == {2: [1.8]}
    corpus = tmp_path / "input.txt"
    corpus.write_text("hello")
    with pytest.raises(SystemExit):
        gpu_scaling.parse_args(["--corpus", str(corpus), "--gpus", "1,two"])
    assert "--gpus must be whole numbers separated by commas, got '1,two'" in (
        capsys.readouterr().err
    )


def test_the_race_waits_for_the_cold_runs_warm_up_before_warm_rounds(tmp_path):
    """Warm rounds must find every kernel cached: the wait ends when the warm-up child
    records a marker (lock files and temp files do not count), and is skipped where no
    warm-up ran."""
    cache = tmp_path / "mlx"
    assert gpu_race.wait_for_warm_up(cache, timeout=5) is None  # no warm-up started
    (cache / ".warmup").mkdir(parents=True)
    (cache / ".warm").mkdir()
    (cache / ".warm" / "abc.lock").write_text("")
    (cache / ".warm" / ".tmp-1-abc").write_text("")
    # the first stage's marker (the uncompiled steps' kernels) is not the end
    first_stage = json.dumps(warmup.eager_signature({"mlx": "0.32"}))
    (cache / ".warm" / "def").write_text(first_stage)
    assert gpu_race.wait_for_warm_up(cache, timeout=1) is None  # not finished in time
    log = cache / ".warmup" / "123-ab.log"  # a child still at work (on to cuDNN's step)
    log.write_text("")
    timer = threading.Timer(1.0, lambda: (cache / ".warm" / "abc").write_text('{"mlx": "0.32"}'))
    timer.start()
    log.write_text("warm-up cudnn: lock taken after 0.0 s\n")
    assert gpu_race.wait_for_warm_up(cache, timeout=3, keep=tmp_path / "kept") is None
    timer.join()  # a child still running when the wait gives up: its log so far is kept
    assert "lock taken" in (tmp_path / "kept" / "123-ab.log").read_text()
    threading.Timer(1.0, log.unlink).start()
    waited = gpu_race.wait_for_warm_up(cache, timeout=30)
    assert waited is not None and 0.5 <= waited < 30


def test_the_profile_groups_kernels_and_counts_them_per_step():
    """Kernel names as CUPTI reports MLX's and cuBLAS's kernels on an H200."""
    names = {
        "nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT": "matmul",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float>": "matmul",
        "mlx::core::cu::rbitsc(unsigned int const*, unsigned char*, dim3, bool)": "random bits",
        "void mlx::core::cu::layer_norm_vjp<__nv_bfloat16, true, 64, 8>(...)": (
            "normalisation and softmax"
        ),
        "void mlx::core::cu::col_reduce_looped<__nv_bfloat16, Sum, 1>(...)": "reduction",
        "void mlx::core::cu::copy_g<__nv_bfloat16, __nv_bfloat16, int, 8>(...)": "copy",
        "void mlx::core::cu::CV2ITanhADV2IBroadcastBEV2OAddCD_VC_V2_1015_contiguous<uint, 8>": (
            "fused element-wise"
        ),
        "void mlx::core::cu::binary_vv<mlx::core::cu::Add, float>(...)": "element-wise",
        "void mlx::core::cu::scatter<float, int, ScatterSum>(...)": "gather/scatter",
        "Memset (Unknown)": "memset",
        "some_kernel": "other",
    }
    for name, group in names.items():
        assert gpu_profile.kernel_group(name) == group, name
    rows = [("nvjet_a", 2000.0, 40), ("Memset (Unknown)", 100.0, 20), ("cudaLaunchKernel", 0, 99)]
    kernels = gpu_profile.per_step(rows, steps=20)
    assert [k["kernel"] for k in kernels] == ["nvjet_a", "Memset (Unknown)"]  # no host calls
    assert kernels[0]["ms_per_step"] == pytest.approx(0.1)
    assert kernels[0]["launches_per_step"] == 2
    totals = gpu_profile.group_totals(kernels)
    assert list(totals) == ["matmul", "memset"]
    assert totals["memset"] == {"ms": pytest.approx(0.005), "launches": 1.0}


def test_the_profile_times_the_tiny_preset_on_the_cpu():
    report = gpu_profile.main(["--smoke", "--steps", "2", "--rounds", "2"])
    assert report["preset"] == "tiny" and len(report["ms_per_step"]) == 2
    assert all(ms > 0 for ms in report["ms_per_step"])


def test_bench_settings_are_checked_before_any_run(tmp_path, capsys):
    """A bad --set or preset ends the race in one line before it starts a run; the
    settings are parsed as train_preset parses them (bare field names, typed values)."""
    assert gpu_race.shape("tiny", ["n_layer=3"])[0] == 3
    for sets, words in (
        (["no_such=1"], "unknown field 'no_such'"),
        (["learning_rate=abc"], "learning_rate takes a float"),
        (["n_layer=abc"], "n_layer takes an int"),
        (["n_layer"], "expected FIELD=VALUE"),
        (["n_layer=0"], "n_layer must be a positive integer, got 0"),
    ):
        with pytest.raises(ValueError, match=words):
            gpu_race.shape("tiny", sets)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        gpu_race.shape("nope")
    corpus = tmp_path / "input.txt"
    corpus.write_text("abc\n" * 100)
    with pytest.raises(SystemExit) as exit_:
        gpu_race.main(
            ["--corpus", str(corpus), "--smoke", "--out", str(tmp_path / "r"), "--set", "x=1"]
        )
    assert exit_.value.code == 2 and "unknown field 'x'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.log"))


def test_a_race_whose_runs_fail_exits_non_zero(tmp_path, capsys):
    corpus = tmp_path / "input.txt"
    corpus.write_text("abc\n" * 100)
    argv = ["--corpus", str(corpus), "--smoke", "--project-only", "--rounds", "0"]
    argv += ["--throughput-steps", "0", "--timeout", "0.01", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_:
        gpu_race.main(argv)
    out = capsys.readouterr()
    assert exit_.value.code == 1 and "1 of 1 runs failed" in out.err
    assert "failed: see" in out.out


def test_a_warm_only_race_reuses_an_earlier_calls_caches_and_runs_no_cold_run(tmp_path, capsys):
    corpus = tmp_path / "input.txt"
    corpus.write_text("abc\n" * 100)
    argv = ["--corpus", str(corpus), "--project-only", "--warm-only"]
    with pytest.raises(SystemExit) as exit_:  # no --out: nothing to reuse
        gpu_race.parse_args(argv)
    assert exit_.value.code == 2 and "--warm-only needs --out" in capsys.readouterr().err
    out = tmp_path / "r"
    argv += ["--throughput-steps", "0", "--timeout", "0.01", "--out", str(out), "--rounds", "1"]
    (out / "caches" / "mlx").mkdir(parents=True)  # a folder, but no kernels marked warm
    with pytest.raises(SystemExit) as exit_:
        gpu_race.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "mlx/.warm (MLX's kernels" in err
    (out / "caches" / "mlx" / ".warm").mkdir()
    (out / "caches" / "mlx" / ".warm" / "0123").write_text("{}")
    for more, missing in (([], "inductor (the reference's"), (["--cli"], "prefect.db")):
        flags = [a for a in argv if a != "--project-only"] if not more else argv + more
        with pytest.raises(SystemExit) as exit_:
            gpu_race.main(flags)
        assert exit_.value.code == 2 and missing in capsys.readouterr().err
    assert not list(out.glob("*.log"))  # refused before any run
    with pytest.raises(SystemExit) as exit_:  # the runs time out: each fails, none is cold
        gpu_race.main(argv)
    assert exit_.value.code == 1 and "1 of 1 runs failed" in capsys.readouterr().err
    assert [p.name for p in out.glob("*.log")] == [f"project-warm-1-{os.getpid()}.log"]


# what `shakespeare-gpt run` logs with SHAKESPEARE_GPT_PROGRESS=0 (the race's --cli)
CLI = [
    (9.1, "04:27:38.273 | INFO    | Task run 'train-4f6' - step 50/1000  loss 2.4448  lr 5.0e-04"
     "  90000 tok/s  ~1 min left"),
    (9.6, "04:27:38.314 | INFO    | Task run 'train-4f6' - step 100/1000  loss 2.2283  lr 1.0e-03"
     "  1200000 tok/s  ~20 s left"),
    (9.9, "04:27:38.346 | INFO    | Task run 'train-4f6' - step 100/1000  train 2.1427  val 2.1454"
     "  lr 1.00e-03  1200000 tok/s"),
    (10.5, "04:27:38.363 | INFO    | Task run 'train-4f6' - step 150/1000  loss 2.0108  lr 1.0e-03"
     "  1000000 tok/s  ~15 s left"),
    (11.0, "04:27:38.392 | INFO    | Task run 'train-4f6' - step 200/1000  loss 1.5830"
     "  lr 9.9e-04  1300000 tok/s  ~14 s left"),
    (11.3, "04:27:38.400 | INFO    | Task run 'train-4f6' - step 200/1000  train 1.4500  val 1.4690"
     "  lr 9.9e-04  1300000 tok/s"),
]  # fmt: skip


def test_the_clis_log_lines_give_the_same_figures(tmp_path):
    """--cli: the estimate and throughput lines of `shakespeare-gpt run`'s log, and its
    --set items in the CLI's SECTION.FIELD form."""
    assert gpu_race.first_at_target(CLI, 1.47) == (11.3, 200, 1.469)
    assert gpu_race.first_at_target(CLI, 2.0) == (11.3, 200, 1.469)
    assert gpu_race.first_at_target(CLI, 2.15) == (9.9, 100, 2.1454)
    lines = [line for _, line in CLI]
    assert gpu_race.steady_tokens_per_sec(lines) == pytest.approx((1_200_000 + 1_300_000) / 2)
    corpus = tmp_path / "input.txt"
    corpus.write_text("abc\n")
    args = gpu_race.parse_args(
        ["--corpus", str(corpus), "--cli", "--set", "dropout=0.0", "--set", "max_iters=5"]
    )
    info = gpu_race.preset_info(args.preset, args.set)
    assert info["sections"] == {"dropout": "model", "max_iters": "training"}
    cmd = gpu_race.commands(args, info["sections"])["project"]
    assert cmd[1:4] == ["-m", "flows", "run"] and gpu_race.ARTIFACTS in cmd
    assert cmd[-4:] == ["--set", "model.dropout=0.0", "--set", "training.max_iters=5"]
    assert corpus.resolve().as_uri() in cmd and "--verbose" not in cmd
    verbose = gpu_race.parse_args(["--corpus", str(corpus), "--cli", "--verbose"])
    assert "--verbose" in gpu_race.commands(verbose, info["sections"])["project"]
    with pytest.raises(SystemExit):
        gpu_race.parse_args(["--corpus", str(corpus), "--verbose"])  # without --cli


def test_a_cold_race_starts_every_cache_empty_under_out(tmp_path, monkeypatch):
    """Cold is a fresh machine: MLX's kernels, the project's built libraries (cuDNN
    attention, the native CPU kernels) and torch.compile's caches all live under --out."""
    corpus = tmp_path / "input.txt"
    corpus.write_text("abc\n" * 100)
    seen = []

    def fake_measure(run, cmd, env, args, flops):
        seen.append(env)
        run.rc, run.step_at_target, run.seconds_to_target = 0, 10, 1.0
        return run

    monkeypatch.setattr(gpu_race, "measure", fake_measure)
    out = tmp_path / "r"
    argv = ["--corpus", str(corpus), "--smoke", "--project-only", "--rounds", "0"]
    gpu_race.main(argv + ["--throughput-steps", "0", "--out", str(out)])
    names = ("MLX_PTX_CACHE_DIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    names += ("CUDA_CACHE_PATH", "PREFECT_HOME")
    assert Path(seen[0]["SHAKESPEARE_GPT_WARMUP_LOGS"]) == out / "warm-up-logs"
    folders = [Path(seen[0][name]) for name in names]
    assert all(f.parent == out / "caches" for f in folders)
    assert len(set(folders)) == len(folders)


def test_the_cudnn_check_names_a_bad_shape_and_reports_each_shape_alone(capsys):
    with pytest.raises(SystemExit):
        cudnn_attention_check.main(["--shapes", "2x100x3"])
    assert "T a multiple of 64, got '2x100x3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cudnn_attention_check.main(["--p", "1"])
    assert "--p must be in (0, 1), got 1.0" in capsys.readouterr().err
    from mlx_model.ops import cuda

    if cuda.usable():
        pytest.skip("on an NVIDIA GPU the check measures: tests/test_cuda_attention.py")
    # without an NVIDIA GPU each shape's own process says so, and the next one still runs
    cudnn_attention_check.main(["--shapes", "1x64x1", "1x128x1", "--timeout", "120"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["shape"] for line in lines] == [[1, 64, 1], [1, 128, 1]]
    assert all("needs MLX on an NVIDIA GPU" in line["error"] for line in lines)


def test_the_cudnn_checks_read_outs_recover_a_kernels_dropped_weights_both_ways():
    """With a stand-in kernel (MLX's attention with a known dropout mask), the forward
    read-out (identity values) and the backward one (v's gradient under an identity
    cotangent) both give back exactly the weights it used, 64 columns or rows at a time."""
    import mlx.core as mx

    from mlx_model.ops.reference import attention_weights, merge_heads, split_heads

    b, t, heads, p = 2, 128, 3, 0.25
    keep = mx.random.bernoulli(1 - p, (b, heads, t, t), key=mx.random.key(4))

    def weights(qkv, scale):
        q, k, _ = split_heads(qkv, heads)
        return mx.where(keep, attention_weights(q, k, scale) / (1 - p), 0.0)

    class StandIn:
        @staticmethod
        def causal_attention(qkv, seed, n_head, scale, p_):
            assert (n_head, p_) == (heads, p)
            return merge_heads(weights(qkv, scale) @ split_heads(qkv, heads)[2])

    qkv = mx.random.normal((b, t, 3 * heads * 64), key=mx.random.key(1))
    expected = weights(qkv, 1 / 8)
    seed = mx.array([1, 2])
    forward = cudnn_attention_check.forward_weights(StandIn, qkv, seed, heads, p)
    backward = cudnn_attention_check.backward_weights(StandIn, qkv, seed, heads, p)
    assert mx.allclose(forward, expected, atol=1e-5).item()
    assert mx.allclose(backward, expected, atol=1e-5).item()


def test_step_time_reports_the_step_the_backend_trains_with(monkeypatch, capsys):
    """bench/step_time.py: the gpu backend (named, here on the CPU) trains with the joined
    optimizer, and the report gives three positive rounds; a bad value is named."""
    import step_time

    monkeypatch.setenv("SHAKESPEARE_GPT_OPS", "gpu")
    report = step_time.main(["--preset", "tiny", "--steps", "2"])
    assert report["optimizer"] == "FlatOptimizer" and report["backend"] == "gpu"
    assert len(report["ms_per_step"]) == 3 and all(ms > 0 for ms in report["ms_per_step"])
    assert json.loads(capsys.readouterr().out) == report
    monkeypatch.delenv("SHAKESPEARE_GPT_OPS")
    assert step_time.main(["--preset", "tiny", "--steps", "1", "--joined", "yes"])["optimizer"] == (
        "FlatOptimizer"
    )
    capsys.readouterr()
    with pytest.raises(SystemExit):
        step_time.main(["--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_inference_time_times_each_item_in_order(corpus_path, capsys):
    """bench/inference_time.py on the CPU: one line per item, in the order given, with
    its seconds; a bad item is named before any work."""
    import inference_time

    order = ["eval-op", "sample-c", "sample-op"]
    reports = inference_time.main(
        [
            "--corpus",
            str(corpus_path),
            "--preset",
            "tiny",
            "--tokens",
            "5",
            "--order",
            ",".join(order),
        ]
    )
    assert [r["item"] for r in reports] == order
    assert [r["compiled"] for r in reports] == [False, True, False]
    assert all(r["seconds"] > 0 for r in reports)
    with pytest.raises(SystemExit):
        inference_time.main(["--corpus", str(corpus_path), "--order", "eval-op,evaluate"])
    assert "--order has 'evaluate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inference_time.main(["--corpus", str(corpus_path.parent / "missing.txt")])
    assert "--corpus: no such file: " in capsys.readouterr().err


def test_the_pytorch_reference_estimates_a_small_split_whole_with_a_padded_last_batch(
    tmp_path, corpus_path
):
    pytest.importorskip("torch")
    import numpy as np
    import torch_gpu

    from mlx_model.data import fixed_windows, get_batch

    ids = np.arange(201) % 7  # 12 windows of 16 side by side: fewer than the 16 asked for
    starts = fixed_windows(ids, 16, 16, 0)
    assert len(starts) == 12

    def loss_sum(x, y):  # each target's own value as its "loss"; padding counts for nothing
        assert x.shape == y.shape == (8, 16)  # every batch has the compiled shape
        return float(np.where(y == torch_gpu.IGNORED, 0, y).sum())

    expected = get_batch(ids, starts, 16)[1].mean()
    assert torch_gpu.mean_window_loss(loss_sum, ids, starts, 16, 8) == pytest.approx(expected)
    corpus = tmp_path / "input.txt"  # a validation split of 12 windows of the tiny preset
    corpus.write_text(corpus_path.read_text()[:2000])
    proc = subprocess.run(
        [sys.executable, str(BENCH / "torch_gpu.py"), "--preset", "tiny", "--corpus", str(corpus),
         "--device", "cpu", "--no-compile", "--max-iters", "10", "--target", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (estimate,) = json.loads(proc.stdout.splitlines()[-1])["history"]
    assert math.isfinite(estimate["val_loss"])


def test_step_graph_counts_fewer_casts_and_joins_with_the_flat_master(capsys):
    """bench/step_graph.py on the CPU: the master's step has fewer casts and fewer arrays
    joined than the joined form's; a bad preset is named."""
    import step_graph

    report = step_graph.main(["--preset", "tiny"])
    assert json.loads(capsys.readouterr().out) == report
    joined, master = report["joined"], report["master"]
    assert master["casts"] < joined["casts"] and master["arrays joined"] < joined["arrays joined"]
    with pytest.raises(SystemExit):
        step_graph.main(["--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_the_start_timeline_marks_each_stage_of_a_run_in_order(corpus_path):
    """bench/start_timeline.py on the CPU: the tiny preset's start, in the order the run
    takes it, each mark with its seconds since the process started."""
    order = ["interpreter up", "corpus_splits #1", "process_group #1", "(_fresh) #1",
             "(StepFunctions.__init__) #1", "step 0: call", "step 9: call", "estimate_loss #1",
             "] end"]  # fmt: skip
    proc = _timeline(["--corpus", str(corpus_path), "--preset", "tiny", "--stop-after", "10"],
                     order)  # fmt: skip
    assert json.loads(proc.stdout.splitlines()[-1])["steps"] == 10


def _timeline(args: list[str], order: list[str], env=None) -> subprocess.CompletedProcess:
    """Run bench/start_timeline.py with `args`; check that its marks count up from process
    start and that a mark holding each of `order`'s strings comes in that order."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "start_timeline.py"), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    marks = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    seconds = [float(line[1:].split("]")[0]) for line in marks]
    assert seconds == sorted(seconds) and 0 < seconds[0] < seconds[-1]
    where = [next(i for i, m in enumerate(marks) if what in m) for what in order]
    assert where == sorted(where)
    return proc


def test_the_cli_timeline_marks_the_commands_phases_in_order(corpus_path, tmp_path):
    """bench/start_timeline.py --cli on the CPU: `shakespeare-gpt run --preset tiny` with
    its own temporary Prefect server, each phase marked in the order the command takes it,
    from the server's start to the training's first estimate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    order = ["interpreter up", "server started (start_early)", "flows.cli imported",
             "(start_if_needed)", "(import_flows) #1",
             "(warm_process): skipped", "(prepare) #1", "(wait) #1", "execute",
             "Beginning flow run", "stage download's work",
             "stage tokenize's work", "prefect: train-", "(_fresh) #1", "step 0: call",
             "estimate_loss #1", "stage train's work", "] end"]  # fmt: skip
    _timeline(["--cli", "run", "--preset", "tiny", "--source", corpus_path.as_uri(),
               "--artifacts", str(tmp_path / "artifacts")], order, env)  # fmt: skip


def test_the_arrow_bench_sees_which_form_imports_pandas(corpus_path, tmp_path, monkeypatch):
    """bench/arrow_first_write.py with a stand-in pandas importable (one pyarrow takes for
    too old, and so leaves alone after importing it): pyarrow's `pa.array` form imports
    it, the project's `write_tokens` and `read_tokens` never do."""
    import arrow_first_write

    fake = tmp_path / "site" / "pandas"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\n')
    monkeypatch.setenv("PYTHONPATH", f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    report = arrow_first_write.main(["--corpus", str(corpus_path), "--rounds", "1"])
    assert report["imported_pandas"] == {"project": [False], "pa.array": [True]}
    assert all(s > 0 for form in report["seconds"].values() for s in form)
    with pytest.raises(SystemExit):
        arrow_first_write.main(["--corpus", str(corpus_path), "--rounds", "0"])


def test_batch_sum_times_each_form_and_measures_its_error(capsys):
    """bench/batch_sum.py on the CPU, small: every form of every width, timed per round; the
    float32 form is within bfloat16's rounding of the float32 sum; bad widths are named."""
    import batch_sum

    report = batch_sum.main(["--batch", "4", "--context", "8", "--widths", "16,24", "--reps",
                             "5", "--rounds", "2"])  # fmt: skip
    assert len(report["results"]) == 2 * 5
    for key, result in report["results"].items():
        assert len(result["ms"]) == 2 and all(ms > 0 for ms in result["ms"]), key
    # sums of 32 normal values: within bfloat16's half-ulp at |x| < 32 (2^-8 * 16)
    assert report["results"]["24:f32_sum1_sum0"]["max_error"] <= 0.0625
    with pytest.raises(SystemExit):
        batch_sum.main(["--widths", "3,x"])
    assert "--widths must be integers separated by commas, got '3,x'" in capsys.readouterr().err
