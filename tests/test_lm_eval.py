"""EleutherAI's lm-evaluation-harness, unchanged, against our OpenAI API: its `local-completions` model scores a
multiple-choice task (loglikelihood requests: `echo` + `logprobs` + `max_tokens: 1`, several prompts per
request) on a local data file, once through adapter A and once through the plain base. The task is made for
A — each context's right answer is the word A finds likeliest — so A must score 1.0 and the base less, and
both must equal what plain PEFT / transformers give when they score the same choices in this test."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import api_app, peft_model

CONTEXTS = ["The quick brown fox", "Hello! How can I", "One, two, three", "LoRA adapters change",
            "The capital of France", "Models, tokens, layers", "Tell me a story about", "The lazy dog"]
WORDS = [" red", " green", " blue", " cat", " dog", " house"]


def _logliks(model, tok, context: str) -> list[float]:
    """log p(word | context) for each word, as lm-eval counts it: the joint tokens after the context's."""
    out = []
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    for word in WORDS:
        ids = tok(context + word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        out.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
    return out


def write_task(folder, name: str, rows: list[dict], body: str):
    """An lm-eval task `name` over `rows` (written as the task's local JSONL data file) in `folder`."""
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {folder / 'data.jsonl'}\ntest_split: test\n" + body)
    return folder


@pytest.fixture(scope="module")
def task(tiny_models, llama_loras, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    base = tiny_models["llama"]
    tok, with_a = peft_model(base, {"A": (llama_loras / "A", 1.0)})
    plain = AutoModelForCausalLM.from_pretrained(str(base))
    rows, base_right = [], 0
    for context in CONTEXTS:
        a, b = _logliks(with_a, tok, context), _logliks(plain, tok, context)
        label = a.index(max(a))
        rows.append({"context": context, "choices": WORDS, "label": label})
        base_right += b.index(max(b)) == label
    assert base_right < len(rows), "the base must disagree with A somewhere for the task to mean anything"
    d = write_task(tmp_path_factory.mktemp("lm-eval-task"), "adapter_style", rows, """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return d, base_right / len(rows)


@pytest.fixture(scope="module")
def app(tiny_models, llama_loras):
    proc = api_app(tiny_models["llama"], llama_loras)
    yield proc
    proc.stop()


def test_lm_eval_scores_the_adapter_above_the_base(app, task, tiny_models):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder, base_expected = task
    accuracy = {}
    for model in ("A", "tiny-llama"):
        args = (f"model={model},base_url={app.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tiny_models['llama']},tokenized_requests=False,num_concurrent=1,max_retries=1")
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["adapter_style"],
                                      task_manager=TaskManager(include_path=str(folder)), batch_size=4)
        accuracy[model] = out["results"]["adapter_style"]["acc,none"]
    assert accuracy["A"] == 1.0  # every label is A's likeliest word: exact logprobs pick it every time
    assert accuracy["tiny-llama"] == pytest.approx(base_expected) and accuracy["tiny-llama"] < 1.0


QUESTIONS = ["Tell me a story", "What is the capital of France?", "Count to five", "Say hello", "Name a color",
             "Describe a robot"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def chat_task(tiny_models, llama_loras, tmp_path_factory):
    """A generation task whose answers are A's own greedy chat replies (computed here with plain PEFT)."""
    tok, with_a = peft_model(tiny_models["llama"], {"A": (llama_loras / "A", 1.0)})
    rows = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            out = with_a.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                  pad_token_id=tok.pad_token_id)
        rows.append({"question": q, "answer": tok.decode(out[0, len(ids):], skip_special_tokens=True)})
    folder = tmp_path_factory.mktemp("lm-eval-chat-task")
    return write_task(folder, "adapter_answers", rows, f"""output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|no-stop|>"]
  max_gen_toks: {NEW_TOKENS}
  do_sample: false
metric_list:
  - metric: exact_match
""")


def test_lm_eval_chat_generation_task(app, chat_task):
    """`local-chat-completions` (a generation task over /v1/chat/completions): A reproduces its own answers,
    the base does not."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    scores = {}
    for model in ("A", "tiny-llama"):
        out = lm_eval.simple_evaluate(
            model="local-chat-completions", apply_chat_template=True, batch_size=1,
            model_args=f"model={model},base_url={app.url}/v1/chat/completions,num_concurrent=1,max_retries=1",
            tasks=["adapter_answers"], task_manager=TaskManager(include_path=str(chat_task)))
        scores[model] = out["results"]["adapter_answers"]["exact_match,none"]
    assert scores["A"] == 1.0 and scores["tiny-llama"] < 0.5
