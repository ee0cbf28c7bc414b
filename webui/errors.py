"""LoRA Deck's one error family. Every failure a user can cause or meet is a `LoraDeckError` whose message
says what went wrong in plain words; its subclass says what kind of failure it is, and that alone decides
the HTTP status the API answers with and the heading the UI shows (`http_status`, `ui_message`): callers
catch `LoraDeckError` once instead of a tuple of module-specific classes.

The subclasses also derive from the built-in exception a Python caller would expect (a bad value is a
ValueError, a failed load a RuntimeError), so library-style `except ValueError` keeps working.
"""
from __future__ import annotations


class LoraDeckError(Exception):
    """Base of every error LoRA Deck reports to a user. `code` and `param` refine the API's error body
    (OpenAI's `code` and `param` fields) where the class alone is too coarse."""

    status = 500
    error_type = "server_error"   # OpenAI's error `type`
    heading = "Error"             # what the UI shows before the message

    def __init__(self, message: str = "", *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class BadInput(LoraDeckError, ValueError):
    """A request, option, file or dataset that cannot be used as given (the message names the field or file)."""

    status, error_type, heading = 400, "invalid_request_error", "Invalid input"


class NotFound(LoraDeckError, LookupError):
    """A named model, adapter, file or run that does not exist (the message lists what does)."""

    status, error_type, heading = 404, "invalid_request_error", "Not found"


class Incompatible(BadInput):
    """An adapter that does not fit the loaded base. `report` is the compatibility report, when there is one."""

    heading = "Does not fit"

    def __init__(self, message: str = "", *, report=None, code: str | None = "adapter_incompatible",
                 param: str | None = None):
        super().__init__(message, code=code, param=param)
        self.report = report


class Unsupported(LoraDeckError):
    """The loaded loader (or this build) cannot do this; the message says what to do instead."""

    status, error_type, heading = 400, "invalid_request_error", "Not possible here"


class LoadFailed(LoraDeckError, RuntimeError):
    """A model could not be loaded (the previous model, if any, is still loaded)."""

    status, error_type, heading = 400, "invalid_request_error", "Load failed"


class DownloadFailed(LoraDeckError, RuntimeError):
    """Getting files from the hub, S3 or a folder failed; what arrived is kept for a resume."""

    status, error_type, heading = 502, "server_error", "Download failed"


class UploadFailed(LoraDeckError, RuntimeError):
    """Publishing to the hub or S3 failed (unreachable, refused, or the token has no write access); the local
    folder is unchanged, and publishing again is safe (it overwrites the same files)."""

    status, error_type, heading = 502, "server_error", "Publish failed"


class NoModelLoaded(LoraDeckError, RuntimeError):
    """Nothing is loaded to answer with."""

    status, error_type, heading = 503, "server_error", "No model"

    def __init__(self, message: str = "no model is loaded: pick one on the Model tab", *,
                 code: str | None = "model_not_loaded", param: str | None = None):
        super().__init__(message, code=code, param=param)


class EngineUnavailable(LoraDeckError, RuntimeError):
    """A remote serving engine (the remote loader) could not be reached, timed out, or broke off a reply: 503
    while it is down or slow, 502 when it answered with something unusable. The app keeps running and the next
    request tries the engine again."""

    status, error_type, heading = 503, "server_error", "Engine unavailable"

    def __init__(self, message: str = "", *, status: int = 503, code: str | None = "engine_unavailable",
                 param: str | None = None):
        super().__init__(message, code=code, param=param)
        self.status = status


class Unauthorized(LoraDeckError):
    """A request without the server's API key."""

    status, error_type, heading = 401, "authentication_error", "Not allowed"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): LoRA Deck reports
    library exceptions in one line."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def http_status(e: BaseException) -> int:
    """The HTTP status the API answers `e` with (500 for anything outside the family: a bug)."""
    return e.status if isinstance(e, LoraDeckError) else 500


def ui_message(e: BaseException) -> str:
    """The Markdown line the UI shows for `e`."""
    heading = e.heading if isinstance(e, LoraDeckError) else "Unexpected error"
    return f"⚠️ **{heading}:** {first_line(e) if not isinstance(e, LoraDeckError) else e}"
