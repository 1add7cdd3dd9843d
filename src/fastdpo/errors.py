"""The one exception type that reaches the user as a single line (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a file, a record, a flag. The message says what, where and what to do.

    `exit_code` is 2 for usage errors (flags, config values) and 1 for everything else.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
