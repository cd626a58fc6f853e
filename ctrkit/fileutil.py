"""File-system helpers shared by the pipeline's output and the exporter's versions."""
from __future__ import annotations

import os
import stat
import uuid

from ctrkit.errors import InputError


def chmod_like_mkdir(path: str) -> None:
    """Give the directory ``path`` the mode ``os.mkdir`` gives (0777 less the process umask).

    ``tempfile.mkdtemp`` creates 0700 directories, and an output written there and renamed into place kept
    that mode: teammates on a shared machine, or a serving container running as another user, could not read
    it whatever the umask said. The mode is read off a probe directory rather than by setting the umask,
    which is process-wide and would race with other threads creating files.
    """
    probe = os.path.join(path, f".mode-probe-{uuid.uuid4().hex}")
    os.mkdir(probe)
    try:
        mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    os.chmod(path, mode)


def refuse_pattern_characters(path: str, what: str, reader: str) -> None:
    """Refuse a ``path`` holding ``* ? [`` up front: ``reader`` (Beam, TensorFlow) matches files with patterns
    built from it, and failed with a traceback after all the work."""
    if any(c in path for c in "*?["):
        raise InputError(f"{what} {path} holds * ? or [, which {reader} reads as a file pattern; choose a path "
                         "without them")
