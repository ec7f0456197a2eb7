"""Content-addressed artifact store: one folder per (stage, cache key), a meta.json written last.

Layout under the root (default `artifacts/`, or $SHAKESPEARE_GPT_ARTIFACTS):

    <stage>/<key16>/...files...    a stage's outputs, one folder per distinct input
    <stage>/<key16>/meta.json      written last: key, inputs, parameters, file digests
    runs/<run name>/manifest.json  what one flow run used and produced
    .locks/                        advisory locks so concurrent runs never share a write

A folder without meta.json is unfinished and never trusted (training resumes from it).
A file whose digest no longer matches meta.json makes the stage recompute.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_model.files import locked, write_text_atomic

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

ENV_ROOT = "SHAKESPEARE_GPT_ARTIFACTS"
DEFAULT_ROOT = "artifacts"
META = "meta.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

log = logging.getLogger(__name__)


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


def safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a single safe path component; raise naming it otherwise."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' "
            "(no path separators, no leading dot)"
        )
    return name


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


PROJECT_PACKAGES = ("mlx_model", "tasks")


def code_version(module: str) -> str:
    """Digest of every project source file `module` can execute: editing any of them
    invalidates the stage's cache.

    The files are found, not listed: the module, every project module it imports
    (at any depth, including imports inside functions), the `__init__` of each package
    on the way, and each such package's data files (`mlx_model/ops/csrc/*.cpp`).
    """
    h = hashlib.sha256()
    root = Path(importlib.util.find_spec(PROJECT_PACKAGES[0]).origin).parents[1]
    for path in sorted(_source_files(module)):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def _source_files(module: str) -> frozenset[Path]:
    files: set[Path] = set()
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        seen.add(name)
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a name inside a module, not a module
            continue
        if spec is None or spec.origin is None:
            continue
        path = Path(spec.origin)
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        if spec.submodule_search_locations:  # a package: its data files
            files |= {f for f in _data_files(path.parent)}
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        todo += _imports(path, package)
    return frozenset(files)


@functools.cache  # every stage's key walks the same modules: each is parsed once
def _imports(path: Path, package: str) -> list[str]:
    """The absolute names `path` imports (modules, or names that may be modules)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
    return names


def _data_files(folder: Path) -> Iterator[Path]:
    """Files beside a package's modules that are not Python, in folders that are not packages."""
    for path in folder.iterdir():
        if path.is_dir():
            if path.name != "__pycache__" and not (path / "__init__.py").exists():
                yield from (
                    p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                )
        elif path.suffix not in (".py", ".pyc"):
            yield path


@dataclass(frozen=True)
class StageOutput:
    """A finished stage: where its files are and their digests."""

    stage: str
    key: str
    path: str
    files: dict[str, str]
    cached: bool
    info: dict[str, Any] = field(default_factory=dict)
    produced_by: str | None = None  # the run that computed it (this run's name on a miss)

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def digest(self, name: str) -> str:
        return self.files[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArtifactStore:
    """Stage outputs under `root`; `run` names the flow run that writes (kept in meta.json)."""

    def __init__(self, root: os.PathLike | str | None = None, run: str | None = None):
        self.root = Path(root) if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"artifact root {str(self.root)!r} exists and is not a folder")
        self.run_name = run if run is None else safe_name(run, "run name")

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / safe_name(stage, "stage") / key[:16]

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold an exclusive advisory lock on (stage, key) so two runs never compute it at once."""
        with locked(self.root / ".locks" / f"{stage}-{key[:16]}.lock"):
            yield

    def lookup(self, stage: str, key: str) -> StageOutput | None:
        """The finished output for (stage, key), or None if absent, incomplete or corrupted."""
        from mlx_model.data import file_sha256  # NumPy and Arrow: not for the command line's checks

        directory = self.stage_dir(stage, key)
        meta_path = directory / META
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s is unreadable; recomputing %s", meta_path, stage)
            return None
        if meta.get("key") != key:
            return None
        for name, digest in meta["files"].items():
            path = directory / name
            if not path.exists():
                log.warning("%s is missing; recomputing %s", path, stage)
                return None
            if file_sha256(path) != digest:
                log.warning("%s does not match its recorded digest; recomputing %s", path, stage)
                return None
        return StageOutput(
            stage, key, str(directory), meta["files"], True, meta.get("info", {}), meta.get("run")
        )

    def run(
        self,
        stage: str,
        key_inputs: dict[str, Any],
        compute: Callable[[Path], dict[str, Any]],
        outputs: list[str],
        force: bool = False,
    ) -> StageOutput:
        """Return the cached output for these inputs, or compute it into the stage folder.

        `compute(directory)` writes the files named in `outputs` and returns an info
        dict kept in meta.json. The cache key is the digest of `key_inputs`, which
        callers build from input digests, parameters and code version.
        """
        key = digest_json({"stage": stage, **key_inputs})
        if not force and (hit := self.lookup(stage, key)):
            return hit
        with self.lock(stage, key), _naming_stage(stage):
            if not force and (hit := self.lookup(stage, key)):
                return hit  # another run finished it while we waited
            directory = self.stage_dir(stage, key)
            (directory / META).unlink(missing_ok=True)
            directory.mkdir(parents=True, exist_ok=True)
            started = time.time()
            info = compute(directory)
            missing = [name for name in outputs if not (directory / name).exists()]
            if missing:
                raise RuntimeError(f"stage {stage!r} did not write {missing}")
            from mlx_model.data import file_sha256

            files = {name: file_sha256(directory / name) for name in outputs}
            info = {**info, "seconds": round(time.time() - started, 3)}
            meta = {
                "stage": stage,
                "key": key,
                "run": self.run_name,
                "inputs": key_inputs,
                "files": files,
                "info": info,
            }
            write_text_atomic(directory / META, json.dumps(meta, indent=2, default=str))
        return StageOutput(stage, key, str(directory), files, False, info, self.run_name)


@contextlib.contextmanager
def _naming_stage(stage: str) -> Iterator[None]:
    """An OSError (a full disk, a read-only folder) leaves carrying the stage it stopped,
    as `err.stage`, for the one line that explains it (`tasks.errors`)."""
    try:
        yield
    except OSError as err:
        if getattr(err, "stage", None) is None:
            err.stage = stage
        raise


def finished(output: StageOutput) -> StageOutput | State:
    """What a stage's task returns: inside a Prefect task run, a reused output becomes a
    completed state named `Cached` whose message names the run that produced it and its
    folder, so the UI shows reused stages as such; the flow takes the output back with
    `output_of`."""
    # Prefect is imported here, not above: the command line reads `default_root` and
    # `digest_json` before it decides whether Prefect is needed at all
    from prefect.context import TaskRunContext
    from prefect.states import Completed

    if not output.cached or TaskRunContext.get() is None:
        return output
    message = f"reused from run {output.produced_by} ({output.path})"
    return Completed(name="Cached", message=message, data=output)


def output_of(result: StageOutput | State) -> StageOutput:
    """The StageOutput a stage's task returned (see `finished`)."""
    return result if isinstance(result, StageOutput) else result.result()
