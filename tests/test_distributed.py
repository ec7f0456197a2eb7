"""Data-parallel training over `mlx.launch` ranks (the ring backend on 127.0.0.1)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mlx_model.config import TINY, ParallelConfig
from mlx_model.data import Vocab, split_tokens, write_tokens
from mlx_model.distributed import RankFailedError, train_distributed
from mlx_model.train import LATEST, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def token_files(corpus_path, tmp_path_factory):
    text = corpus_path.read_text()
    ids = Vocab.from_text(text).encode(text)
    folder = tmp_path_factory.mktemp("tokens")
    train_ids, val_ids = split_tokens(ids, 0.1)
    write_tokens(folder / "train.arrow", train_ids, {})
    write_tokens(folder / "val.arrow", val_ids, {})
    return folder / "train.arrow", folder / "val.arrow", train_ids, val_ids


def test_two_ring_processes_compute_what_one_process_computes(token_files, tmp_path):
    train_path, val_path, train_ids, val_ids = token_files
    cfg, tc = TINY.model.replace(vocab_size=65), TINY.train
    one = train(cfg, tc, train_ids, val_ids, tmp_path / "one")
    two = train_distributed(
        cfg, tc, ParallelConfig(processes=2), train_path, val_path, tmp_path / "two"
    )
    # each rank took half of every batch; averaged gradients give one process's step
    # (float32 sums in another order: equal to about 1e-6)
    for a, b in zip(one.history, two.history, strict=True):
        assert a["step"] == b["step"]
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    for a, b in zip(one.train_log, two.train_log, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert two.final_step == tc.max_iters and two.best_step == one.best_step
    # only rank 0 wrote; every checkpoint compared the ranks' weight digests on the way
    assert (tmp_path / "two" / LATEST / "state.json").exists()
    # stopped at a step and started again, the group resumes to the same run
    parallel = ParallelConfig(processes=2)
    part = train_distributed(cfg, tc, parallel, train_path, val_path, tmp_path / "p", stop_after=10)
    assert part.final_step == 10 and part.resumed_from is None
    rest = train_distributed(cfg, tc, parallel, train_path, val_path, tmp_path / "p")
    assert rest.resumed_from == 10 and rest.final_step == tc.max_iters
    assert [h["val_loss"] for h in rest.history] == [h["val_loss"] for h in two.history]


def test_bfloat16_runs_exchange_gradients_in_bfloat16(token_files, tmp_path):
    train_path, val_path, train_ids, val_ids = token_files
    cfg, tc = TINY.model.replace(vocab_size=65), TINY.train.replace(compute_dtype="bfloat16")
    one = train(cfg, tc, train_ids, val_ids, tmp_path / "one")
    runs = {
        exchange: train_distributed(
            cfg,
            tc.replace(grad_exchange=exchange),
            ParallelConfig(processes=2),
            train_path,
            val_path,
            tmp_path / exchange,
        )
        for exchange in ("compute", "float32")
    }
    # the setting reaches the step: the two exchanges round differently ...
    losses = {k: [h["val_loss"] for h in r.history] for k, r in runs.items()}
    assert losses["compute"] != losses["float32"]
    # ... and both stay with one process's run within bfloat16's rounding (every
    # checkpoint also checked that the ranks hold the same weights)
    for run in runs.values():
        for a, b in zip(one.history, run.history, strict=True):
            assert abs(a["val_loss"] - b["val_loss"]) < 2e-2


def _rank_pid(spec: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(spec).encode() in cmdline and f"MLX_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def _checkpoint_step(out: Path) -> int:
    import json

    try:
        return json.loads((out / LATEST / "state.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_a_killed_rank_fails_the_run_naming_it_and_a_rerun_resumes(token_files, tmp_path):
    train_path, val_path, _, _ = token_files
    cfg = TINY.model.replace(vocab_size=65)
    tc = TINY.train.replace(max_iters=800, checkpoint_interval=20, eval_interval=400)
    parallel, out = ParallelConfig(processes=2), tmp_path / "run"
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = train_distributed(cfg, tc, parallel, train_path, val_path, out)
        except RankFailedError as err:
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while _checkpoint_step(out) < 40:
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    pid = _rank_pid(out / "launch.json", 1)
    assert pid is not None
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the other rank hung"
    assert time.monotonic() - killed_at < 60
    message = str(outcome["error"])
    assert "rank 1 of 2" in message and "latest checkpoint" in message
    step = _checkpoint_step(out)
    assert 40 <= step < tc.max_iters
    result = train_distributed(cfg, tc, parallel, train_path, val_path, out)
    assert result.resumed_from == step and result.final_step == tc.max_iters


def test_resuming_with_another_layout_is_refused(token_files, tmp_path):
    train_path, val_path, train_ids, val_ids = token_files
    cfg, tc = TINY.model.replace(vocab_size=65), TINY.train
    train(cfg, tc, train_ids, val_ids, tmp_path, stop_after=10)
    with pytest.raises(RankFailedError, match="written by 1 processes, not 2"):
        train_distributed(cfg, tc, ParallelConfig(processes=2), train_path, val_path, tmp_path)


def test_a_failed_launch_names_the_ranks_last_error_line_not_a_colour_code(tmp_path):
    """The launcher's stderr as CI once caught it: the rank's error, then a line holding
    only a terminal colour's reset, then the launcher's own coloured line about the rank.
    The message names the error, with no escape code (it had read "last error line: \x1b[0m")."""
    from mlx_model.distributed import _failure

    errors = [
        "ValueError: checkpoint written by 1 processes, not 2\n",
        "\x1b[0m\n",
        "\x1b[31m[ERROR] Node with rank 0 exited with code 1\x1b[0m\n",
    ]
    line = _failure(errors, ParallelConfig(processes=2), tmp_path, 1)
    assert line.startswith(
        "data-parallel training failed: rank 0 of 2 exited with code 1 (last error line: "
        "ValueError: checkpoint written by 1 processes, not 2)."
    )
    assert "\x1b" not in line


def test_the_launch_line_uses_mlx_launch(tmp_path):
    from mlx_model.distributed import launch_command

    cmd = launch_command(ParallelConfig(processes=2, backend="ring"), tmp_path / "launch.json")
    assert "mlx._distributed_utils.launch" in cmd[2]
    assert cmd[cmd.index("--backend") + 1] == "ring" and cmd[cmd.index("-n") + 1] == "2"
    assert cmd[-3:] == ["-m", "mlx_model.distributed", str(tmp_path / "launch.json")]
    from mlx_model.distributed import _ephemeral_ports

    start = int(cmd[cmd.index("--starting-port") + 1])  # the ring's ports: start, start + 1
    assert int(cmd[cmd.index("--nccl-port") + 1]) == start + 2
    low, high = _ephemeral_ports()
    assert start + 2 < low or start > high


def test_a_diverging_loss_over_two_ranks_is_the_same_error_as_in_one(token_files, tmp_path):
    from mlx_model.train import TrainingDiverged

    train_path, val_path, train_ids, val_ids = token_files
    cfg, tc = TINY.model.replace(vocab_size=65), TINY.train.replace(learning_rate=1e4)
    with pytest.raises(TrainingDiverged) as two:
        train_distributed(
            cfg, tc, ParallelConfig(processes=2), train_path, val_path, tmp_path / "2"
        )
    assert "training diverged at step" in str(two.value) and two.value.learning_rate == 1e4
    assert not math.isfinite(two.value.loss)


class _Scripted:
    """An rng whose randrange returns the given starts in turn (choice: their span)."""

    def __init__(self, *starts: int):
        self.starts = list(starts)

    def choice(self, spans):
        return next((a, b) for a, b in spans if a <= self.starts[0] < b)

    def randrange(self, low: int, high: int) -> int:
        start = self.starts.pop(0)
        assert low <= start < high
        return start


def _listening(port: int):
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _two_blocks(count: int) -> tuple[int, int]:
    """Two side-by-side blocks of `count` ports, free now."""
    from mlx_model.distributed import port_block

    start = port_block(2 * count)
    return start, start + count


def test_a_port_block_skips_a_block_with_one_port_taken(monkeypatch):
    from mlx_model import distributed
    from mlx_model.distributed import port_block

    taken, free = _two_blocks(3)
    with _listening(taken + 2):  # only the last of the first block's ports
        assert port_block(3, _Scripted(taken, free)) == free
    # every port it gives lies outside the range outgoing connections take theirs from
    low, high = distributed._ephemeral_ports()
    assert all(s + 3 <= low or s > high for s in (port_block(3) for _ in range(20)))
    monkeypatch.setattr(distributed, "_ephemeral_ports", lambda: (1024, 60999))
    assert all(port_block(3) > 60999 for _ in range(20))  # above a range that starts low
    monkeypatch.setattr(distributed, "_ephemeral_ports", lambda: (1024, 65535))
    with pytest.raises(RuntimeError, match="outside the ephemeral range 1024-65535"):
        port_block(3)
    for bad in (0, -1, 1025, 2.0):
        with pytest.raises(ValueError, match=f"1 to 1024 ports, got {bad!r}"):
            port_block(bad)


def _canned(monkeypatch, outcomes: list[tuple]):
    """`_launch` returning the given (errors, started) outcomes in turn, none a result;
    the launches made so far."""
    from mlx_model import distributed

    made = []

    def launch(parallel, spec, callback):
        errors, started = outcomes[len(made)]
        made.append(parallel)
        return None, None, errors, 1, started

    monkeypatch.setattr(distributed, "_launch", launch)
    return made


BIND = ["RuntimeError: [ring] Couldn't bind socket (error: 98)\n"]
OTHER = ["RuntimeError: out of memory\n"]


@pytest.mark.parametrize(
    "outcomes, hostfile, launches",
    [
        ([(BIND, False)] * 3, False, 3),  # given up after three
        ([(BIND, False), (OTHER, False)], False, 2),
        ([(OTHER, False)], False, 1),  # another error: not again
        ([(BIND, True)], False, 1),  # after progress: not again
        ([(BIND, False)], True, 1),  # a hostfile's ports are the user's
    ],
)
def test_only_a_port_taken_before_any_progress_launches_again(
    monkeypatch, tmp_path, outcomes, hostfile, launches
):
    import json

    made = _canned(monkeypatch, outcomes)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 2))
    parallel = ParallelConfig(processes=2, hostfile=str(hosts) if hostfile else None)
    cfg, tc = TINY.model.replace(vocab_size=65), TINY.train
    with pytest.raises(RankFailedError) as err:
        train_distributed(cfg, tc, parallel, tmp_path / "t", tmp_path / "v", tmp_path / "o")
    assert len(made) == launches
    assert (f"({launches} launches, each on other ports)" in str(err.value)) == (launches > 1)
    assert outcomes[launches - 1][0][0].strip() in str(err.value)  # the last launch's error


def test_a_rank_whose_port_was_taken_is_launched_again(token_files, tmp_path, monkeypatch):
    from mlx_model import distributed

    train_path, val_path, _, _ = token_files
    taken, free = _two_blocks(3)
    starts = []

    def scripted(count, rng=None):
        starts.append(taken if not starts else free)
        return starts[-1]

    monkeypatch.setattr(distributed, "port_block", scripted)
    cfg, tc = TINY.model.replace(vocab_size=65), TINY.train
    with _listening(taken), _listening(taken + 1):  # both ring ports of the first launch
        result = train_distributed(
            cfg, tc, ParallelConfig(processes=2), train_path, val_path, tmp_path, stop_after=5
        )
    assert starts == [taken, free] and result.final_step == 5


def test_two_ranks_with_the_flat_master_compute_what_one_process_computes(
    token_files, tmp_path, monkeypatch
):
    """The gpu backend's bfloat16 step (the parameters flat in the optimizer, one
    all-reduce of the joined gradient) over two ring processes, against one process."""
    train_path, val_path, train_ids, val_ids = token_files
    monkeypatch.setenv("SHAKESPEARE_GPT_OPS", "gpu")  # the ranks' backend too
    cfg = TINY.model.replace(vocab_size=65)
    tc = TINY.train.replace(compute_dtype="bfloat16", optimizer="muon", muon_learning_rate=0.02)
    one = train(cfg, tc, train_ids, val_ids, tmp_path / "one")
    two = train_distributed(
        cfg, tc, ParallelConfig(processes=2), train_path, val_path, tmp_path / "two"
    )
    for a, b in zip(one.history, two.history, strict=True):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 2e-2
    assert two.final_step == tc.max_iters
    assert one.history[-1]["val_loss"] < one.history[0]["val_loss"] - 0.1


@pytest.mark.parametrize("launched", [None, "MLX_RANK", "OMPI_COMM_WORLD_SIZE"])
def test_a_process_no_launcher_started_asks_no_backend_for_its_group(launched, monkeypatch):
    """MLX's backend search tries MPI, whose MPI_Init cost a single process 0.39 s on an
    H200 host: a process no launcher started takes a group of one without it."""
    import mlx.core as mx

    from mlx_model import distributed

    for name in distributed.LAUNCHED_ENV:
        monkeypatch.delenv(name, raising=False)
    if launched:
        monkeypatch.setenv(launched, "0")
    asked = []
    real = mx.distributed.init

    def spy(strict=False, backend="any"):
        asked.append(backend)
        return real(strict=strict, backend="ring" if launched else backend)

    monkeypatch.setattr(mx.distributed, "init", spy)
    group = distributed.process_group()
    assert asked == (["any"] if launched else ["ring"])
    assert (group.size(), group.rank()) == (1, 0)
