"""The one exception type for failures a user can cause and fix."""

from __future__ import annotations


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
