"""A response stream cut off by its deadline while the server's write waits on flow control: the
handler's ``finally`` runs inside the call, so asking the context about the call there is safe.

Through the services' real interceptor chain (``ServerTelemetry`` first, then ``ServerGuard``), on a
real grpc.aio server on loopback. Before ``exitrank.server_streams`` the generator was left open past
the call's end and the telemetry's ``finally`` read ``context.peer()`` of a released call: SIGSEGV.
The server runs in a child process, so such a fault fails this test instead of ending the session.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from exitrank.server_streams import write_responses

ROOT = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent("""
    import asyncio, gc
    import grpc
    from exitrank.grpc_security import server_kwargs
    from exitrank.observability.interceptors import ServerTelemetry, with_telemetry
    from exitrank.security import Limits

    cleanups = []

    async def responses(requests, context):
        try:
            async for _ in requests:
                yield b"x" * 1_000_000  # over the client's window: the write waits for a reader
        finally:
            cleanups.append(("finally", isinstance(context.peer(), str)))  # a released call: SIGSEGV

    async def main():
        kwargs = with_telemetry(server_kwargs(Limits(max_send_bytes=8 << 20)), ServerTelemetry())
        server = grpc.aio.server(**kwargs)
        handler = grpc.stream_stream_rpc_method_handler(responses)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", {"M": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_receive_message_length", 8 << 20)]) as channel:
            call = channel.stream_stream("/t.S/M")(iter([b"a"] * 50), timeout=1.0)
            await call.read()  # one message, then no more reading until the deadline ends the call
            print("client", (await call.code()).name, flush=True)
        for _ in range(10):  # let any generator left open be finalised now
            gc.collect()
            await asyncio.sleep(0.05)
        print("cleanups", cleanups, flush=True)
        await server.stop(None)

    asyncio.run(main())
""")


def test_a_deadline_during_a_blocked_write_closes_the_stream_inside_the_call():
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", SERVER], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "client DEADLINE_EXCEEDED" in done.stdout
    assert "cleanups [('finally', True)]" in done.stdout, done.stdout  # ran once, the call still alive


async def _collect(responses) -> list:
    class Context:
        written: list = []

        async def write(self, message) -> None:
            self.written.append(message)
            if message == 2:
                raise RuntimeError("the call ended")

    context = Context()
    try:
        await write_responses(responses, context)
    except RuntimeError:
        pass
    return context.written


def test_write_responses_closes_the_generator_when_a_write_fails():
    import asyncio

    closed = []

    async def responses():
        try:
            for n in range(5):
                yield n
        finally:
            closed.append(True)

    assert asyncio.run(_collect(responses())) == [0, 1, 2]
    assert closed == [True]  # closed at once, not left to the async-generator finaliser
