"""The Chatbot's history as OpenAI-style messages: what the chat template, saved conversations and the
preference sets take. Gradio hands a message's content back as a string or as typed parts."""
from __future__ import annotations


def message_text(content) -> str:
    """The text of a Chatbot message (Gradio may hand back a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def to_messages(history: list, system: str) -> list[dict]:
    """Chatbot history → OpenAI-style messages for the chat template."""
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        role = m["role"] if isinstance(m, dict) else m.role
        content = m["content"] if isinstance(m, dict) else m.content
        msgs.append({"role": role, "content": message_text(content)})
    return msgs
