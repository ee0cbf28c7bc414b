"""Small helpers for error messages shown to users: LoRA Deck reports library exceptions in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
