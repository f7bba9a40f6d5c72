"""Errors that reach the user as one line naming the problem and the fix."""


class UserError(Exception):
    """Bad input from the user: a file, a flag, a config or a checkpoint.

    The CLI prints ``str(error)`` on one line and exits with code 2. The message
    names what is wrong and how to fix it.
    """
