"""How many calls a replica reserves from Redis at once: enough to spare busy principals a round trip per call,
never so many that one replica holds back more than a fiftieth of a window from the others."""

import pytest

from bastion.grpc.ratelimit import RateLimit
from bastion.runtime import DEFAULT_RATE_LIMIT, SERVICE_ACCOUNT_RATE_LIMIT


@pytest.mark.parametrize(("calls", "batch"), [(1, 1), (37, 1), (100, 2), (600, 12), (3_200, 64), (10**9, 64)])
def test_a_reservation_is_a_fiftieth_of_the_limit_between_1_and_64(calls: int, batch: int) -> None:
    assert RateLimit(calls, 60).batch == batch


def test_the_platform_limits_reserve_little_for_people_and_the_most_for_services() -> None:
    assert DEFAULT_RATE_LIMIT.batch * 50 <= DEFAULT_RATE_LIMIT.calls
    assert SERVICE_ACCOUNT_RATE_LIMIT.batch == 64
