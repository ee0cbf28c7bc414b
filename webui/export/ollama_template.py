"""A model's Jinja chat template (tokenizer.chat_template in its GGUF) written as an Ollama TEMPLATE (Go
template syntax, Ollama's `.System` / `.Messages` / `.Role` / `.Content` variables), with the SYSTEM prompt the
template adds by default and the stop strings.

Jinja cannot be translated to Go templates in general, so the common turn formats are known here as their
literal pieces (ChatML, Llama 3, Gemma, Phi-3) and the one that fits is *checked*: the pieces are rendered the
way the Go template below renders them and compared with transformers' rendering of the model's own Jinja
template for a sample conversation (with and without a system message). A template that matches no format
exactly gets no TEMPLATE line (Ollama then falls back to its own detection from the GGUF metadata), and the
caller says so. The BOS token is left out: llama.cpp (and Ollama) add it when tokenizing.
"""
from __future__ import annotations

from dataclasses import dataclass

from webui.errors import first_line


@dataclass(frozen=True)
class TurnFormat:
    name: str
    marker: str                       # a literal the Jinja template holds when it is this format
    system: tuple[str, str] | None    # text before / after the system prompt (None: the format has no system turn)
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str                   # what opens the assistant's turn
    stops: tuple[str, ...]            # strings that end a turn


FORMATS = (
    TurnFormat("ChatML", "<|im_start|>", ("<|im_start|>system\n", "<|im_end|>\n"),
               ("<|im_start|>user\n", "<|im_end|>\n"), ("<|im_start|>assistant\n", "<|im_end|>\n"),
               "<|im_start|>assistant\n", ("<|im_end|>",)),
    TurnFormat("Llama 3", "<|start_header_id|>",
               ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",)),
    TurnFormat("Gemma", "<start_of_turn>", None, ("<start_of_turn>user\n", "<end_of_turn>\n"),
               ("<start_of_turn>model\n", "<end_of_turn>\n"), "<start_of_turn>model\n", ("<end_of_turn>",)),
    TurnFormat("Phi-3", "<|assistant|>", ("<|system|>\n", "<|end|>\n"), ("<|user|>\n", "<|end|>\n"),
               ("<|assistant|>\n", "<|end|>\n"), "<|assistant|>\n", ("<|end|>",)),
)

_SAMPLE = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi"},
           {"role": "user", "content": "How are you?"}]
_SAMPLE_SYSTEM = "You are terse."


def go_template(f: TurnFormat) -> str:
    """The Go template of a turn format, on one line of actions: `{{-` trim markers would eat the newlines that
    belong to the pieces. System messages reach it as `.System` (Ollama collects them there)."""
    system = (f'{{{{ if .System }}}}{f.system[0]}{{{{ .System }}}}{f.system[1]}{{{{ end }}}}' if f.system else "")
    return (system + '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
            f'{{{{ if eq .Role "user" }}}}{f.user[0]}{{{{ .Content }}}}{f.user[1]}'
            f'{{{{ else if eq .Role "assistant" }}}}{f.assistant[0]}{{{{ .Content }}}}'
            f'{{{{ if not $last }}}}{f.assistant[1]}{{{{ end }}}}{{{{ end }}}}'
            f'{{{{ if and (ne .Role "assistant") $last }}}}{f.generation}{{{{ end }}}}{{{{ end }}}}')


def render_like_go(f: TurnFormat, messages: list[dict], system: str | None) -> str:
    """What `go_template(f)` renders for `messages` with `.System` = system (the same pieces, in Python)."""
    out = f"{f.system[0]}{system}{f.system[1]}" if system and f.system else ""
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "user":
            out += f"{f.user[0]}{m['content']}{f.user[1]}"
        elif m["role"] == "assistant":
            out += f"{f.assistant[0]}{m['content']}" + ("" if last else f.assistant[1])
        if m["role"] != "assistant" and last:
            out += f.generation
    return out


def _jinja(template: str, messages: list[dict], bos: str, eos: str) -> str | None:
    from transformers.utils.chat_template_utils import render_jinja_template  # heavy: only exports need it

    try:
        rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)
    except Exception:  # noqa: BLE001  (templates raise for what they refuse, e.g. a system turn: no fit)
        return None
    text = rendered[0]
    # a BOS the template writes itself is left to the tokenizer (some models' BOS is also a turn marker)
    return text[len(bos):] if bos and "bos_token" in template and text.startswith(bos) else text


def _default_system(f: TurnFormat, rendered: str) -> str | None:
    """The system prompt a template adds when the conversation has none (SmolLM2's does), read off its output."""
    if not f.system or not rendered.startswith(f.system[0]):
        return None
    end = rendered.find(f.system[1], len(f.system[0]))
    return rendered[len(f.system[0]):end] if end > 0 else None


@dataclass
class OllamaTemplate:
    format: str
    template: str
    system: str | None
    stops: list[str]


def translate(chat_template: str, bos: str = "", eos: str = "", extra_stops=()) -> tuple[OllamaTemplate | None, str]:
    """(the Ollama template, or None; a one-line note on what was found) for a Jinja chat template."""
    if not chat_template:
        return None, "the model has no chat template: the Modelfile has no TEMPLATE (Ollama uses {{ .Prompt }})"
    try:
        for f in FORMATS:
            if f.marker not in chat_template:
                continue
            plain = _jinja(chat_template, _SAMPLE, bos, eos)
            if plain is None:
                continue
            default = None
            if plain != render_like_go(f, _SAMPLE, None):
                default = _default_system(f, plain)
                if default is None or plain != render_like_go(f, _SAMPLE, default):
                    continue
            if f.system:
                with_system = _jinja(chat_template, [{"role": "system", "content": _SAMPLE_SYSTEM}, *_SAMPLE], bos, eos)
                if with_system != render_like_go(f, _SAMPLE, _SAMPLE_SYSTEM):
                    continue
            stops = list(dict.fromkeys(s for s in (*f.stops, *extra_stops) if s))
            return OllamaTemplate(f.name, go_template(f), default, stops), f"chat template: {f.name}"
    except Exception as e:  # noqa: BLE001  (a broken template must not stop the export: it is reported)
        return None, f"the chat template could not be rendered ({first_line(e)}): the Modelfile has no TEMPLATE"
    return None, ("the chat template matches none of the formats translated here (ChatML, Llama 3, Gemma, Phi-3): "
                  "the Modelfile has no TEMPLATE, and Ollama picks one from the GGUF's metadata if it knows it")
