"""The one error family the CLI turns into a one-line message and a non-zero exit."""


class RtkError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class CheckFailed(RtkError):
    """A check ran and its result was negative (parity failed, the self-test differed)."""

    exit_code = 1
