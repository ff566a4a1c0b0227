"""The one exception users see: a clear sentence, printed by the CLIs with exit code 2."""


class RobustError(Exception):
    """Bad input or configuration, described in one sentence for the user (not a bug)."""
