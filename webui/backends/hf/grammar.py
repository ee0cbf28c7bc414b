"""Structured output on the transformers-family loaders (float, GPTQ, bitsandbytes): a JSON schema, or any
JSON object, compiled once per model by xgrammar against the model's tokenizer, then enforced token by token
by a fresh logits processor per generation (it holds each row's parse state), so the reply parses and
validates. xgrammar rather than hand-written masks: it is maintained, fast, and handles byte-level and
sentencepiece vocabularies alike. Schemas are compiled without optional whitespace, so a reply cannot pad
itself with spaces until it runs out of tokens.
"""
from __future__ import annotations

from webui.errors import BadInput, first_line


class Grammars:
    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._compiled: dict[str, object] = {}

    def compile(self, response_format: str):
        """The compiled grammar of a GenerationParams.response_format (`json` or a schema); bad schemas are
        refused with the compiler's reason."""
        import xgrammar as xgr  # heavy (it loads its native library and triton): only structured output needs it

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        if response_format not in self._compiled:
            try:
                self._compiled[response_format] = self._compiler.compile_builtin_json_grammar() \
                    if response_format == "json" else self._compiler.compile_json_schema(response_format,
                                                                                          any_whitespace=False)
            except Exception as e:  # xgrammar raises plain RuntimeErrors for schemas it cannot handle
                raise BadInput(f"response_format: the schema cannot be enforced: {first_line(e)}") from None
        return self._compiled[response_format]

    def processor(self, response_format: str):
        """A logits processor for one generate() call (all rows of a batch follow the same format)."""
        from xgrammar.contrib.hf import LogitsProcessor  # see compile()

        return LogitsProcessor(self.compile(response_format))
