"""The one exception type that means "the user gave bad input": the CLI prints it in one line, exit 2."""


class UserError(Exception):
    """A mistake the user can fix; its message says how."""
