"""kit serve on a real model of another chat family than Llama 3.1: the smollm2 recipe's run (SmolLM2-135M-Instruct:
ChatML, tied embeddings, head_dim 64, a 49,152-token vocabulary; trained once per session, tests/conftest.py),
served by vLLM's CPU build through the command line as users run it, as base + adapter and as its merged export,
each checked by kit verify --url against base + adapter. Two vLLM starts (minutes each on CPU), one per form; each
server is stopped as docker stop does when its test ends (kit serve then exits 0), passed or not. Llama 3.1's
adapter: tests/test_serve.py; the merged export in transformers: tests/test_export.py.
First, without a server: the chat format and stop tokens the preflight reads off a run's saved tokenizer."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kit.core.errors import PreflightError
from kit.serve import launcher, preflight
from tests.helpers import free_port, question

START_TIMEOUT = 900  # seconds for vLLM's /health: a CPU start is 2-7 minutes on 2 shared cores
STOP_TIMEOUT = 60 + launcher.STOP_GRACE


# ---------------------------------------------------------------- the preflight, on the small adapter fixture

def _with_template(run: Path, where: Path, template: str) -> Path:
    """A copy of the run whose saved tokenizer carries `template`."""
    shutil.copytree(run, where)
    (where / "adapter" / "chat_template.jinja").write_text(template)
    return where


def test_the_chat_format_is_read_off_the_saved_tokenizers_files(adapter_run, tokenizer, tmp_path):
    """kit serve's preflight reads the run's template, eos and stop ids from its files (no transformers import), as
    kit.models.template.chat_format reads them from the loaded tokenizer."""
    from transformers import AutoTokenizer

    from kit.models.template import chat_format
    assert preflight.folder_chat_format(adapter_run / "adapter") == chat_format(tokenizer)
    custom = _with_template(adapter_run, tmp_path / "custom", "{{- bos_token }}" + tokenizer.chat_template)
    fmt = preflight.folder_chat_format(custom / "adapter")
    assert fmt.family == "custom" and fmt == chat_format(AutoTokenizer.from_pretrained(str(custom / "adapter")))


def test_adapters_of_two_chat_formats_are_not_served_together(adapter_run, tmp_path):
    other = _with_template(adapter_run, tmp_path / "other", "{{- 'x' }}" + (adapter_run / "adapter" /
                                                                            "chat_template.jinja").read_text())
    with pytest.raises(PreflightError, match="different chat formats.*two servers"):
        preflight.check([adapter_run, other])
    assert len(preflight.check([adapter_run, _with_template(adapter_run, tmp_path / "same", (
        adapter_run / "adapter" / "chat_template.jinja").read_text())]).adapters) == 2


def test_a_base_that_lacks_the_runs_stop_tokens_gets_them(adapter_run, tiny_base, tmp_path, capsys):
    """The tiny base stops as its run does (--generation-config auto); a copy whose generation config stops at
    <|end_of_text|> alone is served with the run's three stops added, its other settings kept."""
    assert preflight.check([adapter_run]).generation_config is None
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    gen = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 128001, "temperature": 0.6}))
    spec = preflight.check([adapter_run], base=str(base))
    assert spec.generation_config == {**gen, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6}
    cmd, _ = launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")
    folder = Path(cmd[cmd.index("--generation-config") + 1])
    assert json.loads((folder / "generation_config.json").read_text()) == spec.generation_config
    assert launcher.generation_config_folder(spec.generation_config) == folder  # named by its content: reused


# ---------------------------------------------------------------- the real servers

def _kit(*args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def _serving(run_dir: Path, *options: str):
    """`kit serve RUN_DIR OPTIONS` on a free port until the block ends; yields its URL (without /v1). Stopped as
    docker stop does (SIGTERM: kit serve stops vLLM's process group); if kit serve outlives that, it is killed and
    kit.serve.guard ends vLLM's group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(run_dir.parent / f"kit-serve-{port}.out", "w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "kit.cli", "serve", str(run_dir), "--port", str(port), *options],
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            launcher.wait_healthy(cli, url, START_TIMEOUT)
        except (ChildProcessError, TimeoutError) as e:
            raise AssertionError(f"kit serve {' '.join(options)}: {e}\n{Path(out.name).read_text()[-3000:]}") from None
        yield url
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGTERM)
            try:
                cli.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(cli.pid, signal.SIGKILL)  # kit serve's own group; its guard then ends vLLM's
                cli.wait(timeout=10)
        deadline = time.time() + STOP_TIMEOUT
        while _answers(url) and time.time() < deadline:
            time.sleep(1)
    assert not _answers(url), f"vLLM still answers at {url} after kit serve ended"
    assert cli.returncode == 0, f"kit serve {' '.join(options)} ended with {cli.returncode} on SIGTERM (docker stop)"


def _verify(run_dir: Path, url: str, model: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """kit verify RUN --url URL/v1 --model MODEL (its built-in prompts), and its table's rows by target."""
    out = _kit("verify", run_dir, "--url", url + "/v1", "--model", model)
    print(out.stdout)  # the table, in the test's output
    rows = {row[0]: row for row in (re.split(r"\s{2,}", line.strip()) for line in out.stdout.splitlines()) if row[0]}
    return out, rows


def _server_rows_ok(rows: dict[str, list[str]], out) -> list[str]:
    server = [t for t in rows if t.startswith("server:")]
    assert server, out.stdout + out.stderr[-5000:]
    for target in server:
        assert rows[target][-1] == "ok", (target, out.stdout)
    return server


def _held_out_answer(url: str, model: str, run_dir: Path, held_out: str):
    """The server's greedy answer to a held-out question, with its token ids and the prompt ids it rendered."""
    import openai
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": held_out}], temperature=0,
                                       max_tokens=200, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    trained = tok.apply_chat_template([{"role": "user", "content": held_out}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    assert r.prompt_token_ids == trained  # the run's ChatML template, rendered by vLLM
    assert tok.decode(trained[:2]) == "<|im_start|>user"
    assert choice.finish_reason == "stop" and choice.message.content.strip()
    assert choice.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>"), tok.decode(choice.token_ids)
    return choice


@pytest.fixture(scope="module")
def run(smollm2_run, tmp_path_factory):
    """A copy of the session's smollm2 run (the session's stays as trained), without exports yet."""
    run_dir = tmp_path_factory.mktemp("smollm2-serve") / "smollm2"
    shutil.copytree(smollm2_run[0], run_dir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "export"))
    return run_dir


@pytest.fixture(scope="module")
def held_out(run):
    """A question of the run's eval split, as the recipe split it."""
    from kit.config.load import load_config
    from kit.data.rows import load_rows, split_eval
    cfg = load_config(run / "config.yaml")
    _, rows = split_eval(load_rows(cfg.data.path), cfg.data.eval_ratio, cfg.train.seed, cfg.data.path)
    return question(rows[0])


@pytest.fixture(scope="module")
def other_template(run):
    """A copy of the run whose saved tokenizer carries another chat template (ChatML with a system turn always)."""
    other = run.parent / "smollm2-system"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("export", "*.log", "*.out"))
    jinja = other / "adapter" / "chat_template.jinja"
    jinja.write_text("{{- '<|im_start|>system\\nAnswer briefly.<|im_end|>\\n' }}" + jinja.read_text())
    return other


@pytest.mark.slow
def test_base_and_adapter_served_verified_and_stopping_at_im_end(run, held_out, other_template):
    """kit serve RUN: base + adapter with the adapter's tokenizer (its ChatML template) and the run's stop tokens:
    SmolLM2's own generation config stops at <|im_end|> only, the run's format at <|endoftext|> too."""
    spec = preflight.check([run], adapter_form=True)
    assert spec.tokenizer == str(run / "adapter") and spec.max_lora_rank == 16
    assert spec.generation_config["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>
    line = _kit("serve", run, "--dry-run").stdout
    folder = Path(line.split("--generation-config ")[1].split()[0])
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    with pytest.raises(PreflightError, match="different chat formats"):  # one server renders one template
        preflight.check([run, other_template])

    with _serving(run, "--allow-runtime-adapters") as url:
        out, rows = _verify(run, url, "smollm2")
        assert out.returncode == 0, out.stdout + out.stderr[-5000:]
        assert _server_rows_ok(rows, out) == ["server:smollm2", "server:smollm2 vs base"]
        assert "merged16" not in rows  # not exported yet: the table is the server's alone
        _held_out_answer(url, "smollm2", run, held_out)
        # at run time too: an adapter of the same template loads, one of another is refused before vLLM reads it
        loaded = _kit("adapters", "load", url + "/v1", run, "--name", "again")
        assert loaded.returncode == 0, loaded.stderr
        refused = _kit("adapters", "load", url + "/v1", other_template, "--name", "system")
        assert refused.returncode == 2 and "another chat template" in refused.stderr, refused.stderr
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            assert {m["id"] for m in json.load(r)["data"]} == {spec.base, "smollm2", "again"}


@pytest.mark.slow
def test_merged_export_served_and_verified(run, held_out):
    """kit export RUN --to merged16, then kit serve RUN --merged: the export's own generation config (the run's
    stops) and tokenizer. kit verify's merged16 row holds the export to 0.5 on max |Δlogit|, which rounding
    SmolLM2's weights to bf16 can pass by a little (tests/test_export_real.py): that row alone may then disagree."""
    exported = _kit("export", run, "--to", "merged16")
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-5000:]
    merged = run / "export" / "merged16"
    spec = preflight.check([run], merged=True)
    assert spec.base == spec.tokenizer == str(merged) and spec.generation_config is None  # its own stops at both
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [2, 0]

    # vLLM's own options after `--`, as users pass them: eager, skipping the 1.5 minutes its CPU build spends
    # compiling the merged model (the base + adapter server runs eager already)
    with _serving(run, "--merged", "--", "--enforce-eager") as url:
        out, rows = _verify(run, url, str(merged))
        assert _server_rows_ok(rows, out) == [f"server:{merged}"]
        failing = [t for t, row in rows.items() if row[-1] == "DISAGREES"]
        assert out.returncode == (1 if failing else 0), out.stdout + out.stderr[-5000:]
        if failing:
            _, agree, _, diff, stops, *_ = rows["merged16"]
            assert failing == ["merged16"] and float(agree.rstrip("%")) >= 80 and stops == "yes", out.stdout
            assert float(diff) < 1.0, out.stdout
        _held_out_answer(url, str(merged), run, held_out)
