"""Rows from where a recipe points: a local .json/.jsonl/.csv/.parquet file or folder, a Hub dataset, or a set
shipped in the kit (kit:ko_sample, kit:ko_pairs). Every row keeps where it came from (WHERE: file and line, or
row), so that a problem in it is named there; the eval split is cut here.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kit.core import env
from kit.core.errors import DataError

if TYPE_CHECKING:

    pass

log = logging.getLogger("kit")

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SAMPLE = "kit:ko_sample"
SAMPLE_FILE = Path(__file__).parent / "ko_sample.jsonl"
PAIRS = "kit:ko_pairs"  # the Korean preference pairs made from the sample set (kit/data/make_pairs.py)
PAIRS_FILE = Path(__file__).parent / "ko_pairs.jsonl"
SHIPPED = {SAMPLE: SAMPLE_FILE, PAIRS: PAIRS_FILE}
WHERE = "__kit_where__"  # a column of every loaded dataset: the row's file and line (or row)


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
        raise DataError(f"{where}: a row must be a JSON object {{...}}, got {kind(value)}.")
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


def kind(value: Any) -> str:
    """What a value read from a row is, in words (for the messages)."""
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


