"""Errors a user can act on. The CLI prints their message as one line and exits with their code."""


class TwinsDeployError(Exception):
    """Something went wrong that the user can fix; the message says what and how."""

    exit_code = 1


class UsageError(TwinsDeployError):
    """Bad input: an unknown name, a malformed option, a missing file."""

    exit_code = 2
