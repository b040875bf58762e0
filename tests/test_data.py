import json

import pytest

from kit.core.errors import DataError
from kit.data.load import detect_format, load_data, prepare, to_messages, tokenize
from kit.data.rows import load_rows
from kit.models.template import layout, render

EOT, SH, EH, BOT = 128009, 128006, 128007, 128000


def _prep(path, tokenizer, **kw):
    args = dict(fmt="auto", fields={}, system_prompt=None, max_len=256, responses_only=True, overlong="truncate",
                source=str(path))
    args.update(kw)
    return prepare(load_rows(str(path)), tokenizer, **args)


def test_template_matches_llama31_format_and_jinja(tokenizer):
    msgs = [{"role": "system", "content": "친절하게 답하세요."}, {"role": "user", "content": "안녕?"},
            {"role": "assistant", "content": "안녕하세요!"}]
    text, spans = layout(tokenizer, msgs, "<|eot_id|>")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n친절하게 답하세요.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n안녕?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n안녕하세요!<|eot_id|>")
    assert text[spans[0][0]:spans[0][1]] == "안녕하세요!<|eot_id|>"
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == text
    gen = tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen == render(tokenizer, msgs[:2], add_generation_prompt=True)


def test_labels_mask_everything_but_assistant_turns_exact_positions(tokenizer):
    msgs = [{"role": "user", "content": "1 더하기 1은?"}, {"role": "assistant", "content": "2입니다."},
            {"role": "user", "content": "고마워"}, {"role": "assistant", "content": "천만에요."}]
    ex = tokenize(msgs, tokenizer, max_len=512, responses_only=True)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == tokenizer(render(tokenizer, msgs), add_special_tokens=False)["input_ids"]
    assert ids[0] == BOT
    answers = [tokenizer.encode("2입니다.", add_special_tokens=False),
               tokenizer.encode("천만에요.", add_special_tokens=False)]
    # expected trained positions: each assistant answer's tokens plus its <|eot_id|>
    expected = set()
    assistant_header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    i = 0
    for ans in answers:
        while ids[i:i + len(assistant_header)] != assistant_header:
            i += 1
        start = i + len(assistant_header)
        assert ids[start:start + len(ans)] == ans
        assert ids[start + len(ans)] == EOT
        expected |= set(range(start, start + len(ans) + 1))
        i = start
    trained = {i for i, label in enumerate(labels) if label != -100}
    assert trained == expected
    assert all(labels[i] == ids[i] for i in trained)
    # the final token is the assistant's <|eot_id|>, and it is trained
    assert ids[-1] == EOT and labels[-1] == EOT


def test_train_on_everything_when_asked(tokenizer):
    msgs = [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "대답"}]
    ex = tokenize(msgs, tokenizer, 512, responses_only=False)
    assert ex["labels"][0] == -100 and ex["labels"][1:] == ex["input_ids"][1:]


@pytest.mark.parametrize("rows, fmt", [
    ([{"instruction": "수도는?", "output": "서울", "url": "x"}], "alpaca"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "messages"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}], "messages"),
    ([{"prompt": "a", "completion": "b"}], "prompt_completion"),
    ([{"text": "가나다"}], "text"),
])
def test_formats_are_detected_and_converted(tmp_path, tokenizer, rows, fmt):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    ds = load_rows(str(f))
    assert detect_format(ds.column_names, {}) == fmt
    p = _prep(f, tokenizer)
    assert len(p.dataset) == 1 and any(label != -100 for label in p.dataset[0]["labels"])


def test_alpaca_input_field_system_prompt_and_field_mapping():
    row = {"question": "번역해 주세요", "ctx": "사과", "answer": "apple"}
    msgs = to_messages(row, "alpaca", {"instruction": "question", "input": "ctx", "output": "answer"},
                       "너는 번역가야.", "f, row 1")
    assert msgs == [{"role": "system", "content": "너는 번역가야."},
                    {"role": "user", "content": "번역해 주세요\n\n사과"},
                    {"role": "assistant", "content": "apple"}]


def test_csv_and_parquet_and_folder(tmp_path, tokenizer):
    import pandas as pd
    df = pd.DataFrame({"instruction": ["a", "b"], "output": ["c", "d"]})
    df.to_csv(tmp_path / "x.csv", index=False)
    (tmp_path / "pq").mkdir()
    df.to_parquet(tmp_path / "pq" / "1.parquet")
    df.to_parquet(tmp_path / "pq" / "2.parquet")
    assert len(_prep(tmp_path / "x.csv", tokenizer).dataset) == 2
    assert len(_prep(tmp_path / "pq", tokenizer).dataset) == 4


def test_row_missing_field_names_file_and_row(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: field 'output' is missing or empty"):
        _prep(f, tokenizer)


@pytest.mark.parametrize("content, expected", [
    ("", "empty"),
    ('{"instruction": "a", "output": "b"\n', "line 1: not valid JSON"),
])
def test_empty_and_unreadable_files(tmp_path, tokenizer, content, expected):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=expected):
        _prep(f, tokenizer)


def test_missing_file_and_unknown_columns(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "a", "a": "b"}\n')
    with pytest.raises(DataError, match="data.fields"):
        _prep(f, tokenizer)


def test_hub_id_without_network_says_so_and_suggests_local(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not reach the Hugging Face Hub.*local file"):
        load_rows("beomi/KoAlpaca-v1.1a")


def test_overlong_examples_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    rows = [{"instruction": "짧은 질문", "output": "짧은 답"}, {"instruction": "q", "output": "긴 답 " * 200}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    t = _prep(f, tokenizer, max_len=64)
    assert t.truncated == 1 and len(t.dataset) == 2 and max(len(x) for x in t.dataset["input_ids"]) == 64
    d = _prep(f, tokenizer, max_len=64, overlong="drop")
    assert d.dropped_overlong == [f"{f}, line 2"] and len(d.dataset) == 1


def test_every_label_masked_is_an_error_naming_rows(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": "아주 긴 질문 " * 100, "output": "답"}) for _ in range(3)))
    with pytest.raises(DataError, match=r"d\.jsonl, line 1; .*d\.jsonl, line 2; .*d\.jsonl, line 3\)"):
        _prep(f, tokenizer, max_len=64)


def test_sample_dataset_ships_a_few_hundred_korean_pairs(tokenizer):
    ds = load_rows("kit:ko_sample")
    assert 200 <= len(ds) <= 500
    assert detect_format(ds.column_names, {}) == "alpaca"
    p = prepare(ds, tokenizer, fmt="koalpaca", fields={}, system_prompt=None, max_len=256, responses_only=True,
                overlong="truncate", source="kit:ko_sample")
    assert p.truncated == 0 and not p.dropped_masked and len(p.fingerprint) == 16


def test_eval_from_a_separate_file_or_a_held_out_ratio(tmp_path, tokenizer):
    from kit.config.load import load_config
    rows = [{"instruction": f"질문 {i}", "output": f"답 {i}"} for i in range(20)]
    train_f, eval_f = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    eval_f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:3]))
    cfg = load_config(None, [f"data.path={train_f}", f"data.eval_path={eval_f}", "model.max_seq_length=128"])
    data = load_data(cfg, tokenizer)
    assert len(data.train.dataset) == 20 and len(data.eval.dataset) == 3
    cfg = load_config(None, [f"data.path={train_f}", "data.eval_ratio=0.25", "model.max_seq_length=128"])
    data = load_data(cfg, tokenizer)
    assert len(data.train.dataset) == 15 and len(data.eval.dataset) == 5
    cfg = load_config(None, [f"data.path={train_f}", "data.eval_ratio=0", "train.eval_strategy=no"])
    assert load_data(cfg, tokenizer).eval is None
