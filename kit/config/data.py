"""The data section: the dataset or mixture, its format and columns, the eval split and the masking."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from kit.config.issue import Issue, closest

# data.fields' keys: the kit's names for the columns of a row
FIELD_NAMES = ["instruction", "input", "output", "messages", "prompt", "completion", "text", "system"]
DataFormat = Literal["auto", "koalpaca", "alpaca", "messages", "prompt_completion", "text"]
SOURCE_DEFAULTS = ("format", "fields", "subset", "split", "revision")  # a source's keys the data section fills in


@dataclass
class DataSource:
    """One source of a mixture, written as a mapping in the list data.path. A key of SOURCE_DEFAULTS that it
    leaves out is the data section's."""

    path: str = ""
    """Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder (as data.path)."""
    weight: Optional[float] = None
    """Relative share of the mixture's examples (weight 2 beside weight 1: twice as many). Once a source sets a
    weight, a source without one weighs 1."""
    fraction: Optional[float] = None
    """Share of the mixture's examples, 0 < fraction <= 1; every source then sets one, adding up to 1."""
    format: Optional[DataFormat] = None
    """Row format of this source; default: data.format."""
    fields: Optional[dict[str, str]] = None
    """Column map of this source; default: data.fields."""
    subset: Optional[str] = None
    """Hub dataset configuration name; default: data.subset."""
    split: Optional[str] = None
    """Split to train on; default: data.split."""
    revision: Optional[str] = None
    """Hub dataset revision; default: data.revision."""

    @classmethod
    def of(cls, entry: Union[str, DataSource]) -> DataSource:
        """An entry of data.path: a bare path is a source with nothing else set."""
        return cls(path=entry) if isinstance(entry, str) else entry


@dataclass
class DataConfig:
    path: Union[str, list[Union[str, DataSource]]] = "beomi/KoAlpaca-v1.1a"
    """Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder. 'kit:ko_sample' is the
    Korean sample set shipped inside the kit. A list mixes several sources, each a path or a mapping
    (data.path[i] below): without weights or fractions the mixture holds every source's examples once;
    with them, as many examples as the sources hold together (data.max_examples at most), shared by weight:
    a source is subsampled or repeated to its share, with train.seed."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on."""
    revision: Optional[str] = None
    """Hub dataset revision."""
    format: DataFormat = "auto"
    """Row format; auto detects it from the columns."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map the kit's field names to your columns, e.g. {instruction: question, output: answer}."""
    eval_ratio: float = 0.05
    """Fraction of the data (of each source of a mixture) held out for evaluation when there is no eval_path."""
    eval_path: Optional[str] = None
    """A separate evaluation source (same kinds as path)."""
    eval_split: Optional[str] = None
    """Split of eval_path (or of path, e.g. 'validation') used for evaluation."""
    system_prompt: Optional[str] = None
    """System message added to every example that has none."""
    train_on_responses_only: bool = True
    """Loss only on assistant turns (their <|eot_id|> included); prompts are masked with -100."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than max_seq_length."""
    max_examples: Optional[int] = None
    """Use only the first N training examples (quick experiments); of a mixture, N in all, shared as above."""

    @property
    def mixture(self) -> bool:
        return isinstance(self.path, list)

    @property
    def sources(self) -> list[DataSource]:
        """data.path as sources, each with the data section's values for the SOURCE_DEFAULTS it leaves out."""
        entries = self.path if isinstance(self.path, list) else [self.path]
        sources = [DataSource.of(e) for e in entries]
        return [dataclasses.replace(s, **{k: getattr(self, k) for k in SOURCE_DEFAULTS if getattr(s, k) is None})
                for s in sources]


# ---------------------------------------------------------------- validation

def issues(d: DataConfig) -> Iterator[Issue]:
    if not 0 <= d.eval_ratio < 1:
        yield Issue("data.eval_ratio", f"data.eval_ratio={d.eval_ratio}: use 0 <= ratio < 1.")
    if d.max_examples is not None and d.max_examples < 1:
        yield Issue("data.max_examples", "data.max_examples must be >= 1.")
    yield from fields_issues("data.fields", d.fields)
    if d.mixture:
        yield from mixture_issues(d.path)
        yield from repeated_sources(d)


def fields_issues(key: str, fields: dict[str, str]) -> Iterator[Issue]:
    if bad := [k for k in fields if k not in FIELD_NAMES]:
        yield Issue(key, f"{key}: unknown field {bad}; map these kit fields to your columns: {FIELD_NAMES}."
                    f"{closest(bad[0], FIELD_NAMES)}")


def mixture_issues(entries: list[Union[str, DataSource]]) -> Iterator[Issue]:
    """data.path as a list: every source has a path, weights > 0, fractions in (0, 1] that add up to 1."""
    if not entries:
        yield Issue("data.path", "data.path is an empty list: give a dataset, or a list of sources to mix.")
    sources = {i: DataSource.of(e) for i, e in enumerate(entries)
               if isinstance(e, (str, DataSource))}  # an unreadable entry is reported already
    fractions = any(s.fraction is not None for s in sources.values())
    for i, s in sources.items():
        key = f"data.path[{i}]"
        if not s.path.strip():
            yield Issue(f"{key}.path", f"{key} has no path: give a Hub dataset id or a local file or folder.")
        if s.weight is not None and s.weight <= 0:
            yield Issue(f"{key}.weight", f"{key}.weight={s.weight:g}: must be > 0 (leave the source out to use none "
                        "of it).")
        if s.fraction is not None and not 0 < s.fraction <= 1:
            yield Issue(f"{key}.fraction", f"{key}.fraction={s.fraction:g}: use 0 < fraction <= 1.")
        if s.weight is not None and s.fraction is not None:
            yield Issue(f"{key}.fraction", f"{key} sets both weight and fraction: keep one.")
        elif s.weight is not None and fractions:
            yield Issue(f"{key}.weight", f"{key} sets a weight, but another source sets a fraction: give every "
                        "source a fraction (adding up to 1), or every source a weight.")
        elif fractions and s.fraction is None:
            yield Issue(key, f"{key} sets no fraction, but another source does: give every source a fraction "
                        "(adding up to 1), or use weights.")
        yield from fields_issues(f"{key}.fields", s.fields or {})
    given = [s.fraction for s in sources.values() if s.fraction is not None]
    if fractions and len(given) == len(sources) and not math.isclose(sum(given), 1, abs_tol=1e-6):
        yield Issue("data.path", f"data.path: the fractions add up to {sum(given):g}, not 1; give each source its "
                    "share of the mixture (or use weights, which are relative).")


def repeated_sources(d: DataConfig) -> Iterator[Issue]:
    """A source listed twice would put each of its examples in the mixture twice, without a word."""
    if not all(isinstance(e, (str, DataSource)) for e in d.path):
        return  # an unreadable entry is reported already
    first: dict[tuple, int] = {}
    for i, s in enumerate(d.sources):
        local = Path(s.path).expanduser()
        where = str(local.resolve()) if s.path.strip() and local.exists() else s.path  # ./a.jsonl is a.jsonl
        same = (where, s.subset, s.split, s.revision, s.format, tuple(sorted((s.fields or {}).items())))
        if same in first:
            yield Issue(f"data.path[{i}]", f"data.path[{i}] is data.path[{first[same]}] again ({s.path}): the mixture "
                        "would hold each of its examples twice. Keep one entry; to give it a larger share, set its "
                        "weight (or fraction).")
        first.setdefault(same, i)
