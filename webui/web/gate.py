"""The login gate in front of the web UI: with --auth, a request to any Gradio route needs a logged-in session,
except the few the login page itself needs (the page shell, its static assets, the login form).

Why a gate of our own: Gradio's login check guards most of its routes, but in Gradio 6.31 several that act
on the app have none — `/gradio_api/startup-events` (runs the app's start-up events), `/gradio_api/stream/{id}`
and `/gradio_api/cancel` (feed or cancel a running event), `/gradio_api/heartbeat/{session}`, `/gradio_api/reset`,
`/gradio_api/app_id`, `/gradio_api/runs` (the run-history page) — and a Gradio upgrade may add more. Refusing
everything not on a short list of public paths covers future routes too. The session is Gradio's own: the
cookie its login form sets, looked up in its token table, so logging in works exactly as before.
"""
from __future__ import annotations

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# What an anonymous browser needs to show the login form and log in; nothing here runs an event or reads a
# user's file (`/config` and `/gradio_api/login_check` answer 401 themselves until the user has logged in).
PUBLIC = frozenset({"/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico", "/theme.css",
                    "/robots.txt", "/manifest.json", "/gradio_api/login_check", "/gradio_api/login_check/",
                    "/gradio_api/theme.css", "/gradio_api/user", "/gradio_api/user/", "/gradio_api/token",
                    "/gradio_api/token/"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


class LoginGate:
    """ASGI wrapper around the mounted Gradio app `gradio_app` (which holds Gradio's session tokens)."""

    def __init__(self, app: ASGIApp, gradio_app):
        self.app, self.gradio_app = app, gradio_app

    def _user(self, scope: Scope) -> str | None:
        cookies = HTTPConnection(scope).cookies
        cookie_id = self.gradio_app.cookie_id
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return self.gradio_app.tokens.get(token) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            root, path = scope.get("root_path", ""), scope["path"]
            if root and path.startswith(root):  # the path as the mounted app routes it
                path = path[len(root):] or "/"
            public = path in PUBLIC or path.startswith(PUBLIC_PREFIXES)
            if not public and self._user(scope) is None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                response = JSONResponse({"detail": {"error": "Not authenticated: log in at /"}}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def gate_gradio(app) -> None:
    """Put a LoginGate in front of the Gradio app that gr.mount_gradio_app mounted on `app`."""
    from gradio.routes import App
    from starlette.routing import Mount

    mounts = [r for r in app.routes if isinstance(r, Mount) and isinstance(r.app, App)]
    if not mounts:
        raise RuntimeError("no mounted Gradio app to gate")  # a Gradio change: refuse to serve unguarded
    for mount in mounts:
        mount.app = LoginGate(mount.app, mount.app)
