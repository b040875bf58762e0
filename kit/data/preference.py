"""Preference pairs for DPO and ORPO (train.method): rows -> (prompt messages, chosen answer, rejected answer),
rendered with the run's chat format and handed to TRL as prompt/chosen/rejected strings.

Formats, detected from the columns:
- LLaMA-Factory's alpaca form: instruction, input (optional), chosen, rejected (answers as text);
- TRL's explicit prompt: prompt, chosen, rejected, each text or a list of messages ({role, content});
- TRL's implicit prompt: chosen and rejected conversations that share their prompt turns.
Rows are read by kit.data.rows (file and line in WHERE) and split like SFT's (data.eval_ratio also when the run does
not evaluate during training: the held-out accuracy at the end needs the split). Every problem found in the rows is
reported at once, one line each with its file and line: chosen equal to rejected, an empty side, a prompt or
side that is not text or messages. A pair longer than model.max_seq_length is dropped with a warning
(data.overlong=drop) or truncated at its end by TRL (truncate; a pair whose prompt alone fills it is dropped).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Optional

from kit.core.errors import DataError
from kit.data.heldout import HeldOut
from kit.data.load import SHAREGPT_ROLES, Prepared, TrainingData, few, mixture, train_and_eval_rows
from kit.data.rows import WHERE
from kit.models.template import chat_format, render

if TYPE_CHECKING:
    from kit.config.schema import Config

log = logging.getLogger("kit")
REFERENCE = {"dpo": "base with the adapter disabled", "orpo": "none (ORPO)"}
FORMATS = {
    "alpaca_preference": "instruction, input, chosen, rejected (LLaMA-Factory)",
    "prompt_preference": "prompt, chosen, rejected (TRL, text or messages)",
    "implicit_preference": "chosen, rejected conversations sharing their prompt turns (TRL's implicit prompt)",
}
MAX_LISTED = 50  # problems listed in one message


def detect_pair_format(columns: list[str], source: str) -> str:
    have = set(columns) - {WHERE}
    missing = [c for c in ("chosen", "rejected") if c not in have]
    if missing:
        raise DataError(
            f"{source}: preference training needs the columns chosen and rejected; {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (the columns are {sorted(have)}). Write each row as "
            "{instruction, input, chosen, rejected} (LLaMA-Factory), {prompt, chosen, rejected} (TRL; text or "
            "messages), or {chosen, rejected} conversations sharing their prompt turns; or train with "
            "train.method=sft.")
    if "instruction" in have:
        return "alpaca_preference"
    return "prompt_preference" if "prompt" in have else "implicit_preference"


class _Problem(Exception):
    pass


def _text(value: Any, what: str) -> str:
    if value is None:
        raise _Problem(f"{what} is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Problem(f"{what} is {type(value).__name__}; it should be text")
    return value if isinstance(value, str) else json.dumps(value)


def _messages(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Problem(f"{what} must be text or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value, 1):
        role = m.get("role") or m.get("from") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) and m.get("content") is not None else (
            m.get("value") if isinstance(m, dict) else None)
        if role not in SHAREGPT_ROLES or not isinstance(content, str):
            raise _Problem(f"{what}, message {i} needs a role (system/user/assistant) and text content")
        out.append({"role": SHAREGPT_ROLES[role], "content": content})
    return out


def _answer(value: Any, what: str) -> str:
    """One side: text, or messages holding one assistant answer."""
    if isinstance(value, list):
        msgs = _messages(value, what)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _Problem(f"{what} must hold one assistant message (the prompt turns go in 'prompt')")
        return msgs[0]["content"]
    return _text(value, what)


def _sides(row: dict) -> tuple[str, str]:
    """chosen and rejected of an explicit-prompt row; what is wrong with both, at once."""
    sides, wrong = [], []
    for name in ("chosen", "rejected"):
        try:
            sides.append(_answer(row.get(name), name))
        except _Problem as e:
            wrong.append(str(e))
            continue
        if not sides[-1].strip():
            wrong.append(f"{name} is empty")
    if wrong:
        raise _Problem("; ".join(wrong) + "; every pair needs two answers")
    return sides[0], sides[1]


def to_pair(row: dict, fmt: str, system_prompt: Optional[str]) -> tuple[list[dict], str, str]:
    """One row -> (prompt messages, chosen answer, rejected answer); raises _Problem with what is wrong."""
    if fmt == "alpaca_preference":
        extra = row.get("input")
        extra = _text(extra, "input") if extra not in (None, "") else ""
        prompt = [{"role": "user", "content": _text(row.get("instruction"), "instruction")
                   + (f"\n\n{extra}" if extra.strip() else "")}]
        chosen, rejected = _sides(row)
    elif fmt == "prompt_preference":
        value = row.get("prompt")
        prompt = _messages(value, "prompt") if isinstance(value, list) else [
            {"role": "user", "content": _text(value, "prompt")}]
        chosen, rejected = _sides(row)
    else:
        c, r = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        shared = 0
        while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
            shared += 1
        if not shared or len(c) != shared + 1 or len(r) != shared + 1 or \
                c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise _Problem("chosen and rejected must be conversations that share every turn but their last "
                           "assistant answer (TRL's implicit prompt), or give the prompt in a 'prompt' column")
        prompt, chosen, rejected = c[:shared], c[-1]["content"], r[-1]["content"]
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise _Problem("the prompt is empty")
    empty = [name for name, side in (("chosen", chosen), ("rejected", rejected)) if not side.strip()]
    if empty:
        raise _Problem(f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty; every pair needs two "
                       "answers")
    if chosen.strip() == rejected.strip():
        raise _Problem("chosen equals rejected, so there is nothing to prefer; fix the row or remove it")
    system = row.get("system")
    if prompt[0]["role"] != "system" and (system or system_prompt):
        prompt.insert(0, {"role": "system", "content": _text(system, "system") if system else system_prompt})
    return prompt, chosen.strip(), rejected.strip()


def prepare_pairs(ds, tokenizer, *, system_prompt: Optional[str], max_len: int, overlong: str,
                  source: str) -> Prepared:
    """Rows -> a dataset of prompt/chosen/rejected strings in the tokenizer's chat format, plus question (the
    last user turn, for the sample answers) and tokens (2 x (prompt + the longer side): what a pair costs in a
    padded micro-batch, for the plan)."""
    import datasets
    fmt = detect_pair_format(ds.column_names, source)
    end = chat_format(tokenizer).end_of_turn
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    h = hashlib.sha256()
    out, problems, dropped, truncated = [], [], [], 0

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for i, row in enumerate(ds):
        where = row.get(WHERE) or f"{source}, row {i + 1}"
        try:
            prompt_msgs, chosen, rejected = to_pair(row, fmt, system_prompt)
        except _Problem as e:
            problems.append(f"{where}: {e}.")
            continue
        prompt = render(tokenizer, prompt_msgs, add_generation_prompt=True)
        if adds_bos and prompt.startswith(bos):  # the tokenizer adds it when TRL tokenizes: not twice
            prompt = prompt[len(bos):]
        pair = {"prompt": prompt, "chosen": chosen + end, "rejected": rejected + end}
        n_prompt, longer = count(prompt), max(count(pair["chosen"]), count(pair["rejected"]))
        if n_prompt + longer > max_len:
            if overlong == "drop" or n_prompt >= max_len:
                dropped.append(where)
                continue
            truncated += 1
        h.update(json.dumps(pair, ensure_ascii=False, sort_keys=True).encode())
        question = next(m["content"] for m in reversed(prompt_msgs) if m["role"] == "user")
        out.append({**pair, "question": question, "tokens": 2 * min(n_prompt + longer, max_len)})
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                          if len(problems) > MAX_LISTED else [])
        head = f"{len(problems)} problem(s) in the preference pairs of {source} (format {fmt}: {FORMATS[fmt]}):"
        raise DataError(head + "".join(f"\n  {p}" for p in listed))
    if not out:
        raise DataError(f"{source}: every pair is longer than model.max_seq_length={max_len} tokens "
                        f"({few(dropped)}); raise model.max_seq_length or shorten the pairs.")
    tokens = [e["tokens"] for e in out]
    return Prepared(dataset=datasets.Dataset.from_list(out), fingerprint=h.hexdigest()[:16], truncated=truncated,
                    dropped_overlong=dropped, mean_tokens=sum(tokens) / len(tokens), trained_tokens=sum(tokens))


def load_pairs(cfg: Config, tokenizer) -> TrainingData:
    """The train and eval pairs as the config asks (kit.data.load_data's counterpart for DPO and ORPO)."""
    d = cfg.data
    common = dict(system_prompt=d.system_prompt, max_len=cfg.model.max_seq_length, overlong=d.overlong)
    if d.mixture:  # each source's format is read off its columns; the held-out accuracy is scored at the end
        data = mixture(cfg, lambda rows, source, *_: prepare_pairs(rows, tokenizer, source=source, **common),
                       held_out=True)
    else:
        data = _one_dataset(cfg, tokenizer, common)
    _warn_overlong("train", data.train, cfg.model.max_seq_length)
    _warn_overlong("eval", data.eval, cfg.model.max_seq_length)
    return data


def _warn_overlong(split: str, pairs: Optional[Prepared], max_len: int) -> None:
    if pairs is not None and pairs.dropped_overlong:
        log.warning(f"{split}: dropped {len(pairs.dropped_overlong)} pair(s) longer than model.max_seq_length="
                    f"{max_len}: {few(pairs.dropped_overlong)}")
    if pairs is not None and pairs.truncated:
        log.warning(f"{split}: {pairs.truncated} pair(s) longer than model.max_seq_length={max_len} are cut at the "
                    "end of their answers (data.overlong=drop drops them instead).")


def _one_dataset(cfg: Config, tokenizer, common: dict) -> TrainingData:
    d = cfg.data
    rows, eval_rows = train_and_eval_rows(cfg, held_out=True)  # the held-out accuracy is scored at the end
    problems, parts = [], []
    for part_rows, source in ((rows, d.path), (eval_rows, d.eval_path or f"{d.path} (eval)")):
        if part_rows is None:
            parts.append(None)
            continue
        try:
            parts.append(prepare_pairs(part_rows, tokenizer, source=source, **common))
        except DataError as e:
            problems.append(str(e))
    if problems:  # the train split's problems and the eval split's, at once
        raise DataError("\n".join(problems))
    return TrainingData(train=parts[0], eval=parts[1])


def held_out_pairs(dataset, tokenizer, limit: Optional[int] = None) -> list[HeldOut]:
    """The sample answers' prompts: each pair's prompt, question and chosen answer."""
    end = chat_format(tokenizer).end_of_turn
    rows = dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
    return [HeldOut(r["prompt"], r["question"], r["chosen"].removesuffix(end)) for r in rows]


def _answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """prompt + answer tokenized, and where the answer's tokens start (where the prompt's own tokens end)."""
    p_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + answer)["input_ids"]
    start = 0
    while start < min(len(p_ids), len(ids) - 1) and ids[start] == p_ids[start]:
        start += 1
    return ids, max(start, 1)


def answer_logps(model, tokenizer, rows: list[tuple[str, str]], batch: int = 16) -> list[float]:
    """log p(answer | prompt) under `model` for each (prompt, answer): the sum over the answer's tokens. Rows
    go through in right-padded batches (a causal model's positions before the padding are unaffected)."""
    import torch
    encoded = [_answer_tokens(tokenizer, p, a) for p, a in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(encoded), batch):
        part = encoded[i:i + batch]
        width = max(len(ids) for ids, _ in part)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in part], device=model.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in part], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
        for row, (x, start) in enumerate(part):  # token t is predicted at position t - 1
            out.append(float(logp[row, start - 1:len(x) - 1].sum()))
    return out


def preference_accuracy(model, tokenizer, dataset, method: str) -> dict:
    """On held-out pairs: how often the trained policy's log-ratio against the reference (the base: the adapter
    disabled) prefers chosen (DPO's implicit reward; at the start the policy is the reference, so every ratio is
    0 and no pair is preferred: accuracy 0), and how often raw log-probabilities prefer chosen, under the base and
    under the policy."""
    was_training = model.training
    model.eval()
    rows = [(r["prompt"], r[side]) for r in dataset for side in ("chosen", "rejected")]
    flat_policy = answer_logps(model, tokenizer, rows)
    with model.disable_adapter():
        flat_base = answer_logps(model, tokenizer, rows)
    model.train(was_training)
    policy, base = list(zip(flat_policy[::2], flat_policy[1::2])), list(zip(flat_base[::2], flat_base[1::2]))
    n = len(policy)
    margins = [(pc - bc) - (pr - br) for (pc, pr), (bc, br) in zip(policy, base)]
    return {
        "pairs": n, "method": method, "reference": REFERENCE.get(method, "-"),
        "accuracy": sum(m > 0 for m in margins) / n,
        "start_accuracy": 0.0,
        "start_note": "at the start the policy is the reference: every log-ratio is 0, so no pair is preferred",
        "mean_margin": sum(margins) / n,
        "base_logprob_accuracy": sum(c > r for c, r in base) / n,
        "policy_logprob_accuracy": sum(c > r for c, r in policy) / n,
    }
