"""An aiohttp app served on a loopback port the system picks, for tests that talk HTTP to it.

The port is read from the runner's public `addresses` (aiohttp >= 3.3), not from a site's
private server object.
"""

from __future__ import annotations

from aiohttp import web

HOST = "127.0.0.1"


async def serve(app: web.Application) -> web.AppRunner:
    """Serve `app` on a free port of 127.0.0.1; `await runner.cleanup()` stops it."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    return runner


def port(runner: web.AppRunner) -> int:
    """The port `serve` bound (its one site listens on one socket)."""
    (address,) = runner.addresses
    return int(address[1])


def base_url(runner: web.AppRunner, host: str = HOST) -> str:
    """`http://host:port`; `host` another name for the loopback address (another origin)."""
    return f"http://{host}:{port(runner)}"
