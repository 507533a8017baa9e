"""The one error family the CLI turns into a one-line message and a non-zero exit."""


class RtkError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class CheckFailed(RtkError):
    """A check ran and its result was negative (parity failed, the self-test differed)."""

    exit_code = 1


class ArtifactBroken(CheckFailed):
    """A model file cannot be loaded or run (missing, truncated, unparsable, altered): always a failure."""


class RuntimeUnavailable(Exception):
    """This runtime cannot exist here (package not installed, no GPU, no bf16 hardware); the message says why.

    Not an RtkError: stages turn it into a skip; the serving side turns it into an RtkError."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line error shows."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
