"""Calling a servicer as the security interceptor would have admitted the call: the caller's principal (and bearer
token) in the call's context for the handler to read, the RPC run to its end."""

import asyncio
from collections.abc import Awaitable
from typing import Any

from bastion.grpc.context import CallContext, Principal, current_call


def admitted(principal: Principal | None, rpc: Awaitable[Any], path: str, bearer: str | None = None,
             peer: str = "cli") -> Any:
    """Run RPC with PRINCIPAL (from certificate PEER, token BEARER) admitted on PATH; the context is reset after."""
    token = current_call.set(CallContext("corr-1", peer, principal, path, bearer=bearer))
    try:
        return asyncio.run(_to_its_end(rpc))
    finally:
        current_call.reset(token)


async def _to_its_end(rpc: Awaitable[Any]) -> Any:
    return await rpc
