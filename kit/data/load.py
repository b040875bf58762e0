"""Data as small pure steps: rows (kit.data.rows) -> format -> chat template -> tokenize/mask -> (mix sources) ->
(pack, by TRL).

Every row becomes a list of chat messages; every message list becomes input_ids and labels in the
tokenizer's chat format (kit.models.template), with -100 on everything but the assistant's answers (and the token
that ends each of them).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from kit.core.errors import DataError
from kit.data.rows import WHERE, kind, load_rows, split_eval
from kit.models.template import chat_format, content_pieces, layout

if TYPE_CHECKING:
    from datasets import Dataset

    from kit.config.data import DataSource
    from kit.config.schema import Config

log = logging.getLogger("kit")


# ---------------------------------------------------------------- format

def detect_format(columns: list[str], fields: dict[str, str], fields_key: str = "data.fields") -> str:
    col = lambda name: fields.get(name, name)  # noqa: E731
    have = set(columns)
    if col("messages") in have or "conversations" in have:
        return "messages"
    if col("instruction") in have and col("output") in have:
        return "alpaca"
    if col("prompt") in have and col("completion") in have:
        return "prompt_completion"
    if col("text") in have:
        return "text"
    raise DataError(f"cannot tell the data format from the columns {sorted(have - {WHERE})}. Expected "
                    "instruction/output (KoAlpaca, Alpaca), messages (chat), prompt/completion or text; map yours with "
                    f"{fields_key}, e.g. {fields_key}='{{instruction: question, output: answer}}'.")


def to_messages(row: dict, fmt: str, fields: dict[str, str], system_prompt: Optional[str], where: str,
                numbers: Optional[list[str]] = None, fields_key: str = "data.fields") -> list[dict]:
    """One row -> chat messages. `where` ('file, line N') goes into every error, `fields_key` (the setting of
    `fields`) into its fix; a number where text is expected is used as its text, and noted in `numbers`."""
    def get(name, required=True) -> Optional[str]:
        col = fields.get(name, name)
        value = _text(row.get(col), f"{where}, field '{col}'", numbers)
        if required and (value is None or not value.strip()):
            raise DataError(f"{where}: field '{col}' is missing or empty (format {fmt}). Fix the row, or map "
                            f"the column with {fields_key}.{name}=<column>.")
        return value
    if fmt in ("koalpaca", "alpaca"):
        extra = get("input", required=False)
        prompt = get("instruction") + (f"\n\n{extra}" if extra and extra.strip() else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": get("output")}]
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": get("prompt")}, {"role": "assistant", "content": get("completion")}]
    elif fmt == "text":
        msgs = [{"role": "assistant", "content": get("text")}]
    else:
        msgs = _chat_messages(row.get(fields.get("messages", "messages")) or row.get("conversations"), where, numbers)
    system = get("system", required=False)
    if msgs[0]["role"] != "system" and (system or system_prompt):
        msgs.insert(0, {"role": "system", "content": system or system_prompt})
    return msgs


def _text(value: Any, where: str, numbers: Optional[list[str]]) -> Optional[str]:
    """A field's text: a number (or true/false) is taken as written in JSON, and noted."""
    if isinstance(value, (int, float)):
        if numbers is not None:
            numbers.append(where)
        return json.dumps(value)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where} is {kind(value)}; it should be text.")
    return value


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _chat_messages(turns, where: str, numbers: Optional[list[str]]) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns.")
    msgs = []
    for i, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise DataError(f"{where}: turn {i} is not an object.")
        role = t.get("role") or t.get("from")  # a column's rows share their keys: the other style's are null
        content = _text(t["content"] if t.get("content") is not None else t.get("value"), f"{where}, turn {i}",
                        numbers)
        if role not in SHAREGPT_ROLES or content is None:
            raise DataError(f"{where}: turn {i} needs role (system/user/assistant, or ShareGPT from "
                            f"human/gpt) and text content; got role={role!r}.")
        msgs.append({"role": SHAREGPT_ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn.")
    return msgs


# ---------------------------------------------------------------- tokenize / mask

def tokenize(messages: list[dict], tokenizer, max_len: int, responses_only: bool,
             end_of_turn: Optional[str] = None) -> dict:
    """input_ids and labels; labels are -100 outside assistant answers (through their end-of-turn token,
    `end_of_turn`: the tokenizer's chat format's) when responses_only.
    `overlong` is the untruncated length when it exceeded max_len (else 0); `literal` says that a message
    held control-token text (e.g. '<|eot_id|>'), which is tokenized as the plain text it is."""
    end_of_turn = end_of_turn or chat_format(tokenizer).end_of_turn
    text, spans = layout(tokenizer, messages, end_of_turn)
    literal = any(_control_tokens(tokenizer).search(m["content"]) for m in messages)
    pieces = (content_pieces(tokenizer, messages, text) if literal else None) or [(0, len(text), False)]
    ids, offsets = [], []
    for start, end, content in pieces:
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=content)
        ids += enc["input_ids"]
        offsets += [(start + a, start + b) for a, b in enc["offset_mapping"]]
    if responses_only:
        labels = [t if any(s <= a and b <= e for s, e in spans) else -100 for t, (a, b) in zip(ids, offsets)]
    else:
        labels = list(ids)
        labels[0] = -100  # nothing predicts the first token
    overlong = len(ids) if len(ids) > max_len else 0
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "overlong": overlong, "literal": literal}


def _control_tokens(tokenizer) -> re.Pattern:
    return _alternatives(tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special))


@functools.lru_cache(maxsize=4)
def _alternatives(texts: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, texts)))


@dataclass
class Prepared:
    """Tokenized examples plus what the user should hear about them."""
    dataset: Dataset
    fingerprint: str
    truncated: int = 0
    dropped_overlong: list[str] = field(default_factory=list)
    """Where each dropped example came from (file and line, or row); likewise below."""
    dropped_masked: list[str] = field(default_factory=list)
    control_text: list[str] = field(default_factory=list)
    """Examples whose content holds control-token text, trained as plain text."""
    numbers_as_text: list[str] = field(default_factory=list)
    """Fields where text was expected and a number was given, used as text."""
    mean_tokens: float = 0.0
    trained_tokens: int = 0


def prepare(ds, tokenizer, *, fmt: str, fields: dict, system_prompt, max_len: int, responses_only: bool,
            overlong: str, source: str, fields_key: str = "data.fields") -> Prepared:
    """Rows -> tokenized dataset (input_ids, labels). Messages name each row's file and line (WHERE)."""
    import datasets
    columns = [c for c in ds.column_names if c != WHERE]
    fmt = detect_format(columns, fields, fields_key) if fmt == "auto" else fmt
    if fmt in ("koalpaca", "alpaca") and fields.get("instruction", "instruction") not in columns:
        raise DataError(f"{source}: format {fmt} needs an instruction column; columns are {columns}.")
    h = hashlib.sha256()
    end_of_turn = chat_format(tokenizer).end_of_turn
    out, truncated, dropped_long, dropped_masked, literal, numbers = [], 0, [], [], [], []
    for i, row in enumerate(ds):
        where = row.get(WHERE) or f"{source}, row {i + 1}"
        msgs = to_messages(row, fmt, fields, system_prompt, where, numbers, fields_key)
        h.update(json.dumps(msgs, ensure_ascii=False, sort_keys=True).encode())
        ex = tokenize(msgs, tokenizer, max_len, responses_only, end_of_turn)
        if ex.pop("literal"):
            literal.append(where)
        if ex.pop("overlong"):
            if overlong == "drop":
                dropped_long.append(where)
                continue
            truncated += 1
        if all(x == -100 for x in ex["labels"]):
            dropped_masked.append(where)
            continue
        out.append(ex)
    if not out:
        dropped = dropped_masked + dropped_long
        raise DataError(f"{source}: every example would have all its labels masked or was dropped ({few(dropped)}): "
                        "no assistant answer survives within model.max_seq_length. Raise max_seq_length, shorten the "
                        "prompts, or set data.overlong=truncate.")
    n_tokens = sum(len(e["input_ids"]) for e in out)
    trained = sum(sum(1 for x in e["labels"] if x != -100) for e in out)
    return Prepared(dataset=datasets.Dataset.from_list(out), fingerprint=h.hexdigest()[:16], truncated=truncated,
                    dropped_overlong=dropped_long, dropped_masked=dropped_masked, control_text=literal,
                    numbers_as_text=numbers, mean_tokens=n_tokens / len(out), trained_tokens=trained)


def few(wheres: list[str], n: int = 5) -> str:
    return "; ".join(wheres[:n]) + (f"; ... ({len(wheres)} in all)" if len(wheres) > n else "")


# ---------------------------------------------------------------- a recipe's data

@dataclass
class Share:
    """One source's part in a mixture (data.path as a list), for the plan and the manifest."""
    source: str
    """data.path[i] and its path."""
    examples: int
    """The source's training examples, tokenized (over-long or fully masked ones dropped)."""
    used: int
    """How many the mixture trains on: more than `examples` where the source is repeated."""
    eval_examples: int
    """Its rows held out for evaluation (data.eval_ratio or data.eval_split)."""


@dataclass
class TrainingData:
    """The train split and the eval split (None without evaluation), tokenized and masked."""
    train: Prepared
    eval: Optional[Prepared]
    mixture: list[Share] = field(default_factory=list)
    """Each source's part where data.path is a list; empty for one dataset."""


def load_data(cfg: Config, tokenizer) -> TrainingData:
    """Train and eval examples as the config asks; logs what was truncated or dropped."""
    d = cfg.data
    common = dict(system_prompt=d.system_prompt, max_len=cfg.model.max_seq_length,
                  responses_only=d.train_on_responses_only, overlong=d.overlong)
    if d.mixture:
        def one_source(rows, source: str, s: Optional[DataSource], fields_key: str) -> Prepared:
            fmt, fields = (s.format, s.fields) if s else (d.format, d.fields)
            return prepare(rows, tokenizer, source=source, fmt=fmt, fields=fields, fields_key=fields_key, **common)
        data = mixture(cfg, one_source)
    else:
        data = _one_dataset(cfg, tokenizer, common)
    for name, p in (("train", data.train), ("eval", data.eval)):
        if p is None:
            continue
        if p.truncated:
            log.warning(f"{name}: {p.truncated} example(s) longer than max_seq_length={cfg.model.max_seq_length} "
                        "were truncated (data.overlong=drop drops them instead).")
        if p.dropped_overlong:
            log.warning(f"{name}: dropped {len(p.dropped_overlong)} over-long example(s): {few(p.dropped_overlong)}")
        if p.dropped_masked:
            log.warning(f"{name}: dropped {len(p.dropped_masked)} example(s) with no trainable token left: "
                        f"{few(p.dropped_masked)}")
        if p.numbers_as_text:
            log.warning(f"{name}: {len(p.numbers_as_text)} number(s) where text is expected, used as text: "
                        f"{few(p.numbers_as_text)}")
        if p.control_text:
            log.warning(f"{name}: {len(p.control_text)} example(s) hold control-token text of the chat format "
                        "(such as '<|eot_id|>') in a message: trained as plain text, not as control tokens. Remove it "
                        f"if it is not meant to be there: {few(p.control_text)}")
    asked = cfg.train.sample_prompts
    if data.eval is not None and asked > len(data.eval.dataset) and cfg.train.eval_strategy != "no":
        log.warning(f"train.sample_prompts={asked}, but the eval split holds {len(data.eval.dataset)} example(s): "
                    f"each evaluation answers at most {len(data.eval.dataset)}.")
    return data


def _splits_eval(cfg: Config, held_out: bool = False) -> bool:
    """Evaluation rows are split off the training rows: no eval file or split is given, a ratio is, and the run
    evaluates (or, with `held_out`, scores a held-out set once at the end)."""
    d = cfg.data
    return not (d.eval_path or d.eval_split) and d.eval_ratio > 0 and (held_out or cfg.train.eval_strategy != "no")


def train_and_eval_rows(cfg: Config, held_out: bool = False):
    """One dataset's training rows (at most data.max_examples) and eval rows (None without): an eval file or
    split, else data.eval_ratio of the rows split off when the run evaluates or, with `held_out`, whenever the
    ratio is set (a held-out set scored once at the end)."""
    d = cfg.data
    rows = load_rows(d.path, d.split, d.subset, d.revision)
    if d.eval_path or d.eval_split:
        eval_rows = load_rows(d.eval_path or d.path, d.eval_split or "train", d.subset, d.revision)
    elif _splits_eval(cfg, held_out):
        rows, eval_rows = split_eval(rows, d.eval_ratio, cfg.train.seed, d.path)
    else:
        eval_rows = None
    if d.max_examples:
        rows = rows.select(range(min(d.max_examples, len(rows))))
    return rows, eval_rows


def _one_dataset(cfg: Config, tokenizer, common: dict) -> TrainingData:
    d = cfg.data
    rows, eval_rows = train_and_eval_rows(cfg)
    common = dict(common, fmt=d.format, fields=d.fields)
    return TrainingData(
        train=prepare(rows, tokenizer, source=d.path, **common),
        eval=prepare(eval_rows, tokenizer, source=d.eval_path or f"{d.path} (eval)", **common) if eval_rows else None)


PrepareSource = Callable[["Dataset", str, Optional["DataSource"], str], Prepared]
"""(rows, the source's name in messages, its entry of data.path (None: the data section's own settings), the key
its column map is named by) -> the rows prepared for the method: SFT's tokenized examples, or preference pairs."""


def mixture(cfg: Config, prepare_source: PrepareSource, held_out: bool = False) -> TrainingData:
    """Each source of data.path read, split and prepared with its own format and column map, then mixed by its
    share. Its eval rows are held out before mixing, so that no repeated example is also an eval example; with
    `held_out`, data.eval_ratio splits them even when the run does not evaluate. Every source's problems at once."""
    d, seed = cfg.data, cfg.train.seed
    split_off = _splits_eval(cfg, held_out)
    names, trains, evals, problems = [], [], [], []
    for i, s in enumerate(d.sources):
        name = f"data.path[{i}] {s.path}"
        rows, eval_rows = load_rows(s.path, s.split, s.subset, s.revision), None
        if d.eval_split and not d.eval_path:
            eval_rows = load_rows(s.path, d.eval_split, s.subset, s.revision)
        elif split_off:
            rows, eval_rows = split_eval(rows, d.eval_ratio, seed, name)
        try:
            train = prepare_source(rows, name, s, f"data.path[{i}].fields")
            held = prepare_source(eval_rows, f"{name} (eval)", s, f"data.path[{i}].fields") \
                if eval_rows is not None else None
        except DataError as e:
            problems.append(str(e))
            continue
        names.append(name)
        trains.append(train)
        evals.append(held)
    if problems:
        raise DataError("\n".join(problems))
    counts = mixture_counts([len(p.dataset) for p in trains], mixture_shares(d.sources), d.max_examples)
    for name, n in zip(names, counts):
        if n == 0:
            log.warning(f"{name}: its share of the mixture's {sum(counts):,} training examples rounds to 0, so none "
                        "of its examples is trained on. Raise its weight or fraction (or data.max_examples), or leave "
                        "it out of data.path.")
    if d.eval_path:
        eval_rows = load_rows(d.eval_path, d.eval_split or "train", d.subset, d.revision)
        eval_data = prepare_source(eval_rows, d.eval_path, None, "data.fields")
    else:
        held = [p for p in evals if p is not None]
        eval_data = _mix(held, [len(p.dataset) for p in held], seed) if held else None
    shares = [Share(name, len(p.dataset), n, len(e.dataset) if e else 0)
              for name, p, n, e in zip(names, trains, counts, evals)]
    return TrainingData(train=_mix(trains, counts, seed), eval=eval_data, mixture=shares)


def mixture_shares(sources: list[DataSource]) -> Optional[list[float]]:
    """Each source's share of the mixture from its fraction or weight (1 where it sets neither); None where no
    source sets one: then each source is taken whole."""
    if all(s.weight is None and s.fraction is None for s in sources):
        return None
    given = [s.fraction if s.fraction is not None else s.weight if s.weight is not None else 1.0 for s in sources]
    return [g / sum(given) for g in given]


def mixture_counts(sizes: list[int], shares: Optional[list[float]], cap: Optional[int] = None) -> list[int]:
    """Examples each source gives: the sources' total (at most `cap`) split by `shares` (by size where None),
    in whole examples by largest remainder."""
    total = sum(sizes)
    if shares is None and (cap is None or cap >= total):
        return list(sizes)
    target = min(total, cap or total)
    exact = [target * share for share in shares or [n / total for n in sizes]]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:target - sum(counts)]:
        counts[i] += 1
    return counts


def _mix(parts: list[Prepared], counts: list[int], seed: int) -> Prepared:
    """counts[i] examples of parts[i] (whole passes over it, then a sample drawn with `seed`), shuffled together
    with `seed`."""
    import datasets
    import numpy as np
    picks = []
    for i, (p, n) in enumerate(zip(parts, counts)):
        passes, rest = divmod(n, len(p.dataset))
        sample = np.random.default_rng([seed, i]).permutation(len(p.dataset))[:rest]
        picks.append(list(range(len(p.dataset))) * passes + sorted(sample.tolist()))
    mixed = datasets.concatenate_datasets([p.dataset.select(idx) for p, idx in zip(parts, picks)])
    mixed = mixed.shuffle(seed=seed)
    chosen = json.dumps([seed, [[p.fingerprint, idx] for p, idx in zip(parts, picks)]])
    if "tokens" in mixed.column_names:  # preference pairs: what each costs (kit.data.preference), all of it trained
        lengths = list(mixed["tokens"])
        trained = sum(lengths)
    else:
        lengths = [len(ids) for ids in mixed["input_ids"]]
        trained = sum(sum(1 for x in labels if x != -100) for labels in mixed["labels"])
    return Prepared(
        dataset=mixed, fingerprint=hashlib.sha256(chosen.encode()).hexdigest()[:16],
        truncated=sum(p.truncated for p in parts), dropped_overlong=[w for p in parts for w in p.dropped_overlong],
        dropped_masked=[w for p in parts for w in p.dropped_masked],
        control_text=[w for p in parts for w in p.control_text],
        numbers_as_text=[w for p in parts for w in p.numbers_as_text], mean_tokens=sum(lengths) / len(lengths),
        trained_tokens=trained)


def mixture_table(shares: list[Share]) -> str:
    """The plan's lines about a mixture: what each source gives."""
    total = sum(s.used for s in shares)
    lines = [f"data mixture            {total:,} training examples from {len(shares)} sources"]
    for s in shares:
        part = (f"its {s.examples:,} repeated {s.used / s.examples:.3g}x" if s.used > s.examples
                else f"of its {s.examples:,}")
        held = f"; {s.eval_examples:,} held out for eval" if s.eval_examples else ""
        lines.append(f"  {s.source}: {s.used:,} ({s.used / total:.1%}), {part}{held}")
    return "\n".join(lines)
