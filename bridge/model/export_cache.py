"""An on-disk cache for the networks that ONNX Runtime runs (see
:mod:`bridge.model.onnxrt`), so that a command does not export and optimise
the same network again at every start.

Where: ``$NUCLICK_BRIDGE_CACHE/onnx`` when that variable is set (``off``: no
cache), else ``$XDG_CACHE_HOME/nuclick-bridge/onnx``, else
``~/.cache/nuclick-bridge/onnx``.  A folder that cannot be made or written
(a read-only home, a full disk) means no cache: the network is built in
memory as before, and nothing is reported but a debug line.

Each entry is one file named by a hash of its key (a JSON object naming
everything the stored bytes depend on): a magic line, the length of a JSON
header, the header (the key, the payload's length and CRC-32, and what the
caller stored with it), then the payload.  Files are written to a temporary
name in the same folder and moved into place with :func:`os.replace`, so a
reader sees a whole file or none.  A file that is truncated, overwritten or
holds another key is reported in one warning, deleted and never used; the
caller builds the entry again.  The cache keeps the most recently used
entries up to :data:`MAX_BYTES`.

This module needs only the standard library (no torch), so that the cached
path can stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "NUCLICK_BRIDGE_CACHE"
OFF = frozenset({"off", "0", "no", "false", "none"})
MAGIC = b"nuclick-bridge cache 1\n"
MAX_BYTES = 2 << 30  # entries beyond this, least recently used first, are deleted
SUFFIX = ".nbcache"
_LENGTH = struct.Struct("<I")


def cache_root() -> Path | None:
    """nuclick-bridge's cache folder (not created here), or None when the cache is off
    or there is no home to put it in."""
    value = os.environ.get(ENV, "").strip()
    if value:
        return None if value.lower() in OFF else Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):  # the XDG spec: relative paths are ignored
        return Path(xdg) / "nuclick-bridge"
    try:
        return Path.home() / ".cache" / "nuclick-bridge"
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


def key_name(key: dict[str, Any]) -> str:
    """The file name of the entry for ``key`` (a hash of its canonical JSON)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40] + SUFFIX


class CorruptEntry(ValueError):
    """An entry file that must not be used (the reason is the message)."""


def pack(key: dict[str, Any], payload: bytes, meta: dict[str, Any]) -> bytes:
    header = json.dumps(
        {"key": key, "bytes": len(payload), "crc32": zlib.crc32(payload), "meta": meta}, sort_keys=True
    ).encode()
    return MAGIC + _LENGTH.pack(len(header)) + header + payload


def unpack(data: bytes, key: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """(meta, payload) of an entry file's bytes, or :class:`CorruptEntry`."""
    if not data.startswith(MAGIC):
        raise CorruptEntry("not a nuclick-bridge cache file")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise CorruptEntry("truncated")
    (n,) = _LENGTH.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[start : start + n])
        size, crc, meta, stored_key = header["bytes"], header["crc32"], header["meta"], header["key"]
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptEntry(f"unreadable header ({type(exc).__name__})") from None
    if stored_key != key:
        raise CorruptEntry("it holds another entry")
    payload = data[start + n :]
    if len(payload) != size:
        raise CorruptEntry(f"{len(payload)} bytes of data where {size} were written (truncated?)")
    if zlib.crc32(payload) != crc:
        raise CorruptEntry("its checksum does not match its data")
    return meta, payload


class ExportCache:
    """One folder of cache entries; every method is safe to call from several
    processes at once (the worst case is building an entry twice)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.stores = 0

    @classmethod
    def from_env(cls, sub: str = "onnx") -> ExportCache | None:
        """The cache where the environment puts it (see the module), or None when it is off."""
        root = cache_root()
        return None if root is None else cls(root / sub)

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / key_name(key)

    def load(self, key: dict[str, Any]) -> tuple[dict[str, Any], bytes] | None:
        """(meta, payload) stored under ``key``, or None: not there, unreadable, or
        corrupt (then one warning, and the file is deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("cache: cannot read %s: %s", path, exc)
            return None
        try:
            meta, payload = unpack(data, key)
        except CorruptEntry as exc:
            log.warning("ignoring the cache file %s: %s; it is built again", path, exc)
            self.discard(path)
            return None
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: kept longest by prune()
        return meta, payload

    def reject(self, key: dict[str, Any], reason: object) -> None:
        """An entry that read well but cannot be used: one warning, and it goes."""
        log.warning("ignoring the cache file %s: %s; it is built again", self.path(key), reason)
        self.discard(self.path(key))

    def discard(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def temp_path(self, suffix: str = ".tmp") -> Path | None:
        """A new empty file in the cache folder (for writers such as ONNX Runtime that
        want a path), or None when the folder cannot be written; the caller deletes it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=self.folder)
        except OSError as exc:
            log.debug("cache: %s is not writable: %s", self.folder, exc)
            return None
        os.close(fd)
        return Path(name)

    def store(self, key: dict[str, Any], payload: bytes, meta: dict[str, Any]) -> bool:
        """Write the entry atomically; False (and no error) when the folder cannot take it."""
        tmp = self.temp_path()
        if tmp is None:
            return False
        try:
            with open(tmp, "wb") as f:
                f.write(pack(key, payload, meta))
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a cache folder shared on purpose private
            os.replace(tmp, self.path(key))
        except OSError as exc:  # a full disk, a quota, a folder made read-only meanwhile
            log.debug("cache: could not write %s: %s", self.path(key), exc)
            self.discard(tmp)
            return False
        self.stores += 1
        self.prune()
        return True

    def prune(self, max_bytes: int = MAX_BYTES) -> None:
        """Delete the least recently used entries beyond ``max_bytes``, and temporary
        files left by writers that died more than an hour ago."""
        entries = []
        try:
            for p in self.folder.iterdir():
                try:
                    st = p.stat()
                except OSError:
                    continue
                if p.name.startswith(".tmp-"):
                    if st.st_mtime < time.time() - 3600:
                        self.discard(p)
                elif p.name.endswith(SUFFIX):
                    entries.append((st.st_mtime, st.st_size, p))
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= max_bytes:
                break
            self.discard(p)
            total -= size
