"""Against a real `prefect server start`: the deployment with its schedule, a triggered run,
stage reruns through the CLI, and what a person sees in the UI (headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows"]
SCREENSHOTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
pytestmark = pytest.mark.slow
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def cli(server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**server.env(), "SHAKESPEARE_GPT_PROGRESS": "0"}
    proc = subprocess.run(
        [*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def field(out: str, name: str) -> str:
    return out.split(f"{name}: ")[1].splitlines()[0]


@pytest.fixture
def tiny_args(tmp_path, corpus_path, corpus_sha):
    return [
        "--preset", "tiny", "--artifacts", str(tmp_path / "artifacts"),
        "--source", corpus_path.as_uri(), "--sha256", corpus_sha, "--max-tokens", "60",
    ]  # fmt: skip


def test_run_twice_then_rerun_sample_reuses_upstream(prefect_server, tiny_args):
    first = cli(prefect_server, "run", *tiny_args).stdout
    first_run = json.loads(Path(field(first, "manifest")).read_text())["run"]
    second = cli(prefect_server, "run", *tiny_args).stdout
    assert json.loads(field(second, "cached")) == dict.fromkeys(
        ["download", "vocab", "tokenize", "train", "evaluate", "sample"], True
    )
    rerun = cli(prefect_server, "stage", "sample", "--force", "sample", *tiny_args).stdout
    cached = json.loads(field(rerun, "cached"))
    assert cached.pop("sample") is False and all(cached.values())
    assert f"reused train from run {first_run}" in rerun  # names the run it reused
    onward = cli(prefect_server, "run", "--from", "evaluate", *tiny_args).stdout
    assert json.loads(field(onward, "cached")) == {
        "download": True, "vocab": True, "tokenize": True, "train": True,
        "evaluate": False, "sample": False,
    }  # fmt: skip


def artifacts_tab(page, run_url: str) -> None:
    """A flow run's page, on its Artifacts tab."""
    page.goto(run_url)
    page.wait_for_load_state("networkidle")
    page.get_by_text("Artifacts", exact=True).first.click()


def open_artifact(page, run_url: str, key: str) -> None:
    """From a flow run's page, through its Artifacts tab, to the artifact called `key`."""
    artifacts_tab(page, run_url)
    page.get_by_text(key, exact=True).first.click()
    page.wait_for_url("**/artifacts/artifact/**")
    page.wait_for_load_state("networkidle")
    page.get_by_text("Show raw data").wait_for(timeout=30_000)


def chromium() -> str:
    path = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not path:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium not found and REQUIRE_BROWSER=1 (CI installs Debian's chromium)")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return path


def test_ui_shows_metrics_sample_and_loss_curve(prefect_server, tiny_args):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    out = cli(prefect_server, "run", *tiny_args, "--prompt", "ROMEO:").stdout
    url = field(out, "flow run")
    assert url.startswith(prefect_server.url)
    sample = json.loads(Path(field(out, "manifest")).read_text())["stages"]["sample"]["info"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        artifacts_tab(page, url)
        for key in ("training-metrics", "loss-curve", "run-summary", "training-progress"):
            page.get_by_text(key, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "flow-run-artifacts.png"), full_page=True)
        for key in ("training-metrics", "loss-curve", "run-summary"):
            open_artifact(page, url, key)
            if key == "loss-curve":
                image = page.locator("img[alt='loss curve']")
                image.wait_for(timeout=30_000)
                seen["image_width"] = str(image.evaluate("e => e.complete && e.naturalWidth"))
            seen[key] = page.inner_text("main") if page.locator("main").count() else ""
            seen[key] = seen[key] or page.inner_text("body")
            page.screenshot(path=str(SCREENSHOTS / f"artifact-{key}.png"), full_page=True)
        # a rerun reuses every stage: its task runs carry Prefect's "Cached" state
        again = cli(prefect_server, "run", *tiny_args, "--prompt", "ROMEO:").stdout
        assert all(json.loads(field(again, "cached")).values())
        page.goto(field(again, "flow run"))
        page.wait_for_load_state("networkidle")
        page.get_by_text("Task Runs", exact=True).first.click()
        page.get_by_text("Cached", exact=True).first.wait_for(timeout=30_000)
        seen["cached_badges"] = str(page.get_by_text("Cached", exact=True).count())
        page.screenshot(path=str(SCREENSHOTS / "rerun-task-runs-cached.png"), full_page=True)
        browser.close()
    assert int(seen["cached_badges"]) >= 6, seen["cached_badges"]  # the six reused stages
    # the metrics table: its header and one row per evaluation (tiny: steps 10, 20, 30)
    table = seen["training-metrics"]
    assert "train_loss" in table and "val_loss" in table and "tokens_per_sec" in table
    assert all(f"\n{step}\t" in table for step in (10, 20, 30)), table
    # the sample, as generated, and the configuration
    summary = seen["run-summary"]
    generated = sample["text"].splitlines()
    assert generated[0].startswith("ROMEO:") and generated[0] in summary
    assert '"n_layer": 2' in summary
    # the loss-curve picture decoded and laid out (a broken image has naturalWidth 0)
    assert int(seen["image_width"]) == 640


def test_serve_registers_the_schedule_and_runs_a_triggered_run(prefect_server, tiny_args, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**prefect_server.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [*CLI, "serve", "--name", "nightly", "--cron", "0 3 * * *", *tiny_args],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        deployment = client.read_deployment_by_name("shakespeare-gpt/nightly")
                        break
                    except Exception:
                        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                        assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                        time.sleep(1)
                assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
                assert deployment.parameters["preset"] == "tiny"
                # the server's scheduler turns the schedule into upcoming runs
                deadline = time.monotonic() + 60
                while True:
                    upcoming = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(
                            id=DeploymentFilterId(any_=[deployment.id])
                        )
                    )
                    if any(r.state and r.state.is_scheduled() for r in upcoming):
                        break
                    assert time.monotonic() < deadline, "no scheduled runs were created"
                    time.sleep(1)
            overrides = deployment.parameters["overrides"]
            run = run_deployment(
                "shakespeare-gpt/nightly",
                parameters={"overrides": {**overrides, "sampling": {"max_tokens": 20}}},
                timeout=240,
            )
            # a bad value through the API: the same check as the CLI's, before any stage
            bad = run_deployment(
                "shakespeare-gpt/nightly",
                parameters={"overrides": {**overrides, "training": {"max_iters": -5}}},
                timeout=240,
            )
            with get_client(sync_client=True) as client:
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[bad.id]))
                )
        assert run.state is not None and run.state.is_completed(), (
            run.state,
            (tmp_path / "serve.log").read_text()[-3000:],
        )
        assert bad.state is not None and bad.state.is_failed(), bad.state
        assert "TrainConfig.max_iters must be a positive integer, got -5" in bad.state.message
        assert tasks == []  # refused before any stage ran
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        log.close()


def test_ui_shows_a_sweeps_leaderboard_and_curves(
    prefect_server, tmp_path, corpus_path, corpus_sha
):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    out = cli(
        prefect_server, "sweep", "--preset", "tiny", "--artifacts", str(tmp_path / "a"),
        "--source", str(corpus_path), "--sha256", corpus_sha,
        "--grid", "learning_rate=1e-3,3e-3", "--workers", "2",
    ).stdout  # fmt: skip
    assert "----- leaderboard -----" in out and "best: learning_rate=" in out
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["shakespeare-gpt-sweep"]))
            )
    url = f"{prefect_server.url}/runs/flow-run/{run.id}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        artifacts_tab(page, url)
        for key in ("sweep-leaderboard", "sweep-curves"):
            page.get_by_text(key, exact=True).first.wait_for(timeout=30_000)
        open_artifact(page, url, "sweep-leaderboard")
        table = page.inner_text("body")
        page.screenshot(path=str(SCREENSHOTS / "sweep-leaderboard.png"), full_page=True)
        open_artifact(page, url, "sweep-curves")
        image = page.locator("img[alt='validation curves']")
        image.wait_for(timeout=30_000)
        width = image.evaluate("e => e.complete && e.naturalWidth")
        page.screenshot(path=str(SCREENSHOTS / "sweep-curves.png"), full_page=True)
        browser.close()
    assert "learning_rate=0.001" in table and "learning_rate=0.003" in table and "val_loss" in table
    assert width == 720
