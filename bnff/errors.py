"""Errors every layer may raise for the commands to report."""


class UserError(Exception):
    """Bad input from the user: printed as one line, never as a traceback."""
