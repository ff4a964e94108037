"""User-facing errors: bad input that the CLI reports in one line with exit code 2."""


class UserError(Exception):
    """Bad input (data, config, checkpoint). The message names the file, the field and the problem."""
