"""Data as small pure steps: load -> format -> chat template -> tokenize/mask -> (pack, by TRL).

Every row becomes a list of chat messages; every message list becomes input_ids and labels in
Llama 3.1's format, with -100 on everything but the assistant's answers (and their <|eot_id|>).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kit import env
from kit.errors import DataError
from kit.template import render

if TYPE_CHECKING:  # kit.config imports this module (data.fields are checked against FIELD_NAMES)
    from datasets import Dataset

    from kit.config import Config

log = logging.getLogger("kit")
FIELD_NAMES = ["instruction", "input", "output", "messages", "prompt", "completion", "text", "system"]
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SAMPLE = "kit:ko_sample"
SAMPLE_FILE = Path(__file__).parent / "data" / "ko_sample.jsonl"


# ---------------------------------------------------------------- load

def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return path == SAMPLE or p.exists() or path.startswith((".", "/", "~")) or p.suffix in LOCAL_SUFFIXES


def load_rows(path: str, split: str = "train", subset: Optional[str] = None, revision: Optional[str] = None):
    """A datasets.Dataset from the kit's sample, a local file/folder, or the Hugging Face Hub."""
    import datasets
    if path == SAMPLE:
        path = str(SAMPLE_FILE)
    if is_local(path):
        files = _local_files(Path(path).expanduser())
        builder = LOCAL_SUFFIXES[files[0].suffix]
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # pyarrow/json errors carry the useful detail
            raise DataError(f"{path}: could not be read as {builder}: {_first_line(e)}. "
                            "Check the file is valid (one JSON object per line for .jsonl).") from None
    else:
        ds = _load_hub(path, split, subset, revision)
    if len(ds) == 0:
        raise DataError(f"{path}: the dataset is empty; it needs at least one example.")
    return ds


def _local_files(p: Path) -> list[Path]:
    if not p.exists():
        raise DataError(f"{p}: no such file or folder. Give data.path as a .json/.jsonl/.csv/.parquet file, "
                        "a folder of them, or a Hub dataset id like beomi/KoAlpaca-v1.1a.")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"{p}: no .json/.jsonl/.csv/.parquet files in this folder.")
    if any(f.suffix not in LOCAL_SUFFIXES for f in files):
        raise DataError(f"{p}: unsupported file type '{p.suffix}'; use .json, .jsonl, .csv or .parquet.")
    kinds = {LOCAL_SUFFIXES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise DataError(f"{p}: mixes file types {sorted(kinds)}; keep one type per folder.")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{p}: the dataset is empty; it needs at least one example.")
    return files


def split_eval(rows, ratio: float, seed: int, source: str):
    """Hold out round(len * ratio) rows (at least one) for evaluation, reproducibly."""
    n_eval = max(1, round(len(rows) * ratio))
    if n_eval >= len(rows):
        raise DataError(f"{source}: {len(rows)} example(s) cannot spare an eval split of {ratio:.0%}; "
                        "add data, lower data.eval_ratio, or give data.eval_path.")
    split = rows.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"]


def _load_hub(path, split, subset, revision):
    import datasets
    try:
        return datasets.load_dataset(path, subset, split=split, revision=revision, token=env.hf_token())
    except Exception as e:
        msg = str(e)
        offline = any(s in msg for s in ("offline", "Couldn't reach", "ConnectionError", "Failed to resolve",
                                         "Max retries", "Network is unreachable", "couldn't be found on the Hugging"))
        if offline or env.hub_offline():
            raise DataError(f"data.path='{path}': could not reach the Hugging Face Hub to download this dataset "
                            "(no network, or HF_HUB_OFFLINE=1). Download it where there is network, or point "
                            "data.path at a local file, e.g. data.path=./my.jsonl (or kit:ko_sample).") from None
        raise DataError(f"data.path='{path}': loading from the Hub failed: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---------------------------------------------------------------- format

def detect_format(columns: list[str], fields: dict[str, str]) -> str:
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
    raise DataError(f"cannot tell the data format from the columns {sorted(have)}. Expected instruction/output "
                    "(KoAlpaca, Alpaca), messages (chat), prompt/completion or text; map yours with "
                    "data.fields, e.g. data.fields='{instruction: question, output: answer}'.")


def to_messages(row: dict, fmt: str, fields: dict[str, str], system_prompt: Optional[str], where: str) -> list[dict]:
    """One row -> chat messages. `where` ('file, row N') goes into every error."""
    def get(name, required=True):
        col = fields.get(name, name)
        value = row.get(col)
        if required and (value is None or (isinstance(value, str) and not value.strip())):
            raise DataError(f"{where}: field '{col}' is missing or empty (format {fmt}). Fix the row, or map "
                            f"the column with data.fields.{name}=<column>.")
        return value
    if fmt in ("koalpaca", "alpaca"):
        extra = get("input", required=False)
        prompt = get("instruction") + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(get("output"))}]
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": str(get("prompt"))},
                {"role": "assistant", "content": str(get("completion"))}]
    elif fmt == "text":
        msgs = [{"role": "assistant", "content": str(get("text"))}]
    else:
        msgs = _chat_messages(row.get(fields.get("messages", "messages")) or row.get("conversations"), where)
    system = row.get(fields.get("system", "system"))
    if msgs[0]["role"] != "system" and (system or system_prompt):
        msgs.insert(0, {"role": "system", "content": str(system or system_prompt)})
    return msgs


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _chat_messages(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns.")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: turn {i} is not an object.")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role not in _SHAREGPT_ROLES or not isinstance(content, str):
            raise DataError(f"{where}: turn {i} needs role (system/user/assistant, or ShareGPT from "
                            f"human/gpt) and text content; got role={role!r}.")
        msgs.append({"role": _SHAREGPT_ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn.")
    return msgs


# ---------------------------------------------------------------- tokenize / mask

def tokenize(messages: list[dict], tokenizer, max_len: int, responses_only: bool) -> dict:
    """input_ids and labels; labels are -100 outside assistant answers when responses_only.
    `overlong` is the untruncated length when it exceeded max_len (else 0)."""
    text, spans = render(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if responses_only:
        labels = [t if any(s <= a and b <= e for s, e in spans) else -100
                  for t, (a, b) in zip(ids, enc["offset_mapping"])]
    else:
        labels = list(ids)
        labels[0] = -100  # nothing predicts <|begin_of_text|>
    overlong = len(ids) if len(ids) > max_len else 0
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "overlong": overlong}


@dataclass
class Prepared:
    """Tokenized examples plus what the user should hear about them."""
    dataset: Dataset
    fingerprint: str
    truncated: int = 0
    dropped_overlong: list[int] = field(default_factory=list)
    dropped_masked: list[int] = field(default_factory=list)
    mean_tokens: float = 0.0
    trained_tokens: int = 0


def prepare(ds, tokenizer, *, fmt: str, fields: dict, system_prompt, max_len: int, responses_only: bool,
            overlong: str, source: str) -> Prepared:
    """Rows -> tokenized dataset (input_ids, labels). Rows are numbered from 1 in messages, as in an editor."""
    import datasets
    fmt = detect_format(ds.column_names, fields) if fmt == "auto" else fmt
    if fmt in ("koalpaca", "alpaca") and fields.get("instruction", "instruction") not in ds.column_names:
        raise DataError(f"{source}: format {fmt} needs an instruction column; columns are {ds.column_names}.")
    h = hashlib.sha256()
    out, truncated, dropped_long, dropped_masked = [], 0, [], []
    for i, row in enumerate(ds):
        where = f"{source}, row {i + 1}"
        msgs = to_messages(row, fmt, fields, system_prompt, where)
        h.update(json.dumps(msgs, ensure_ascii=False, sort_keys=True).encode())
        ex = tokenize(msgs, tokenizer, max_len, responses_only)
        if ex.pop("overlong"):
            if overlong == "drop":
                dropped_long.append(i + 1)
                continue
            truncated += 1
        if all(x == -100 for x in ex["labels"]):
            dropped_masked.append(i + 1)
            continue
        out.append(ex)
    if not out:
        rows = (dropped_masked + dropped_long)[:10]
        raise DataError(f"{source}: every example would have all its labels masked or was dropped (rows "
                        f"{rows}{' ...' if len(dropped_masked + dropped_long) > 10 else ''}): no assistant "
                        "answer survives within model.max_seq_length. Raise max_seq_length, shorten the "
                        "prompts, or set data.overlong=truncate.")
    n_tokens = sum(len(e["input_ids"]) for e in out)
    trained = sum(sum(1 for x in e["labels"] if x != -100) for e in out)
    return Prepared(dataset=datasets.Dataset.from_list(out), fingerprint=h.hexdigest()[:16], truncated=truncated,
                    dropped_overlong=dropped_long, dropped_masked=dropped_masked,
                    mean_tokens=n_tokens / len(out), trained_tokens=trained)


# ---------------------------------------------------------------- a recipe's data

@dataclass
class TrainingData:
    """The train split and the eval split (None without evaluation), tokenized and masked."""
    train: Prepared
    eval: Optional[Prepared]


def load_data(cfg: Config, tokenizer) -> TrainingData:
    """Train and eval examples as the config asks; logs what was truncated or dropped."""
    d = cfg.data
    rows = load_rows(d.path, d.split, d.subset, d.revision)
    if d.eval_path or d.eval_split:
        eval_rows = load_rows(d.eval_path or d.path, d.eval_split or "train", d.subset, d.revision)
    elif d.eval_ratio > 0 and cfg.train.eval_strategy != "no":
        rows, eval_rows = split_eval(rows, d.eval_ratio, cfg.train.seed, d.path)
    else:
        eval_rows = None
    if d.max_examples:
        rows = rows.select(range(min(d.max_examples, len(rows))))
    common = dict(fmt=d.format, fields=d.fields, system_prompt=d.system_prompt, max_len=cfg.model.max_seq_length,
                  responses_only=d.train_on_responses_only, overlong=d.overlong)
    data = TrainingData(
        train=prepare(rows, tokenizer, source=d.path, **common),
        eval=prepare(eval_rows, tokenizer, source=d.eval_path or f"{d.path} (eval)", **common) if eval_rows else None)
    for name, p in (("train", data.train), ("eval", data.eval)):
        if p is None:
            continue
        if p.truncated:
            log.warning(f"{name}: {p.truncated} example(s) longer than max_seq_length={cfg.model.max_seq_length} "
                        "were truncated (data.overlong=drop drops them instead).")
        if p.dropped_overlong:
            log.warning(f"{name}: dropped {len(p.dropped_overlong)} over-long example(s), "
                        f"rows {p.dropped_overlong[:10]}")
        if p.dropped_masked:
            log.warning(f"{name}: dropped {len(p.dropped_masked)} example(s) with no trainable token left, "
                        f"rows {p.dropped_masked[:10]}")
    return data
