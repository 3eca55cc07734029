"""Exceptions shared across the package."""


class UserError(Exception):
    """Bad input from the user (a file, a record, a flag): the CLI prints it as one line, exit 2.

    The message names the file and record and says what to do.
    """
