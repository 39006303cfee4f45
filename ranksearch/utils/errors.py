"""The one exception type that means "the user gave bad input": the CLI prints it in one line, exit 2; and what a
message may show of a storage URL."""

import re


class UserError(Exception):
    """A mistake the user can fix; its message says how."""


def causes(error: BaseException | None):
    """``error`` and the exceptions behind it (its ``__cause__``, else its ``__context__``), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def first_line(error: BaseException) -> str:
    """What went wrong, in one line: an OS error's text (no errno, no path), else the message's first line, else
    the exception's type."""
    text = getattr(error, "strerror", None) or str(error).strip().partition("\n")[0]
    return text or type(error).__name__


# scheme://user:PASSWORD@host...: everything from the user's colon to the last '@' is the password (a '@' in it
# may be unencoded; the scheme may be mistyped, as ``postgresql//``); and a libpq ``password=`` query parameter
_URL_PASSWORD = re.compile(r"^([^/]*//[^:/@?#]*:)(.*)@", re.S)
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&]*)", re.I)
MASK = "***"


def shown_url(url: str) -> str:
    """``url`` as every line the tool prints shows it: its password masked as ``***`` (in the user part and in a
    ``password=`` query parameter), whether or not SQLAlchemy can parse it."""
    return _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", _URL_PASSWORD.sub(rf"\g<1>{MASK}@", url))


def without_secrets(text: str, url: str) -> str:
    """``text`` (a database driver's message about ``url``) with ``url`` shown as ``shown_url`` does and its
    password masked wherever else the text repeats it."""
    text = text.replace(url, shown_url(url))
    matches = [_URL_PASSWORD.match(url), *_QUERY_PASSWORD.finditer(url)]
    passwords = {match.group(2) for match in matches if match}
    for password in sorted(passwords, key=len, reverse=True):
        if len(password) >= 3:  # a shorter one would mask letters of the message itself
            text = text.replace(password, MASK)
    return text
