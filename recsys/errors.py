"""Errors shared by every module."""


class UserError(Exception):
    """An error caused by the user's input (bad file, flag or config): printed without a traceback."""
