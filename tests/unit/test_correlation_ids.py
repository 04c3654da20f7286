"""Correlation ids: the caller's when well formed, else a fresh one that is unique and well formed itself."""

import os

from bastion.grpc.context import CORRELATION_HEADER, VALID_CORRELATION_ID, correlation_id_from


def test_a_well_formed_id_from_the_caller_is_kept() -> None:
    assert correlation_id_from({CORRELATION_HEADER: "demo-42.a:b_c"}) == "demo-42.a:b_c"
    assert correlation_id_from({CORRELATION_HEADER: "x" * 64}) == "x" * 64  # the longest kept
    assert correlation_id_from({"x-correlation-id": "from-curl"}) == "from-curl"  # the header docs/grpc.md names


def test_a_missing_or_malformed_id_is_replaced_by_a_fresh_well_formed_one() -> None:
    offered = ["", "x" * 65, "has space", "new\nline", "trailing\n", "ünïcode", "<script>", "../a/b", "a=b"]
    fresh = [correlation_id_from({CORRELATION_HEADER: value} if value else {}) for value in offered]
    assert not set(fresh) & set(offered)
    assert all(VALID_CORRELATION_ID.fullmatch(value) for value in fresh)


def test_fresh_ids_are_unique_in_a_process_and_across_a_fork() -> None:
    ours = {correlation_id_from({}) for _ in range(10_000)}
    assert len(ours) == 10_000
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports its first fresh id and leaves at once
        os.write(writer, correlation_id_from({}).encode())
        os._exit(0)
    os.close(writer)
    _, status = os.waitpid(child, 0)
    theirs = os.read(reader, 100).decode()
    os.close(reader)
    assert status == 0 and VALID_CORRELATION_ID.fullmatch(theirs)
    assert theirs not in ours and theirs.rpartition(".")[0] != next(iter(ours)).rpartition(".")[0]
