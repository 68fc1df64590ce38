"""Response streams that finish inside their call (grpc.aio servers; no grpc import).

grpc.aio drives an async-generator handler with ``async for`` and ``await context.write``. When
the call ends early (the client's deadline, a cancel) while the generator is suspended at its
``yield``, the ``CancelledError`` lands in grpc's write, not in the generator. The generator stays
open until asyncio's async-generator finaliser closes it later, after grpc has released the call
(``grpc_call_unref``, the C call pointer set to NULL). A ``finally`` run then, in the generator or in
anything it iterates, that asks the context about its call (``context.peer()``, ``auth_context()``,
``read()``) hands gRPC core a NULL call: the process dies with SIGSEGV and no Python traceback.
That was issue 13's crash: the telemetry interceptor's ``finally`` logged ``context.peer()`` for a
``RankStream`` whose deadline passed while the malformed-request flood kept the event loop busy.

:func:`write_responses` makes the interceptors' wrappers coroutine handlers (grpc's writer API)
that drive the generator themselves and close it before returning or raising, so every
``finally`` of a streaming handler runs while its call is still alive::

    async def handler(request, context):          # a coroutine: grpc awaits it, no generator left open
        await write_responses(behavior(request, context), context)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol


class Writer(Protocol):
    """What :func:`write_responses` needs of a ``grpc.aio.ServicerContext``."""

    async def write(self, message: Any) -> None: ...


async def write_responses(responses: AsyncIterator[Any], context: Writer) -> None:
    """Writes each response of ``responses`` to the call; the generator is closed (its ``finally``
    run) before this returns or raises, cancellation included."""
    async with contextlib.aclosing(responses) as stream:
        async for response in stream:
            await context.write(response)
