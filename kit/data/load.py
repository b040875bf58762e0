"""Data as small pure steps: load -> format -> chat template -> tokenize/mask -> (mix sources) -> (pack, by TRL).

Every row becomes a list of chat messages; every message list becomes input_ids and labels in the
tokenizer's chat format (kit.models.template), with -100 on everything but the assistant's answers (and the token
that ends each of them).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kit.core import env
from kit.core.errors import DataError
from kit.models.template import chat_format, content_pieces, layout

if TYPE_CHECKING:
    from datasets import Dataset

    from kit.config.data import DataSource
    from kit.config.schema import Config

log = logging.getLogger("kit")
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SAMPLE = "kit:ko_sample"
SAMPLE_FILE = Path(__file__).parent / "ko_sample.jsonl"
PAIRS = "kit:ko_pairs"  # the Korean preference pairs made from the sample set (kit/data/make_pairs.py)
PAIRS_FILE = Path(__file__).parent / "ko_pairs.jsonl"
SHIPPED = {SAMPLE: SAMPLE_FILE, PAIRS: PAIRS_FILE}
WHERE = "__kit_where__"  # a column of every loaded dataset: the row's file and line (or row)


# ---------------------------------------------------------------- load

def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return path in SHIPPED or p.exists() or path.startswith((".", "/", "~")) or p.suffix in LOCAL_SUFFIXES


def load_rows(path: str, split: str = "train", subset: Optional[str] = None, revision: Optional[str] = None):
    """A datasets.Dataset from the kit's sample, a local file/folder, or the Hugging Face Hub. Each row carries
    where it came from in the column WHERE (file and line as an editor counts them, or row), which the eval
    split and max_examples keep, so that a message about a row points at it."""
    if path in SHIPPED:
        path = str(SHIPPED[path])
    if is_local(path):
        ds = _read_local(Path(path).expanduser(), path)
    else:
        ds = _load_hub(path, split, subset, revision)
        ds = ds.add_column(WHERE, [f"{path}, row {i + 1}" for i in range(len(ds))])
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


def _read_local(p: Path, shown: str):
    """The kit reads local files itself: datasets' builders report a bad file as "An error occurred while
    generating the dataset", without the file, the line or the cause."""
    import datasets
    files = _local_files(p)
    names = [shown if f == p else os.path.join(shown, f.relative_to(p)) for f in files]
    if LOCAL_SUFFIXES[files[0].suffix] == "parquet":
        return datasets.Dataset(_parquet_table(files, names, shown))
    located, columns = [], []
    for f, name in zip(files, names):
        text = _utf8(f, name)
        rows = _csv_rows(text, name) if f.suffix == ".csv" else _json_rows(text, name, f.suffix)
        located += rows
        columns.append((name, list(dict.fromkeys(k for _, row in rows for k in row))))
    _same_columns(columns, shown)
    return _dataset(located)


def _utf8(f: Path, name: str) -> str:
    data = f.read_bytes()
    try:
        return data.decode("utf-8-sig")  # with or without the byte-order mark some Windows editors write
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
    where = f"{name}, line {line}"
    utf8 = Path(name).with_name(f"{Path(name).stem}.utf8{Path(name).suffix}")
    utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
    encoding, label = ("UTF-16", "UTF-16") if utf16 else ("CP949", "CP949 (EUC-KR), as Korean Windows writes")
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text. Save the file as UTF-8.") from None
    raise DataError(f"{where}: not UTF-8 text; the file looks like {label}. Convert it to UTF-8: "
                    f"iconv -f {encoding} -t UTF-8 {name} > {utf8}")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: a key written twice is an error, not the last one silently."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_CHAT_COLUMNS = ("messages", "conversations")


def _decode(text: str, i: int, name: str, line: int, offset: int = 0) -> tuple[Any, int]:
    """One JSON value at text[i]; `line`: where it starts; `offset`: lines of the file before `text`."""
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}, line {e.lineno + offset}: not valid JSON ({e.msg}, column {e.colno}).") from None
    except _DuplicateKey as e:
        raise DataError(f"{name}, line {line}: key '{e}' appears twice in one object; keep one.") from None


def _json_rows(text: str, name: str, suffix: str) -> list[tuple[str, dict]]:
    """(where, row) of a .jsonl file, or of a .json file: a list of rows, one object (a row, or an object
    whose one list of objects holds the rows), or JSON Lines."""
    start = _JSON_SPACE.match(text).end()
    line = text.count("\n", 0, start) + 1
    if suffix == ".json" and text.startswith("[", start):
        return [(where, _row(value, where)) for where, value in _json_list(text, start, name, line)]
    if suffix == ".json" and text.startswith("{", start):
        top, end = _decode(text, start, name, line)
        if _JSON_SPACE.match(text, end).end() == len(text):
            return _wrapped_rows(top, name, line)
    rows = []
    for n, text_line in enumerate(text.split("\n"), 1):  # JSON text has no raw line breaks inside strings
        if text_line.strip():
            where = f"{name}, line {n}"
            value, end = _decode(text_line, 0, name, n, n - 1)
            if text_line[end:].strip():
                raise DataError(f"{where}: more than one JSON value on this line; JSON Lines hold one object "
                                "per line.")
            rows.append((where, _row(value, where)))
    return rows


def _json_list(text: str, i: int, name: str, line: int) -> list[tuple[str, Any]]:
    """The elements of the JSON list at text[i], each with the line it starts on."""
    out, pos = [], i
    i = _JSON_SPACE.match(text, i + 1).end()
    while not text.startswith("]", i):
        line += text.count("\n", pos, i)
        pos = i
        value, i = _decode(text, i, name, line)
        out.append((f"{name}, line {line}", value))
        i = _JSON_SPACE.match(text, i).end()
        if text.startswith(",", i):
            i = _JSON_SPACE.match(text, i + 1).end()
        elif not text.startswith("]", i):
            line += text.count("\n", pos, i)
            raise DataError(f"{name}, line {line}: not valid JSON (expecting ',' or ']' after a row).")
    end = _JSON_SPACE.match(text, i + 1).end()
    if end != len(text):
        line += text.count("\n", pos, end)
        raise DataError(f"{name}, line {line}: more after the list of rows; a .json file holds one list.")
    return out


def _wrapped_rows(top: dict, name: str, line: int) -> list[tuple[str, dict]]:
    """A top-level object: one row, or, where one of its values is a list of objects, those rows (the
    {"data": [...]} layout many published datasets use)."""
    lists = [k for k, v in top.items() if k not in _CHAT_COLUMNS and isinstance(v, list) and v
             and all(isinstance(x, dict) for x in v)]
    if not lists:
        return [(f"{name}, line {line}", top)]
    if len(lists) > 1:
        raise DataError(f"{name}: the top level is an object with several lists of rows ({', '.join(lists)}); "
                        "write the rows as one JSON list, or one object per line (.jsonl).")
    log.warning(f"{name}: the top level is an object; its rows are read from the list under '{lists[0]}'.")
    return [(f"{name}, '{lists[0]}' row {n}", row) for n, row in enumerate(top[lists[0]], 1)]


def _row(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: a row must be a JSON object {{...}}, got {_kind(value)}.")
    return value


def _csv_rows(text: str, name: str) -> list[tuple[str, dict]]:
    """(where, row) of a CSV file with a header; every value is text, as CSV has no types."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        if twice := sorted({c for c in header if header.count(c) > 1}):
            raise DataError(f"{name}, line 1: column {twice[0]!r} appears twice in the header; rename one.")
        rows, start = [], reader.line_num + 1
        for record in reader:
            if record:  # a blank line
                if len(record) != len(header):
                    raise DataError(f"{name}, line {start}: {len(record)} fields, but the header has {len(header)}. "
                                    "Put fields that hold commas or line breaks in double quotes.")
                rows.append((f"{name}, line {start}", dict(zip(header, record))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{name}, line {reader.line_num}: not valid CSV ({e}).") from None
    return rows


def _parquet_table(files: list[Path], names: list[str], shown: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = []
    for f, name in zip(files, names):
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{name}: not a readable Parquet file ({_first_line(e)}). Write it again, or move it "
                            "out of the folder.") from None
        where = pa.array([f"{name}, row {n}" for n in range(1, table.num_rows + 1)], pa.string())
        tables.append(table.append_column(WHERE, where))
    _same_columns([(name, [c for c in t.column_names if c != WHERE]) for name, t in zip(names, tables)], shown)
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as e:
        raise DataError(f"{shown}: its Parquet files give one column different types ({_first_line(e)}); "
                        "write them with the same schema.") from None


def _same_columns(columns: list[tuple[str, list[str]]], shown: str) -> None:
    """The files of a folder are one dataset: the same columns in each (an empty file has none)."""
    named = [(name, cols) for name, cols in columns if cols]
    for name, cols in named[1:]:
        if set(cols) != set(named[0][1]):
            raise DataError(f"{shown}: its files have different columns: {named[0][0]} has {sorted(named[0][1])}, "
                            f"{name} has {sorted(cols)}. Keep one dataset per folder, or point data.path at one "
                            "file.")


def _dataset(located: list[tuple[str, dict]]):
    """A Dataset of the rows, plus WHERE. A column that mixes text and numbers keeps the numbers as text (Arrow
    holds one type per column); any other mix is an error at the first row that breaks the column's type."""
    import datasets
    import pyarrow as pa
    wheres = [where for where, _ in located]
    keys = list(dict.fromkeys(k for _, row in located for k in row))
    columns = {k: [row.get(k) for _, row in located] for k in keys}
    for key, values in columns.items():
        numbers = [i for i, v in enumerate(values) if isinstance(v, (int, float))]
        if numbers and any(isinstance(v, str) for v in values):
            for i in numbers:
                values[i] = json.dumps(values[i])
            log.warning(f"column '{key}' holds text and numbers; {len(numbers)} number(s) are read as text "
                        f"({wheres[numbers[0]]} is one).")
    unfit = (pa.ArrowException, TypeError, ValueError, OverflowError)
    for key, values in columns.items():
        try:
            pa.array(values)
        except unfit as e:
            good, bad = 0, len(values)  # the shortest failing prefix ends at the first row that breaks the type
            while bad - good > 1:
                mid = (good + bad) // 2
                try:
                    pa.array(values[:mid])
                    good = mid
                except unfit:
                    bad = mid
            raise DataError(f"{wheres[bad - 1]}: column '{key}' holds values of different kinds ({_first_line(e)}); "
                            "give it the same kind of value in every row.") from None
    return datasets.Dataset.from_dict({**columns, WHERE: wheres})


def _kind(value: Any) -> str:
    kinds = {str: "text", bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "nothing (null)" if value is None else kinds.get(type(value), type(value).__name__)


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
        raise DataError(f"{where} is {_kind(value)}; it should be text.")
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
    data = _mixture(cfg, tokenizer, common) if d.mixture else _one_dataset(cfg, tokenizer, common)
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


def _splits_eval(cfg: Config) -> bool:
    """Evaluation rows are split off the training rows: no eval file or split is given, a ratio is, and the run
    evaluates."""
    d = cfg.data
    return not (d.eval_path or d.eval_split) and d.eval_ratio > 0 and cfg.train.eval_strategy != "no"


def train_and_eval_rows(cfg: Config, held_out: bool = False):
    """One dataset's training rows (at most data.max_examples) and eval rows (None without): an eval file or
    split, else data.eval_ratio of the rows split off when the run evaluates or, with `held_out`, whenever the
    ratio is set (a held-out set scored once at the end)."""
    d = cfg.data
    rows = load_rows(d.path, d.split, d.subset, d.revision)
    if d.eval_path or d.eval_split:
        eval_rows = load_rows(d.eval_path or d.path, d.eval_split or "train", d.subset, d.revision)
    elif _splits_eval(cfg) or (held_out and d.eval_ratio > 0):
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


def _mixture(cfg: Config, tokenizer, common: dict) -> TrainingData:
    """Each source read, split and tokenized with its own format and column map, then mixed by its share.
    Its eval rows are held out before mixing, so that no repeated example is also an eval example."""
    d, seed = cfg.data, cfg.train.seed
    split_off = _splits_eval(cfg)
    names, trains, evals = [], [], []
    for i, s in enumerate(d.sources):
        name = f"data.path[{i}] {s.path}"
        rows, eval_rows = load_rows(s.path, s.split, s.subset, s.revision), None
        if d.eval_split and not d.eval_path:
            eval_rows = load_rows(s.path, d.eval_split, s.subset, s.revision)
        elif split_off:
            rows, eval_rows = split_eval(rows, d.eval_ratio, seed, name)
        own = dict(common, fmt=s.format, fields=s.fields, fields_key=f"data.path[{i}].fields")
        names.append(name)
        trains.append(prepare(rows, tokenizer, source=name, **own))
        evals.append(prepare(eval_rows, tokenizer, source=f"{name} (eval)", **own) if eval_rows is not None else None)
    counts = mixture_counts([len(p.dataset) for p in trains], mixture_shares(d.sources), d.max_examples)
    for name, n in zip(names, counts):
        if n == 0:
            log.warning(f"{name}: its share of the mixture's {sum(counts):,} training examples rounds to 0, so none "
                        "of its examples is trained on. Raise its weight or fraction (or data.max_examples), or leave "
                        "it out of data.path.")
    if d.eval_path:
        eval_rows = load_rows(d.eval_path, d.eval_split or "train", d.subset, d.revision)
        eval_data = prepare(eval_rows, tokenizer, source=d.eval_path, fmt=d.format, fields=d.fields, **common)
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
    lengths = [len(ids) for ids in mixed["input_ids"]]
    return Prepared(
        dataset=mixed, fingerprint=hashlib.sha256(chosen.encode()).hexdigest()[:16],
        truncated=sum(p.truncated for p in parts), dropped_overlong=[w for p in parts for w in p.dropped_overlong],
        dropped_masked=[w for p in parts for w in p.dropped_masked],
        control_text=[w for p in parts for w in p.control_text],
        numbers_as_text=[w for p in parts for w in p.numbers_as_text], mean_tokens=sum(lengths) / len(lengths),
        trained_tokens=sum(sum(1 for x in labels if x != -100) for labels in mixed["labels"]))


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
