"""A clean start (issue 29): the app's log, from start-up through a first request with an adapter (which makes
PEFT import GPTQModel), holds only our own lines, the address line and the weights' progress bar: no library
banner, no deprecation notices. Warnings of ours (and library errors) would still show."""
import re
from pathlib import Path

import openai

from tests.helpers import PROMPT
from webui.testing.tiny_models import write_adapter

OURS = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING|ERROR) webui[.\w]*: ")


def test_the_log_of_a_first_session_holds_only_our_lines(start_app, tiny_models, tmp_path):
    base = tiny_models["llama"]
    write_adapter(base, tmp_path / "loras" / "A", seed=3)
    app = start_app("--model", base.name, "--models-dir", str(base.parent), "--loras-dir", str(tmp_path / "loras"),
                    "--nowebui")
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert client.completions.create(model="A", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    lines = [ln for ln in re.split(r"[\r\n]+", Path(app.log.name).read_text()) if ln.strip()]
    noise = [ln for ln in lines if not (OURS.match(ln) or ln.startswith("LoRA Deck: http")
                                        or ln.startswith("Loading weights"))]
    assert not noise, "\n".join(noise[:20])
