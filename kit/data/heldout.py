"""The eval split as prompts and reference answers: what the sample answers during training and `kit eval`'s
local task ask the model. They are read back from the split's tokens, so they are exactly what the run held
out, in the chat format it trained with, whatever the data's format or mixture."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kit.models.template import chat_format, turn_marks


@dataclass(frozen=True)
class HeldOut:
    prompt: str
    """The conversation as trained, up to and including the opening of its last answer."""
    question: str
    """The last user turn (empty for a text-only example)."""
    reference: str
    """The answer the example trains toward (cut where max_seq_length cut the example)."""


def held_out(dataset, tokenizer, limit: Optional[int] = None) -> list[HeldOut]:
    """The first `limit` (all: None) examples of a tokenized split that reach their last answer's opening."""
    end = chat_format(tokenizer).end_of_turn
    user, answer = turn_marks(tokenizer, end)
    out: list[HeldOut] = []
    for ids in dataset["input_ids"]:
        if limit is not None and len(out) >= limit:
            break
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        at = text.rfind(answer)
        if at < 0:  # truncated before its answer
            continue
        prompt = text[:at + len(answer)]
        asked = prompt.rfind(user, 0, at)
        question = prompt[asked + len(user):at].split(end)[0] if asked >= 0 else ""
        out.append(HeldOut(prompt, question, text[at + len(answer):].split(end)[0]))
    return out
