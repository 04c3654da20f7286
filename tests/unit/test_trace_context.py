"""W3C trace context: a well-formed `traceparent` is continued, anything else starts a trace of its own (and its
`tracestate` is dropped), and calls made on a call's behalf are children of its span."""

import os
import re

import pytest

from bastion.grpc.client import Downstream
from bastion.grpc.context import CallContext, current_call
from bastion.grpc.trace import (
    MAX_TRACESTATE,
    TRACEPARENT,
    TRACESTATE,
    parse_traceparent,
    trace_context_from,
    valid_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
WELL_FORMED = f"00-{TRACE}-{PARENT}-01"
ID = re.compile(r"[0-9a-f]+")


def test_a_well_formed_traceparent_is_continued_in_a_span_of_its_own() -> None:
    trace = trace_context_from([(TRACEPARENT, WELL_FORMED), (TRACESTATE, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")])
    assert (trace.trace_id, trace.parent_id, trace.sampled) == (TRACE, PARENT, True)
    assert trace.span_id != PARENT and len(trace.span_id) == 16 and ID.fullmatch(trace.span_id)
    assert trace.state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


@pytest.mark.parametrize("header", [
    "",
    f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex
    f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"ff-{TRACE}-{PARENT}-01",  # the invalid version
    f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
    f"01-{TRACE}-{PARENT}-01extra",  # a later version's extra fields follow a dash
    f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
    f"00-{TRACE}-{PARENT}-1",  # short flags
    f"00-{TRACE}-{PARENT[:-1]}-01",  # short parent id
    f"0-{TRACE}-{PARENT}-01",  # short version
    f"CC-{TRACE}-{PARENT}-01",  # upper-case version
    f"00-{TRACE}-{PARENT.upper()}-01",  # upper-case parent id
    f"00-{TRACE}-{PARENT}-0B",  # upper-case flags
    f" 00-{TRACE}-{PARENT}-01",
    "00-not-a-trace-01",
])
def test_anything_but_a_well_formed_traceparent_starts_a_new_trace_and_drops_the_tracestate(header: str) -> None:
    assert parse_traceparent(header) is None
    trace = trace_context_from([(TRACEPARENT, header), (TRACESTATE, "congo=t61rcWkgMzE")])
    assert trace.parent_id is None and not trace.sampled and trace.state == ""
    assert len(trace.trace_id) == 32 and ID.fullmatch(trace.trace_id) and trace.trace_id != TRACE


def test_a_later_version_is_read_as_version_00_and_only_the_sampled_flag_is_kept() -> None:
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-09-what-the-future-holds") == (TRACE, PARENT, True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, False)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-02") == (TRACE, PARENT, False), "a flag other than sampled"


@pytest.mark.parametrize(("header", "kept"), [
    ("rojo=00f067aa0ba902b7", "rojo=00f067aa0ba902b7"),
    (" congo=t61rcWkgMzE ,\trojo=1 ", "congo=t61rcWkgMzE,rojo=1"),
    ("fw529a3039@dt=abc", "fw529a3039@dt=abc"),
    ("Upper=1", ""),  # keys are lower case
    ("congo=", ""),  # a value has at least one character
    ("congo=a,b", ""),  # every member is key=value
    ("congo=a=b", ""),  # '=' is not a value character
    (",".join(f"k{n}=v" for n in range(33)), ""),  # at most 32 members
    (",".join(f"k{n}=v" for n in range(32)), ",".join(f"k{n}=v" for n in range(32))),  # 32 are kept
    ("a=1,,b=2, ,", "a=1,b=2"),  # empty members are allowed, and dropped
    ("k@1vendor=v", ""),  # a vendor starts with a letter
    ("foo=1,foo=2", ""),  # a key at most once (the W3C test suite's test_tracestate_duplicated_keys)
    ("foo=1,bar=2,foo=1", ""),
])
def test_a_tracestate_is_passed_on_only_when_well_formed(header: str, kept: str) -> None:
    assert valid_tracestate(header) == kept


def test_new_traces_and_spans_get_fresh_ids() -> None:
    traces = [trace_context_from([]) for _ in range(1000)]
    assert len({trace.trace_id for trace in traces}) == 1000 and len({trace.span_id for trace in traces}) == 1000
    assert all(len(trace.trace_id) == 32 and len(trace.span_id) == 16 for trace in traces), "leading zeros kept"


def test_a_call_made_on_a_calls_behalf_is_a_child_of_its_span() -> None:
    trace = trace_context_from([(TRACEPARENT, WELL_FORMED), (TRACESTATE, "rojo=1")])
    downstream = Downstream("accounts", None, None, None, None)  # type: ignore[arg-type]
    token = current_call.set(CallContext("corr-1", "payments", None, "/x/Y", trace=trace))
    try:
        sent = downstream.metadata("service-token")
    finally:
        current_call.reset(token)
    metadata = dict(sent)
    assert metadata[TRACEPARENT] == f"00-{TRACE}-{trace.span_id}-01" and metadata[TRACESTATE] == "rojo=1"
    assert trace_context_from(sent).parent_id == trace.span_id


def test_a_call_outside_any_served_call_sends_no_trace_context() -> None:
    downstream = Downstream("accounts", None, None, None, None)  # type: ignore[arg-type]
    assert TRACEPARENT not in dict(downstream.metadata("service-token"))


def test_a_tracestate_too_long_loses_its_long_members_first_then_members_from_the_end() -> None:
    short = [f"k{n:02d}=" + "v" * 20 for n in range(30)]  # 24 characters each: 749 in all
    long = "big=" + "x" * 200
    kept = valid_tracestate(",".join([short[0], long, *short[1:]]))
    assert len(kept) <= MAX_TRACESTATE and "big=" not in kept
    assert kept == ",".join(short[:20]), "members from the end went next, the first ones stay"


def test_repeated_headers_a_second_traceparent_starts_a_new_trace_tracestates_are_one_list() -> None:
    twice = trace_context_from([(TRACEPARENT, WELL_FORMED), (TRACEPARENT, f"00-{TRACE}-{'1' * 16}-01")])
    assert twice.parent_id is None and twice.trace_id != TRACE
    joined = trace_context_from([(TRACEPARENT, WELL_FORMED), (TRACESTATE, "a=1"), (TRACESTATE, "b=2")])
    assert joined.state == "a=1,b=2"
    binary = trace_context_from([(TRACEPARENT, WELL_FORMED.encode())])  # a value gRPC did not decode as text
    assert binary.parent_id is None


def test_a_call_outside_a_sampled_trace_makes_its_children_unsampled_too() -> None:
    trace = trace_context_from([(TRACEPARENT, f"00-{TRACE}-{PARENT}-00")])
    assert dict(trace.child_headers())[TRACEPARENT] == f"00-{TRACE}-{trace.span_id}-00"


def test_a_tracestate_of_exactly_512_characters_is_kept_whole_and_a_longer_one_cut_to_512() -> None:
    with_a_long_member = ",".join(["big=" + "x" * 196, *(f"k{n}=" + "v" * 60 for n in range(4)), "last=" + "v" * 50])
    assert len(with_a_long_member) == MAX_TRACESTATE and valid_tracestate(with_a_long_member) == with_a_long_member
    members = [f"k{n}=" + "v" * 60 for n in range(7)] + ["last=" + "v" * 59]  # 7 x 63 + 64 + 7 commas
    exact = ",".join(members)
    assert len(exact) == MAX_TRACESTATE
    assert valid_tracestate(",".join([*members, "z=1", "big=" + "x" * 200])) == exact


def test_a_member_of_128_characters_is_not_a_long_one() -> None:
    limit = "lim=" + "x" * 124  # 128 characters: kept while the longer ones go
    shorts = [f"k{n:02d}=" + "v" * 20 for n in range(10)]
    kept = valid_tracestate(",".join([limit, "big=" + "x" * 200, "big2=" + "x" * 200, *shorts]))
    assert kept == ",".join([limit, *shorts])


def test_a_forked_child_makes_ids_of_its_own() -> None:
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports its first new trace and leaves at once
        os.write(writer, trace_context_from([]).trace_id.encode())
        os._exit(0)
    os.close(writer)
    _, status = os.waitpid(child, 0)
    theirs = os.read(reader, 100).decode()
    os.close(reader)
    ours = trace_context_from([]).trace_id  # what the parent's generator gives next, as the child's would have
    assert status == 0 and len(theirs) == 32 and theirs != ours


def test_a_key_repeated_across_tracestate_headers_drops_the_list() -> None:
    trace = trace_context_from([(TRACEPARENT, WELL_FORMED), (TRACESTATE, "foo=1"), (TRACESTATE, "foo=2")])
    assert trace.parent_id == PARENT and trace.state == ""
