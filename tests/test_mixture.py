"""Dataset mixtures: data.path as a list of sources, each read with its own format and column map, shared by
weight or fraction with the run's seed; the plan's per-source counts; every problem of the list reported."""
import csv
import json
from collections import Counter

import pytest

from kit.config.load import load_config, to_yaml
from kit.config.schema import describe
from kit.core.errors import ConfigError, DataError
from kit.data.load import Share, load_data, mixture_counts
from kit.models.template import render
from tests.helpers import run_recipe

NO_EVAL = ["data.eval_ratio=0", "train.eval_strategy=no", "model.max_seq_length=128"]


@pytest.fixture
def sources(tmp_path):
    """Three sources, none of them in a format the kit detects by itself: a.jsonl (question/answer, 40 rows),
    b.csv (ask/reply, 10 rows), c.jsonl (q/a, 20 rows)."""
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"질문 A{i}", "answer": f"답 A{i}"}, ensure_ascii=False) + "\n"
                     for i in range(40))
    with open(tmp_path / "b.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ask", "reply"]] + [[f"질문 B{i}", f"답 B{i}"] for i in range(10)])
    with open(tmp_path / "c.jsonl", "w") as f:
        f.writelines(json.dumps({"q": f"질문 C{i}", "a": f"답 C{i}"}, ensure_ascii=False) + "\n" for i in range(20))
    return tmp_path


A = "{path: %s/a.jsonl, fields: {instruction: question, output: answer}%s}"
B = "{path: %s/b.csv, format: prompt_completion, fields: {prompt: ask, completion: reply}%s}"


def _mixture(d, a="", b="", *more):
    """data.path=[a.jsonl, b.csv] with each source's own column map; a and b: extra keys such as ', weight: 3'."""
    return [f"data.path=[{A % (d, a)}, {B % (d, b)}]", *more]


def _pairs(tokenizer, dataset) -> list[tuple[str, str]]:
    """(the whole example's text, its trained text) of each tokenized example."""
    return [(tokenizer.decode(ids), tokenizer.decode([t for t in labels if t != -100]))
            for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def _conversation(tokenizer, q: str, a: str) -> str:
    return render(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


def test_each_source_is_rendered_with_its_own_format_and_column_map(sources, tokenizer):
    # c.jsonl is a plain entry: it takes the data section's column map
    cfg = load_config(None, [f"data.path=[{A % (sources, '')}, {B % (sources, '')}, {sources}/c.jsonl]",
                             "data.fields={instruction: q, output: a}", "data.eval_ratio=0.1",
                             "model.max_seq_length=128"])
    data = load_data(cfg, tokenizer)
    assert data.mixture == [Share(f"data.path[0] {sources}/a.jsonl", 36, 36, 4),
                            Share(f"data.path[1] {sources}/b.csv", 9, 9, 1),
                            Share(f"data.path[2] {sources}/c.jsonl", 18, 18, 2)]
    assert len(data.train.dataset) == 63 and len(data.eval.dataset) == 7
    expected = {_conversation(tokenizer, f"질문 {s}{i}", f"답 {s}{i}"): f"답 {s}{i}<|eot_id|>" for s, n in
                (("A", 40), ("B", 10), ("C", 20)) for i in range(n)}
    for split in (data.train, data.eval):
        for text, trained in _pairs(tokenizer, split.dataset):
            assert expected[text] == trained  # the question is the user's turn, the answer alone is trained
    texts = [text for split in (data.train, data.eval) for text, _ in _pairs(tokenizer, split.dataset)]
    assert sorted(texts) == sorted(expected)  # every row once, train or eval, none in both


def test_weights_share_the_mixture_and_repeat_a_small_source_with_the_seed(sources, tokenizer):
    cfg = load_config(None, _mixture(sources, ", weight: 3", "", *NO_EVAL))  # b.csv weighs 1
    data = load_data(cfg, tokenizer)
    # 50 examples in all: 37.5 and 12.5, rounded to 38 and 12; b.csv's 10 rows are all used, 2 of them twice
    assert [(s.examples, s.used) for s in data.mixture] == [(40, 38), (10, 12)]
    sources_of = Counter(text.split("user<|end_header_id|>\n\n질문 ")[1][0] for text, _ in
                         _pairs(tokenizer, data.train.dataset))
    assert sources_of == {"A": 38, "B": 12}
    b_rows = Counter(text for text, _ in _pairs(tokenizer, data.train.dataset) if "질문 B" in text)
    assert len(b_rows) == 10 and sorted(b_rows.values()) == [1] * 8 + [2] * 2
    a_rows = {text for text, _ in _pairs(tokenizer, data.train.dataset) if "질문 A" in text}
    assert len(a_rows) == 38  # subsampled: no row twice

    again = load_data(load_config(None, _mixture(sources, ", weight: 3", "", *NO_EVAL)), tokenizer)
    assert again.train.dataset["input_ids"] == data.train.dataset["input_ids"]
    assert again.train.fingerprint == data.train.fingerprint
    other = load_data(load_config(None, _mixture(sources, ", weight: 3", "", *NO_EVAL, "train.seed=7")), tokenizer)
    assert [s.used for s in other.mixture] == [38, 12]
    assert other.train.dataset["input_ids"] != data.train.dataset["input_ids"]
    assert other.train.fingerprint != data.train.fingerprint


def test_fractions_and_max_examples(sources, tokenizer):
    cfg = load_config(None, _mixture(sources, ", fraction: 0.5", ", fraction: 0.5", *NO_EVAL))
    assert [s.used for s in load_data(cfg, tokenizer).mixture] == [25, 25]  # b.csv: two passes and 5 rows
    cfg = load_config(None, _mixture(sources, ", fraction: 0.8", ", fraction: 0.2", *NO_EVAL,
                                     "data.max_examples=10"))
    data = load_data(cfg, tokenizer)
    assert [s.used for s in data.mixture] == [8, 2] and len(data.train.dataset) == 10
    cfg = load_config(None, _mixture(sources, "", "", *NO_EVAL, "data.max_examples=10"))  # no weights: by size
    assert [s.used for s in load_data(cfg, tokenizer).mixture] == [8, 2]


@pytest.mark.parametrize("sizes, shares, cap, counts", [
    ([40, 10], None, None, [40, 10]),
    ([40, 10], [0.75, 0.25], None, [38, 12]),
    ([3, 3, 3], [1 / 3] * 3, 8, [3, 3, 2]),
    ([3, 3, 3], [1 / 3] * 3, 10, [3, 3, 3]),  # the cap is more than the sources hold
    ([100, 1], [0.999, 0.001], None, [101, 0]),
])
def test_mixture_counts_add_up_to_the_total(sizes, shares, cap, counts):
    assert mixture_counts(sizes, shares, cap) == counts


def test_a_row_error_names_the_source_and_its_column_map(sources, tokenizer):
    (sources / "b.csv").write_text("ask,reply\n질문,\n")
    cfg = load_config(None, _mixture(sources, "", "", *NO_EVAL))
    with pytest.raises(DataError, match=r"b\.csv, line 2: field 'reply' is missing or empty .*"
                                        r"data\.path\[1\]\.fields\.completion=<column>"):
        load_data(cfg, tokenizer)


def test_plan_shows_what_each_source_gives(sources):
    recipe = sources / "mix.yaml"
    recipe.write_text(f"""model: {{name: "random:tiny", load_in_4bit: false, max_seq_length: 128}}
train: {{eval_strategy: epoch, per_device_train_batch_size: 4, gradient_accumulation_steps: 1}}
data:
  eval_ratio: 0.1
  path:
    - {A % (sources, ", weight: 3")}
    - {B % (sources, "")}
""")
    out = run_recipe(["--config", str(recipe), "--plan"], cwd=sources, timeout=300).stdout
    assert "plan for runs/llama31_sft (a mixture of 2 sources):" in out
    assert "  training examples       45\n" in out and "  eval examples           5\n" in out
    assert "data mixture            45 training examples from 2 sources" in out
    assert f"  data.path[0] {sources}/a.jsonl: 34 (75.6%), of its 36; 4 held out for eval" in out
    assert f"  data.path[1] {sources}/b.csv: 11 (24.4%), its 9 repeated 1.22x; 1 held out for eval" in out


def test_every_problem_of_the_list_is_reported_with_its_key_and_line(tmp_path):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("""data:
  path:
    - kit:ko_sample
    - path: a.jsonl
      wieght: 2
      format: jsonl
    - path: b.csv
      weight: -1
      fields: {instrucion: q}
    - {path: c.csv, fraction: 0.3}
    - [1, 2]
    - {weight: 1}
""")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    problems = e.value.problems
    expected = [
        (5, "unknown key 'data.path[1].wieght'. Did you mean 'data.path[1].weight'"),
        (6, "data.path[1].format: 'jsonl' is not one of auto, koalpaca, alpaca"),
        (11, "data.path[4]: expected a mapping of path, weight, fraction"),
        (3, "data.path[0] sets no fraction, but another source does"),
        (4, "data.path[1] sets no fraction, but another source does"),
        (8, "data.path[2].weight=-1: must be > 0"),
        (8, "data.path[2] sets a weight, but another source sets a fraction"),
        (9, "data.path[2].fields: unknown field ['instrucion']; map these kit fields to your columns: "
            "['instruction', 'input', 'output', 'messages', 'prompt', 'completion', 'text', 'system']. "
            "Did you mean 'instruction'?"),
        (12, "data.path[5] has no path"),
        (12, "data.path[5] sets a weight, but another source sets a fraction"),
    ]
    assert len(problems) == len(expected), problems
    for line, text in expected:
        assert any(p.startswith(f"{recipe}, line {line}: {text}") for p in problems), (line, text, problems)


@pytest.mark.parametrize("override, problem", [
    ("data.path=[]", "data.path is an empty list"),
    ("data.path=[a.jsonl, {path: b.csv, fraction: 0.5}, {path: c.csv, fraction: 0.2}]",
     "data.path[0] sets no fraction, but another source does"),
    ("data.path=[{path: a.jsonl, fraction: 0.5}, {path: b.csv, fraction: 0.2}]",
     "data.path: the fractions add up to 0.7, not 1"),
    ("data.path=[{path: a.jsonl, fraction: 1.5}, {path: b.csv, fraction: 0, weight: 2}]",
     "data.path[0].fraction=1.5: use 0 < fraction <= 1"),
    ("data.path=[{path: a.jsonl, fraction: 1.5}, {path: b.csv, fraction: 0.5, weight: 2}]",
     "data.path[1] sets both weight and fraction: keep one"),
    ("data.path=[a.jsonl, {path: b.csv, weight: .nan}]", "data.path[1].weight: nan is not a finite number"),
])
def test_overrides_name_the_entry(override, problem):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert any(p.startswith(f"override '{override}': {problem}") for p in e.value.problems), e.value.problems


def test_one_path_stays_as_it_was_and_a_mixture_round_trips_through_config_yaml(sources, tmp_path):
    cfg = load_config(None, ["data.path=./my.jsonl", "data.fields={instruction: q}", "data.split=all"])
    assert cfg.data.path == "./my.jsonl" and not cfg.data.mixture
    assert [(s.path, s.fields, s.split, s.format) for s in cfg.data.sources] == [("./my.jsonl", {"instruction": "q"},
                                                                               "all", "auto")]
    cfg = load_config(None, _mixture(sources, ", weight: 3", ", split: test"))
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert again.data.sources == cfg.data.sources
    assert [(s.weight, s.format, s.split) for s in again.data.sources] == [(3.0, "auto", "train"),
                                                                           (None, "prompt_completion", "test")]


def test_help_config_lists_a_sources_settings():
    text = describe()
    entry = text[text.index("  path[i], an entry of a mixture"):text.index("\nrun:")]
    for key in ("path", "weight", "fraction", "format", "fields", "subset", "split", "revision"):
        assert f"\n    {key} = " in entry
