"""The one exception type for mistakes a user can fix (shown on the CLI without a traceback)."""


class UserError(ValueError):
    """Bad input: the message names the problem and the fix."""
