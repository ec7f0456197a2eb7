"""The temporary server's first start on a machine without a Prefect database: the
migrated empty database put in place (`flows.temporary_server.seed_database`) is the one
Prefect's own migrations make, and nothing a user has is replaced."""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows import temporary_server as ts

ROOT = Path(__file__).resolve().parents[1]
CREATE = (
    "import asyncio\n"
    "from prefect.server.database import provide_database_interface\n"
    "asyncio.run(provide_database_interface().create_db())\n"
)


def prefect_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home)}


def schema(database: Path) -> tuple[list, list]:
    """Every table, index and trigger with its SQL, the lines of each in sorted order
    (Prefect's SQLite migrations rebuild tables with their constraints in set order,
    which differs between two databases it creates); and the revision."""
    db = sqlite3.connect(database)
    try:
        rows = db.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "ORDER BY type, name"
        ).fetchall()
        revision = db.execute("SELECT version_num FROM alembic_version").fetchall()
    finally:
        db.close()
    return [(kind, name, _lines(sql)) for kind, name, sql in rows], revision


def _lines(sql: str | None) -> list[str]:
    return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())


@pytest.mark.slow
def test_the_seeded_database_is_the_one_prefects_migrations_make(tmp_path):
    """Seeded, then brought to the installed Prefect's head as the server's start does: the
    same tables, indexes, triggers and revision as a database Prefect creates from nothing
    (what a first start did before: 7.2 s of migrations on 2 cores)."""
    seeded, fresh = tmp_path / "seeded", tmp_path / "fresh"
    assert ts.seed_database(prefect_env(seeded)) == seeded / "prefect.db"
    for home in (seeded, fresh):
        subprocess.run([sys.executable, "-c", CREATE], env=prefect_env(home), check=True)
    tables, revision = schema(fresh / "prefect.db")
    assert len(tables) > 50 and revision
    assert schema(seeded / "prefect.db") == (tables, revision)


def test_a_database_that_exists_or_is_configured_elsewhere_is_left_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "prefect.db").write_bytes(b"the user's runs")
    assert ts.seed_database(prefect_env(home)) is None
    assert (home / "prefect.db").read_bytes() == b"the user's runs"
    other = tmp_path / "other"
    url = {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://db/prefect"}
    assert ts.seed_database({**prefect_env(other), **url}) is None
    other.mkdir()
    (other / "profiles.toml").write_text(
        '[profiles.default]\nPREFECT_SERVER_DATABASE_CONNECTION_URL = "sqlite+aiosqlite:///x"\n'
    )
    assert ts.seed_database(prefect_env(other)) is None
    assert not (other / "prefect.db").exists()
    assert not list(tmp_path.rglob(".prefect.db.*"))  # no temporary file left


def test_a_prefect_that_does_not_know_the_templates_revision_makes_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "TEMPLATE_REVISION", "000000000000")
    assert ts.seed_database(prefect_env(tmp_path)) is None
    assert not (tmp_path / "prefect.db").exists()


def test_the_template_is_an_empty_database_at_its_revision(tmp_path):
    database = tmp_path / "prefect.db"
    database.write_bytes(gzip.decompress(ts.TEMPLATE.read_bytes()))
    tables, revision = schema(database)
    assert revision == [(ts.TEMPLATE_REVISION,)]
    db = sqlite3.connect(database)
    names = [name for kind, name, _ in tables if kind == "table" and name != "alembic_version"]
    assert "flow_run" in names and all(
        db.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone() == (0,) for name in names
    )
    db.close()


@pytest.mark.slow
def test_a_first_command_on_a_new_machine_seeds_and_runs(tmp_path, corpus_path, corpus_sha):
    """`shakespeare-gpt stage vocab` with a new PREFECT_HOME and no API: the server runs
    on the database the command put there (checked above), and records the run in it."""
    home = tmp_path / "prefect"
    args = ["stage", "vocab", "--preset", "tiny", "--artifacts", str(tmp_path / "art")]
    args += ["--source", str(corpus_path), "--sha256", corpus_sha]
    proc = subprocess.run(
        [sys.executable, "-m", "flows", *args],
        cwd=ROOT,
        env={**prefect_env(home), "SHAKESPEARE_GPT_PROGRESS": "0"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    db = sqlite3.connect(home / "prefect.db")
    assert db.execute("SELECT COUNT(*) FROM flow_run").fetchone()[0] == 1
    db.close()


def test_settings_that_may_name_another_database_or_a_home_that_cannot_take_it_seed_nothing(
    tmp_path, monkeypatch
):
    """Any PREFECT_*DATABASE* setting, "database" in the profiles file (its path set or
    not) or in ./prefect.toml, and a PREFECT_HOME that is a file or lies under one: None,
    nothing written, no error (Prefect then reports what is wrong in its own words)."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    assert ts.seed_database({**prefect_env(home), "PREFECT_SERVER_DATABASE_DRIVER": "x"}) is None
    profiles = tmp_path / "elsewhere.toml"
    profiles.write_text('[profiles.p]\nPREFECT_API_DATABASE_NAME = "x"\n')
    assert ts.seed_database({**prefect_env(home), "PREFECT_PROFILES_PATH": str(profiles)}) is None
    (tmp_path / "prefect.toml").write_text('[server.database]\nname = "x"\n')
    assert ts.seed_database(prefect_env(home)) is None
    assert not home.exists()
    (tmp_path / "prefect.toml").unlink()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert ts.seed_database(prefect_env(afile)) is None
    assert ts.seed_database(prefect_env(afile / "below")) is None
    assert afile.read_text() == "not a folder"
    assert ts.seed_database(prefect_env(home)) == home / "prefect.db"  # and now it seeds


def test_the_temporary_server_starts_on_the_seeded_database(tmp_path):
    """The database is in place before the server's process starts (which takes seconds
    to import before it could make one of its own)."""
    home = tmp_path / "home"
    server = ts.TemporaryServer({**prefect_env(home), **ts.EPHEMERAL})
    try:
        seeded = (home / "prefect.db").read_bytes()
    finally:
        server.stop()
    assert seeded == gzip.decompress(ts.TEMPLATE.read_bytes())


def _automation(database: Path, enabled: bool) -> None:
    db = sqlite3.connect(database)
    db.execute(
        'INSERT INTO automation (name, description, enabled, "trigger", actions) '
        "VALUES ('notify', '', ?, '{}', '[]')",
        (enabled,),
    )
    db.commit()
    db.close()


def test_the_temporary_server_runs_without_automations_services_only_when_none_exist(tmp_path):
    """Off (`PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=false` in the server's environment)
    for a new database and for one whose automations are all disabled; kept for an
    enabled automation, a file that cannot be read as Prefect's database, the user's own
    setting, and settings that may name another database."""
    off = {ts.AUTOMATIONS: "false"}
    home = tmp_path / "home"
    env = prefect_env(home)
    assert ts.automations_off(env) == {**env, **off}  # no database yet
    assert ts.seed_database(env) == home / "prefect.db"
    assert ts.automations_off(env) == {**env, **off}
    _automation(home / "prefect.db", enabled=False)
    assert not ts.has_automations(home / "prefect.db")
    _automation(home / "prefect.db", enabled=True)
    assert ts.has_automations(home / "prefect.db")
    assert ts.automations_off(env) == env
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "prefect.db").write_bytes(b"not a database" * 100)
    assert ts.automations_off(prefect_env(damaged)) == prefect_env(damaged)
    fresh = prefect_env(tmp_path / "fresh")
    assert ts.automations_off({**fresh, ts.AUTOMATIONS: "true"})[ts.AUTOMATIONS] == "true"
    url = {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://db/prefect"}
    assert ts.AUTOMATIONS not in ts.automations_off({**fresh, **url})


def test_settings_files_that_set_the_automations_or_prefects_home_are_left_to_prefect(
    tmp_path, monkeypatch
):
    """`[server.services.triggers]` in ./prefect.toml: the environment variable would
    override it, so none is added; `home` in ./prefect.toml: the database is elsewhere
    (where it may hold automations), so neither is it seeded nor are the services off."""
    monkeypatch.chdir(tmp_path)
    env = prefect_env(tmp_path / "home")
    (tmp_path / "prefect.toml").write_text("[server.services.triggers]\nenabled = true\n")
    assert ts.automations_off(env) == env
    (tmp_path / "prefect.toml").write_text(f'home = "{tmp_path / "elsewhere"}"\n')
    assert ts.default_database(env) is None
    assert ts.automations_off(env) == env
    assert ts.seed_database(env) is None and not (tmp_path / "home").exists()
    (tmp_path / "prefect.toml").unlink()
    assert ts.automations_off(env) == {**env, ts.AUTOMATIONS: "false"}


def test_the_automations_setting_is_the_one_prefects_triggers_and_actions_read():
    import prefect.settings
    from prefect.server.events.services.actions import Actions
    from prefect.server.events.services.triggers import ReactiveTriggers

    setting = getattr(prefect.settings, ts.AUTOMATIONS)
    assert ReactiveTriggers.enabled() and Actions.enabled()  # Prefect's default
    with prefect.settings.temporary_settings(updates={setting: False}):
        assert not ReactiveTriggers.enabled() and not Actions.enabled()


def test_a_temporary_server_without_automations_services_records_a_flows_task_runs(tmp_path):
    """The services left on are the ones that record runs: a flow with a task, run against
    a temporary server started on a new database, leaves its flow run and task run in it."""
    home = tmp_path / "home"
    script = (
        "from prefect import flow, task\n"
        "from flows.temporary_server import start_if_needed\n"
        "server = start_if_needed()\n"
        "assert server.env['PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED'] == 'false'\n"
        "server.wait()\n"
        "@task\n"
        "def double(x): return 2 * x\n"
        "@flow\n"
        "def f(): return double(21)\n"
        "assert f() == 42\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=prefect_env(home), check=True, timeout=180
    )
    db = sqlite3.connect(home / "prefect.db")
    runs = [
        db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in ("flow_run", "task_run")
    ]
    db.close()
    assert runs == [1, 1]
