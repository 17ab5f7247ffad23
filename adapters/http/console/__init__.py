"""The web console: static files served at `/` by `rulebound serve`.

Plain HTML, CSS and ES modules shipped in this package (no build step, nothing fetched from
elsewhere). The page is a client of the `/v1` API like any other: with a token configured it
asks for it once, keeps it in the tab's sessionStorage and sends it as a bearer header; the
files themselves hold nothing secret, so they are served without auth.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".svg": "image/svg+xml"}
# Only our own files, from our own origin: no inline script, no eval, no framing.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _files() -> dict[str, tuple[bytes, str]]:
    """Every asset by name, read once: the package's static/ folder."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


def add_console(app: web.Application) -> None:
    """Mount the console: `/` is the page, `/console/NAME` its assets."""
    files = _files()

    def answer(name: str) -> web.Response:
        body, ctype = files[name]
        return web.Response(body=body, content_type=ctype, charset="utf-8",
                            headers=_HEADERS)

    async def index(request: web.Request) -> web.Response:
        return answer("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return answer(name)

    app.router.add_get("/", index)
    app.router.add_get("/console/{name}", asset)
