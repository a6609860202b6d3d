"""The one exception type for failures a user can cause and fix."""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path


class GptlabError(Exception):
    """A user-caused failure: printed as `error: <what> (<how to fix>)`, exit code 2."""

    exit_code = 2

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what} ({fix})")
        self.what = what
        self.fix = fix

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survives the trip back from a worker process
        return (type(self), (self.what, self.fix))

    def __str__(self) -> str:
        return f"{self.what} ({self.fix})"


class Interrupted(KeyboardInterrupt):
    """A signal that stops a command at once (a second Ctrl-C, SIGTERM in prepare): exit code 128 + its number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM: what a shell reports for a process the signal killed."""
        return 128 + self.signum


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of one a library reports only in its text (safetensors: '... (os error 28)')."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"os error (\d+)", str(e))
    return int(found.group(1)) if found else None


def is_write_failure(e: BaseException) -> bool:
    """Whether `e` is a write the user can fix: a full disk, a read-only or forbidden folder, a folder in the way."""
    return os_errno(e) in (*DISK_FULL, *NOT_WRITABLE, errno.EISDIR)


def write_error(e: BaseException, path: str | Path | None = None) -> GptlabError:
    """A failed write of `path` (by default the file the OSError names) as the user's error, with the fix its errno
    calls for."""
    code = os_errno(e)
    path = path if path is not None else getattr(e, "filename", None)
    reason = os.strerror(code) if code else str(e).splitlines()[0] if str(e) else type(e).__name__
    if code in DISK_FULL:
        fix = "free disk space, or write to another disk"
    elif code in NOT_WRITABLE:
        fix = "choose a writable folder"
    elif code == errno.EISDIR:
        fix = "give a file name, not a folder"
    else:
        fix = "check the folder and free disk space"
    where = f" '{path}'" if path else ""
    return GptlabError(f"cannot write{where} ({reason})", fix)
