"""One image of a QuPath project saved all or nothing: the data file is put back if the save fails.

Why: QuPath saves an image (``DefaultProjectImageEntry.saveImageData``) by
moving ``data.qpdata`` to ``data.qpdata.bkp``, writing a new ``data.qpdata``
and deleting the backup.  It restores the backup only on a Java
``IOException``; any other exception inside the write (a
``RuntimeException`` from a serializer, an ``OutOfMemoryError``) leaves a
half-written ``data.qpdata`` next to the ``.bkp``, and QuPath then opens the
image with the half file or not at all.  The summary and server files written
after the data can fail too, after the new data is complete.

So before the save we copy ``data.qpdata`` to ``data.qpdata.nuclick-bridge``
(a copy, not a link: nothing here may depend on how the writer replaces the
file), and on any failure we move that copy back over ``data.qpdata`` and
remove a ``.bkp`` that this save left.  On success the copy is deleted.  If
the process is killed during the save, the copy stays; the next run finds it
and refuses to touch that image until a person has looked (the message says
what to do), since only a person can tell which file is the good one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from bridge.errors import BridgeInputError

SNAPSHOT_SUFFIX = ".nuclick-bridge"
QUPATH_BACKUP_SUFFIX = ".bkp"


def snapshot_path(data_file: Path) -> Path:
    return data_file.with_name(data_file.name + SNAPSHOT_SUFFIX)


@contextlib.contextmanager
def restore_on_failure(data_file: Path | None) -> Iterator[None]:
    """Run the save inside; if it raises, ``data_file`` is as it was before
    (or absent, if it was absent), and the exception goes on.  ``None``: no
    file to guard (the body runs unguarded)."""
    if data_file is None:
        yield
        return
    snapshot = snapshot_path(data_file)
    backup = data_file.with_name(data_file.name + QUPATH_BACKUP_SUFFIX)
    if snapshot.exists():
        raise BridgeInputError(
            f"an earlier run was stopped while saving this image: {snapshot} holds its objects from before"
            f" that save. Open the image in QuPath: if it looks right, delete {snapshot.name}; if not, rename"
            f" {snapshot.name} to {data_file.name}. Until then this image is left alone"
        )
    existed, had_backup = data_file.exists(), backup.exists()
    if existed:
        shutil.copy2(data_file, snapshot)
    try:
        yield
    except BaseException:
        if existed:
            os.replace(snapshot, data_file)
        else:
            data_file.unlink(missing_ok=True)
        if not had_backup:
            backup.unlink(missing_ok=True)
        raise
    if existed:
        snapshot.unlink(missing_ok=True)
