"""Pages of a listing, the same for every service: the page size a caller may ask for, and the page token that
says where the last page ended.

Listings page by key (keyset paging): a token names the sort key of the last row served, and the next page starts
after it. So a page never repeats or skips a row because rows were added meanwhile, and a page costs the same
however deep into the listing it is. A token holds only that key (which its caller was already shown), encoded so
that callers treat it as opaque; anything a service did not issue is refused as INVALID_ARGUMENT, naming the field.
"""

import base64
import binascii
from collections.abc import Sequence
from typing import TypeVar

from bastion.grpc.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
# Between the parts of a token's key: a control character, which no id or number of a key may contain (every id
# check refuses them), so a key cannot be made to read as another one.
_SEPARATOR = "\n"
T = TypeVar("T")
MAX_TOKEN = 512  # far above any token a service issues; a longer one is refused before it is decoded


class InvalidPageError(InvalidArgumentError):
    """A page size out of range or a page token the service did not issue."""


def page_size(requested: int) -> int:
    """The rows a page holds: REQUESTED, or the default for 0; anything outside 1 to MAX_PAGE_SIZE is refused."""
    size = requested or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidPageError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {requested}")
    return size


def page_token(kind: str, *key: str) -> str:
    """The token of a page that ended at the row with sort key KEY, in a listing of KIND."""
    return base64.urlsafe_b64encode(f"{kind}:{_SEPARATOR.join(key)}".encode()).decode()


def token_key(token: str, kind: str, parts: int) -> tuple[str, ...] | None:
    """The sort key (PARTS strings) that TOKEN, issued by `page_token(KIND, ...)`, stands for; None for the first
    page (an empty token). Each part still needs its own check by the service: a token is the caller's text."""
    if not token:
        return None
    if len(token) <= MAX_TOKEN:
        try:
            found, _, key = base64.urlsafe_b64decode(token.encode("ascii")).decode().partition(":")
        except (binascii.Error, UnicodeError, ValueError):
            found, key = "", ""
        values = tuple(key.split(_SEPARATOR))
        if found == kind and len(values) == parts and all(value and value.isprintable() for value in values):
            return values
    raise InvalidPageError("page_token is not one this service issued")


def page_of(rows: Sequence[T], size: int) -> tuple[list[T], bool]:
    """The page in ROWS, read with a limit of SIZE + 1, and whether more rows follow it (so a listing whose last
    page is full does not hand out a token to an empty page)."""
    return list(rows[:size]), len(rows) > size
