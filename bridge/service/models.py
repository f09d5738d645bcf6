"""The models one server holds, each under a name, and their swap on reload.

Why a set, swapped whole: requests name the model they want
(``SegmentRequest.model_name``), and ``SIGHUP`` re-reads ``serve
--models-dir`` while requests are in flight.  The served set is an immutable
mapping of name -> :class:`ServedModel`, replaced under a lock; a request
takes a lease on the model it started with (:meth:`ModelSet.acquire`) and
keeps it until it finishes, so a swap never fails or changes a request in
flight.  A model that left the set is dropped (its batcher stopped, its
network freed) when its last lease is returned.

Every model has its own :class:`~bridge.service.batching.Batcher`: patches of
different networks must never share a forward pass.

Torch-free: loading a weights file is the ``load`` callable's business.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bridge.errors import BridgeInputError
from bridge.model.weights import file_sha256
from bridge.service.batching import Batcher

log = logging.getLogger("bridge.service")

DEFAULT_MODEL = "default"
# A name is safe on a command line, in JSON, a URL and a Prometheus label.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
NAME_RULE = "letters, digits, '_', '.', '+' and '-', not starting with '.', '+' or '-', at most 128 characters"
WEIGHTS_SUFFIX = ".pt"


def check_name(name: str, what: str = "model name") -> str:
    """``name`` if it can name a model, else one line that says why not."""
    if not NAME_PATTERN.fullmatch(name):
        raise BridgeInputError(f"{what} {name!r} is not a valid model name ({NAME_RULE})")
    return name


@dataclass(eq=False)
class ServedModel:
    """One engine under one name, with the batcher its forward passes go through.

    ``path``/``sha256`` say which file it came from (None/"" for an engine
    built in memory); ``from_dir``: it came from ``--models-dir`` and a
    reload may replace or drop it.
    """

    name: str
    engine: Any
    batcher: Batcher
    path: Path | None = None
    sha256: str = ""
    from_dir: bool = False
    users: int = 0
    retired: bool = False

    @property
    def label(self) -> str:
        """What ``SegmentResponse.model`` says: the file's own name and version."""
        return f"{self.engine.info.name} {self.engine.info.version}"


@dataclass
class ReloadResult:
    """What one reload did, or why it changed nothing (``error``)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class UnknownModel(BridgeInputError):
    """A request named a model the server does not hold."""


class ModelSet:
    """name -> :class:`ServedModel`, safe for any number of threads.

    ``fixed``: engines by name, served for the server's whole life (the
    default model, ``--weights NAME=FILE``); ``models_dir`` with ``load``
    (path -> engine): a folder whose ``*.pt`` files are served by file stem,
    read now and again on every :meth:`reload`.  ``make_batcher`` builds the
    batcher of a newly loaded engine.
    """

    def __init__(
        self,
        fixed: Mapping[str, Any],
        make_batcher: Callable[[Any], Batcher],
        models_dir: str | Path | None = None,
        load: Callable[[Path], Any] | None = None,
        fixed_paths: Mapping[str, Path] | None = None,
    ) -> None:
        if DEFAULT_MODEL not in fixed:
            raise BridgeInputError(f"the server needs a model named {DEFAULT_MODEL!r}")
        if models_dir is not None and load is None:
            raise BridgeInputError("a models folder needs a way to load its files")
        for name in fixed:
            check_name(name)
        self._fixed = frozenset(fixed)
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._load = load
        self._make_batcher = make_batcher
        self._lock = threading.Lock()  # guards the mapping, the leases and the totals
        self._reload_lock = threading.Lock()  # one reload at a time
        self._totals = {"batches": 0, "patches": 0, "chunks": 0, "largest_batch": 0, "dropped_chunks": 0}
        self._live: set[ServedModel] = set()  # served now, or retired with leases out
        self._closed = False
        paths = dict(fixed_paths or {})
        entries: dict[str, ServedModel] = {}
        try:
            for name, engine in fixed.items():
                path = paths.get(name)
                entries[name] = self._serve(name, engine, path, getattr(engine.info, "sha256", ""), False)
            if self.models_dir is not None:
                for name, path, sha, engine in self._read_dir({}):
                    entries[name] = self._serve(name, engine, path, sha, True)
        except BaseException:
            for entry in entries.values():
                entry.batcher.stop()
            raise
        self._current: Mapping[str, ServedModel] = MappingProxyType(_ordered(entries))
        self._live.update(entries.values())

    # ------------------------------------------------------------ reading

    def current(self) -> Mapping[str, ServedModel]:
        """The served set now: an immutable mapping, "default" first, then by name."""
        return self._current

    def names(self) -> list[str]:
        return list(self._current)

    @property
    def default(self) -> ServedModel:
        return self._current[DEFAULT_MODEL]

    def acquire(self, name: str) -> ServedModel:
        """A lease on the model ``name`` ("" = default) as served now; give it back with :meth:`release`."""
        key = name or DEFAULT_MODEL
        with self._lock:
            entry = self._current.get(key)
            if entry is None:
                known = ", ".join(self._current)
                raise UnknownModel(f"this server has no model named {key!r}; its models are: {known}")
            entry.users += 1
            return entry

    def release(self, entry: ServedModel) -> None:
        with self._lock:
            entry.users -= 1
            drop = entry.retired and entry.users == 0
        if drop:
            self._drop(entry)

    def batch_stats(self) -> dict[str, int]:
        """The batchers' counts, summed over every model served since start (dropped ones too)."""
        with self._lock:
            live = list(self._live)
            out = dict(self._totals)
        out["queued_chunks"] = 0
        for entry in live:
            s = entry.batcher.stats()
            for k in ("batches", "patches", "chunks", "dropped_chunks", "queued_chunks"):
                out[k] += s[k]
            out["largest_batch"] = max(out["largest_batch"], s["largest_batch"])
        return out

    # ------------------------------------------------------------ reload

    def reload(self) -> ReloadResult:
        """Read the models folder again: new files go live, removed ones leave,
        changed ones (by SHA-256) are loaded again; unchanged ones keep their
        engine.  All or nothing: if any file cannot be read or loaded, the
        served set stays as it was and ``error`` says why."""
        if self.models_dir is None:
            return ReloadResult(error="the server has no models folder (serve --models-dir) to read again")
        with self._reload_lock:
            before = self._current
            previous = {name: e for name, e in before.items() if e.from_dir}
            try:
                found = self._read_dir(previous)
            except BridgeInputError as exc:
                return ReloadResult(error=str(exc))
            result = ReloadResult()
            entries = {name: e for name, e in before.items() if not e.from_dir}
            fresh: list[ServedModel] = []
            try:
                for name, path, sha, engine in found:
                    old = previous.get(name)
                    if old is not None and engine is None:
                        entries[name] = old
                        continue
                    entries[name] = self._serve(name, engine, path, sha, True)
                    fresh.append(entries[name])
                    (result.reloaded if old is not None else result.added).append(name)
            except BaseException:
                for entry in fresh:
                    entry.batcher.stop()
                raise
            result.removed = sorted(set(previous) - set(entries))
            with self._lock:
                if self._closed:
                    for entry in fresh:
                        entry.batcher.stop()
                    return ReloadResult(error="the server is shutting down")
                self._current = MappingProxyType(_ordered(entries))
                self._live.update(fresh)
                kept = set(self._current.values())
                gone = [e for e in before.values() if e not in kept]
                idle = []
                for entry in gone:
                    entry.retired = True
                    if entry.users == 0:
                        idle.append(entry)
            for entry in idle:
                self._drop(entry)
            return result

    def _read_dir(self, previous: Mapping[str, ServedModel]) -> list[tuple[str, Path, str, Any]]:
        """(name, path, sha256, engine) per weights file of the folder, by name;
        engine is None where ``previous`` has the same file unchanged."""
        assert self.models_dir is not None and self._load is not None
        folder = self.models_dir
        if not folder.is_dir():
            raise BridgeInputError(f"models folder not found: {folder}")
        try:
            files = sorted(
                p for p in folder.iterdir() if p.suffix == WEIGHTS_SUFFIX and not p.name.startswith(".") and p.is_file()
            )
        except OSError as exc:
            raise BridgeInputError(f"cannot read the models folder {folder}: {exc.strerror or exc}") from None
        out = []
        for path in files:
            name = path.stem
            check_name(name, f"{path.name} in {folder}: its stem")
            if name in self._fixed:
                raise BridgeInputError(
                    f"{path.name} in {folder} would be served as {name!r}, a name already given "
                    "(by 'default' or serve --weights NAME=FILE); rename the file"
                )
            try:
                sha = file_sha256(path)
            except OSError as exc:
                raise BridgeInputError(f"cannot read {path}: {exc.strerror or exc}") from None
            old = previous.get(name)
            if old is not None and old.sha256 == sha and old.path == path:
                out.append((name, path, sha, None))
                continue
            try:
                engine = self._load(path)
            except BridgeInputError as exc:
                raise BridgeInputError(f"cannot load {path}: {exc}") from None
            except Exception as exc:  # a file half written, a network this version cannot build, ...
                raise BridgeInputError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None
            out.append((name, path, getattr(engine.info, "sha256", "") or sha, engine))
        return out

    def _serve(self, name: str, engine: Any, path: Path | None, sha: str, from_dir: bool) -> ServedModel:
        return ServedModel(name, engine, self._make_batcher(engine), path, sha, from_dir)

    def _drop(self, entry: ServedModel) -> None:
        """Stop a retired model's batcher (nothing is queued: no lease is out) and fold its counts in."""
        entry.batcher.stop()
        s = entry.batcher.stats()
        with self._lock:
            if entry not in self._live:
                return
            self._live.discard(entry)
            for k in ("batches", "patches", "chunks", "dropped_chunks"):
                self._totals[k] += s[k]
            self._totals["largest_batch"] = max(self._totals["largest_batch"], s["largest_batch"])
        log.info("model dropped", extra={"fields": {"name": entry.name, "model": entry.label}})

    def close(self) -> None:
        """Stop every batcher (the server is stopping)."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for entry in live:
            entry.batcher.stop()


def _ordered(entries: Mapping[str, ServedModel]) -> dict[str, ServedModel]:
    """The default model first, then by name: the order GetModelInfo lists them in."""
    names: Iterable[str] = sorted(entries, key=lambda n: (n != DEFAULT_MODEL, n))
    return {n: entries[n] for n in names}
