"""The one exception type that means "the user gave bad input": the CLI prints it in one line, exit 2."""


class UserError(Exception):
    """A mistake the user can fix; its message says how."""


def first_line(error: BaseException) -> str:
    """What went wrong, in one line: an OS error's text (no errno, no path), else the message's first line, else
    the exception's type."""
    text = getattr(error, "strerror", None) or str(error).strip().partition("\n")[0]
    return text or type(error).__name__
