"""The Probe servicer: the kit's test service, answering with what the security interceptor established."""

from collections.abc import AsyncIterator

import grpc

from bastion.grpc.context import current_call
from bastion.grpc.errors import UnauthenticatedError, UnavailableError
from bastion.probe.v1 import probe_pb2, probe_pb2_grpc


class ProbeServicer(probe_pb2_grpc.ProbeServicer):
    async def Whoami(self, request: probe_pb2.WhoamiRequest, context: grpc.aio.ServicerContext
                     ) -> probe_pb2.WhoamiResponse:
        call = current_call.get()
        principal = call.principal
        if principal is None:  # the interceptor admits no call without one
            raise UnauthenticatedError("no principal")
        return probe_pb2.WhoamiResponse(
            subject=principal.subject, username=principal.username or "", client_id=principal.client_id,
            roles=sorted(principal.roles), peer_identity=call.peer_identity or "",
            correlation_id=call.correlation_id, trace_id=call.trace.trace_id if call.trace else "",
            span_id=call.trace.span_id if call.trace else "",
            parent_span_id=call.trace.parent_id or "" if call.trace else "",
        )

    async def TellerOnly(self, request: probe_pb2.TellerOnlyRequest, context: grpc.aio.ServicerContext
                         ) -> probe_pb2.TellerOnlyResponse:
        principal = current_call.get().principal
        return probe_pb2.TellerOnlyResponse(username=principal.username or "" if principal else "")

    async def PaymentsOnly(self, request: probe_pb2.PaymentsOnlyRequest, context: grpc.aio.ServicerContext
                           ) -> probe_pb2.PaymentsOnlyResponse:
        return probe_pb2.PaymentsOnlyResponse(peer_identity=current_call.get().peer_identity or "")

    async def Countdown(self, request: probe_pb2.CountdownRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[probe_pb2.CountdownResponse]:
        for value in range(request.start, 0, -1):
            yield probe_pb2.CountdownResponse(value=value)


class FlakyProbeServicer(ProbeServicer):
    """A Probe whose PaymentsOnly can be made to fail as an overloaded service does, counting every call."""

    def __init__(self) -> None:
        self.failing = False
        self.calls = 0

    async def PaymentsOnly(self, request: probe_pb2.PaymentsOnlyRequest, context: grpc.aio.ServicerContext
                           ) -> probe_pb2.PaymentsOnlyResponse:
        self.calls += 1
        if self.failing:
            raise UnavailableError("probe is failing on purpose")
        return await super().PaymentsOnly(request, context)
