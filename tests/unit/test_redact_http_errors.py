"""Customer ids in requests the HTTP parser refuses stay out of the logs (README: customer
ids kept out of logs). aiohttp's parser errors quote the request line, so their messages
are not among those kept."""
from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from stream import redact

SECRET = "secret-cust-42"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def _serve_and_send(raw: bytes) -> bytes:
    async def customer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/customers/{customer_id}", customer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        await asyncio.sleep(0.05)  # the server logs after replying
        return reply
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("raw", [
    b"GET /customers/" + SECRET.encode() + b"?pad=" + b"x" * 9_000
    + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /customers/" + SECRET.encode() + b"-\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /customers/" + SECRET.encode() + b" HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n",
])
def test_a_request_the_parser_refuses_leaves_no_customer_id_in_the_logs(raw: bytes) -> None:
    cap = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    redact.install()
    try:
        reply = asyncio.run(_serve_and_send(raw))
    finally:
        root.removeHandler(cap)
        root.setLevel(old_level)
    assert reply.split(b" ", 2)[1].startswith(b"4"), reply[:80]
    errors = [line for line in cap.lines if not line.startswith("DEBUG")]
    assert errors, "the parser error was not logged: the check saw nothing"
    assert not [line for line in errors if SECRET in line], errors


def test_parser_errors_are_described_without_their_message() -> None:
    from aiohttp.http_exceptions import InvalidURLError, LineTooLong

    for exc in (LineTooLong(f"/customers/{SECRET}?x", "8190"),
                InvalidURLError(f"GET /customers/{SECRET}")):
        assert SECRET not in redact.describe(exc)
        assert SECRET not in redact.format_exception(type(exc), exc, None)
