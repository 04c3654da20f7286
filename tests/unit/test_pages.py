"""bastion.pages: the page size a caller may ask for, and page tokens that only the listing that issued them reads
back (anything else is INVALID_ARGUMENT naming page_token, never a fault or another listing's place)."""

import base64

import grpc
import pytest

from bastion import pages


def forged(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(("asked", "size"), [(0, 100), (1, 1), (500, 500), (37, 37)])
def test_a_page_holds_what_was_asked_or_the_default(asked: int, size: int) -> None:
    assert pages.page_size(asked) == size


@pytest.mark.parametrize("asked", [-1, 501, 2**31 - 1, -(2**31)])
def test_a_page_size_out_of_range_is_an_invalid_argument_naming_it(asked: int) -> None:
    with pytest.raises(pages.InvalidPageError, match=f"page_size must be between 1 and 500, got {asked}") as refused:
        pages.page_size(asked)
    assert refused.value.status is grpc.StatusCode.INVALID_ARGUMENT


def test_a_token_reads_back_as_the_key_it_was_issued_for() -> None:
    token = pages.page_token("payment", "2030-01-01T00:00:00+00:00", "p-1")
    assert pages.token_key(token, "payment", 2) == ("2030-01-01T00:00:00+00:00", "p-1")
    assert pages.token_key("", "payment", 2) is None, "no token: the first page"


@pytest.mark.parametrize("token", [
    pages.page_token("account", "acc-1"),            # another listing's token
    pages.page_token("payment", "p-1"),              # too few parts
    pages.page_token("payment", "a", "b", "c"),      # too many
    pages.page_token("payment", "", "p-1"),          # an empty part
    forged("payment:2030\x00\np-1"),                 # a control character inside a part
    forged("payment"),                               # no kind separator
    "%%%", "bm90LWEtdG9rZW4", "\u00e9t\u00e9",       # not base64, bad padding, not ASCII
    base64.urlsafe_b64encode(b"payment:\xff\np-1").decode(),  # not UTF-8
    forged("payment:" + "x" * 400 + "\np-1"),        # longer than any token a service issues
])
def test_a_token_the_listing_did_not_issue_is_refused_naming_page_token(token: str) -> None:
    with pytest.raises(pages.InvalidPageError, match="page_token is not one this service issued"):
        pages.token_key(token, "payment", 2)


def test_a_page_read_one_row_beyond_its_size_says_whether_more_follow() -> None:
    assert pages.page_of([1, 2, 3], 2) == ([1, 2], True)
    assert pages.page_of([1, 2], 2) == ([1, 2], False), "a full last page hands out no token to an empty page"
    assert pages.page_of([], 2) == ([], False)
