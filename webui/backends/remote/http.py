"""The HTTP connection to a remote serving engine (webui/backends/remote/engines/__init__.py speaks its dialects over it):
one thread-safe connection pool per engine, server-sent events, and connection failures, time-outs and engine
errors turned into LoRA Deck's error family (EngineUnavailable for down/slow/broken, BadInput for a 4xx), so a
request to an engine that went away gets a clear error and nothing else is affected.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx

from webui.errors import BadInput, EngineUnavailable


class Http:
    """One connection pool to the engine (thread-safe: concurrent requests share it)."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 120.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect fails fast (an engine that is down); read waits `timeout` for each answer or streamed chunk
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.timeout = timeout

    def close(self) -> None:
        self.client.close()

    def _failed(self, e: Exception) -> EngineUnavailable:
        if isinstance(e, httpx.TimeoutException):
            return EngineUnavailable(f"the engine at {self.url} did not answer within {self.timeout:g} s "
                                     "(--remote-timeout)")
        if isinstance(e, httpx.ConnectError):
            return EngineUnavailable(f"the engine at {self.url} is unreachable (is it running?)")
        return EngineUnavailable(f"the connection to the engine at {self.url} broke: {e}", status=502)

    def _check(self, r: httpx.Response, path: str) -> None:
        if r.status_code < 400:
            return
        try:
            body = r.json()
            err = body.get("error", body) if isinstance(body, dict) else body
            message = err.get("message", err) if isinstance(err, dict) else err
        except ValueError:
            message = r.text[:300]
        if r.status_code in (401, 403):
            raise BadInput(f"the engine at {self.url} refused the API key (--remote-api-key): {message}")
        if r.status_code < 500:
            raise BadInput(f"the engine refused {path}: {message}", code="engine_refused")
        raise EngineUnavailable(f"the engine failed on {path} ({r.status_code}): {message}", status=502)

    def get(self, path: str):
        try:
            r = self.client.get(path)
        except httpx.HTTPError as e:
            raise self._failed(e) from None
        self._check(r, path)
        return r.json()

    def answers(self, path: str) -> bool:
        """Does the engine answer GET `path` with a JSON 200 (route detection)?"""
        try:
            r = self.client.get(path, timeout=min(self.timeout, 10.0))
            return r.status_code == 200 and r.json() is not None
        except (httpx.HTTPError, ValueError):
            return False

    def post(self, path: str, body) -> object:
        try:
            r = self.client.post(path, json=body)
        except httpx.HTTPError as e:
            raise self._failed(e) from None
        self._check(r, path)
        try:
            return r.json()
        except ValueError:
            return r.text

    def events(self, path: str, body: dict, cancel: threading.Event | None) -> Iterator[dict]:
        """The JSON events of a server-sent-events answer; closing the iterator (or `cancel`) drops the
        connection, which makes the engine stop generating."""
        try:
            with self.client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r, path)
                for line in r.iter_lines():
                    if cancel is not None and cancel.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if isinstance(event, dict) and "error" in event:
                        err = event["error"]
                        raise EngineUnavailable(f"the engine failed mid-reply: "
                                                f"{err.get('message', err) if isinstance(err, dict) else err}",
                                                status=502)
                    yield event
        except httpx.HTTPError as e:
            raise self._failed(e) from None
