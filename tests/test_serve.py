"""The real vLLM server (CPU build, .venv-serve) with the demo's adapter, through the OpenAI client."""
import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import train_rows
from kit import serve
from kit.data import to_messages

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_run):
    run_dir = demo_run[0]
    p = serve.plan([run_dir])
    srv = serve.start(p, port=_free_port(), log=run_dir.parent / "serve-test.log", timeout=600)
    try:
        yield srv, p
    finally:
        srv.stop()  # by its PID (process group), also when a test failed
        assert srv.proc.poll() is not None


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="none")


def _answer(client, model, question):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=48)
    return r.choices[0]


def test_models_lists_base_and_adapter(client, server):
    ids = {m.id for m in client.models.list().data}
    assert ids == {server[1].base, "demo"}


def test_adapter_gives_trained_answer_and_base_differs(client, server, demo_run):
    row = train_rows(demo_run[0])[0]
    question = to_messages(row, "alpaca", {}, None, "row")[0]["content"]
    tuned = _answer(client, "demo", question)
    assert tuned.message.content == row["output"]
    assert tuned.finish_reason == "stop"  # stopped at <|eot_id|>
    base = _answer(client, server[1].base, question)
    assert base.message.content != row["output"]


def test_sixteen_concurrent_requests_succeed(client, demo_run):
    rows = train_rows(demo_run[0]).select(range(16))
    questions = [to_messages(r, "alpaca", {}, None, "row")[0]["content"] for r in rows]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda q: _answer(client, "demo", q), questions))
    assert len(answers) == 16 and all(a.finish_reason in ("stop", "length") and a.message.content for a in answers)


def test_unknown_model_404_malformed_400_and_still_serving(client, server):
    import openai
    with pytest.raises(openai.NotFoundError):
        _answer(client, "no-such-adapter", "안녕")
    req = urllib.request.Request(server[0].url + "/v1/chat/completions", data=b'{"model": "demo", "messages": ',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    with urllib.request.urlopen(server[0].url + "/health", timeout=10) as r:
        assert r.status == 200
    assert _answer(client, "demo", "안녕").message.content is not None


def test_chat_cli_streams_and_names_the_model(server, demo_run):
    row = train_rows(demo_run[0])[0]
    question = to_messages(row, "alpaca", {}, None, "row")[0]["content"]
    out = subprocess.run([sys.executable, "-m", "kit.cli", "chat", "--url", server[0].url + "/v1", "--model", "demo",
                          "--prompt", question], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[demo] {row['output']}"


# ---------------------------------------------------------------- preflight, no server started

@pytest.fixture
def bad_adapter(demo_run, tmp_path):
    """A copy of the demo run whose adapter_config the test edits."""
    run = tmp_path / "bad"
    shutil.copytree(demo_run[0] / "adapter", run / "adapter")
    shutil.copy(demo_run[0] / "config.yaml", run / "config.yaml")
    cfg_file = run / "adapter" / "adapter_config.json"

    def edit(**changes):
        cfg = json.loads(cfg_file.read_text())
        cfg.update(changes)
        cfg_file.write_text(json.dumps(cfg))
        return run
    return edit


@pytest.mark.parametrize("changes, expected", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "trains biases"),
    ({"modules_to_save": ["lm_head"]}, "fully trained modules"),
    ({"target_modules": ["q_proj", "lm_head"]}, "does not support"),
    ({"r": 600}, "exceeds vLLM's largest"),
])
def test_preflight_refuses_unservable_adapters(bad_adapter, changes, expected):
    with pytest.raises(serve.PreflightError, match=expected) as e:
        serve.plan([bad_adapter(**changes)])
    if expected != "exceeds vLLM's largest":
        assert "--merged" in str(e.value)


def test_preflight_picks_smallest_allowed_rank(bad_adapter):
    assert serve.plan([bad_adapter(r=12)]).max_lora_rank == 16
    assert serve.plan([bad_adapter(r=300)]).max_lora_rank == 320


def test_preflight_refuses_adapter_for_another_base_shape(bad_adapter, tmp_path):
    from kit.tiny import llama31_config
    other = tmp_path / "other-base"
    other.mkdir()
    cfg = llama31_config("tiny").to_dict()
    cfg["hidden_size"] = 512
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(serve.PreflightError, match="trained for a different model"):
        serve.plan([bad_adapter()], base=str(other))


def test_bnb_4bit_base_is_served_on_16bit_base(bad_adapter, demo_run):
    base = demo_run[0] / "base-model"
    alias = Path(str(base) + "-bnb-4bit")
    alias.symlink_to(base)
    try:
        p = serve.plan([bad_adapter(base_model_name_or_path=str(alias))])
    finally:
        alias.unlink()
    assert p.base == str(base) and any("16-bit base" in n for n in p.notes)


def test_preflight_max_model_len(bad_adapter):
    run = bad_adapter()
    assert serve.plan([run]).max_model_len == 256  # the run's max_seq_length
    assert any("below the runs' max_seq_length" in n for n in serve.plan([run], max_model_len=128).notes)
    with pytest.raises(serve.PreflightError, match="max_position_embeddings"):
        serve.plan([run], max_model_len=10**6)


def test_non_loopback_needs_api_key_which_never_reaches_argv(bad_adapter, monkeypatch):
    p = serve.plan([bad_adapter()])
    monkeypatch.delenv("KIT_API_KEY", raising=False)
    with pytest.raises(serve.PreflightError, match="API key"):
        serve.command(p, "0.0.0.0", 8000, "KIT_API_KEY")
    monkeypatch.setenv("KIT_API_KEY", "s3cret-token")
    cmd, env = serve.command(p, "0.0.0.0", 8000, "KIT_API_KEY")
    assert "s3cret-token" not in " ".join(cmd) and env["VLLM_API_KEY"] == "s3cret-token"
    assert "--trust-remote-code" not in cmd
    default_cmd, _ = serve.command(p, "127.0.0.1", 8000, "KIT_API_KEY")
    assert default_cmd[default_cmd.index("--host") + 1] == "127.0.0.1"


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(serve.PreflightError, match="no adapter"):
        serve.plan([tmp_path])


def test_verify_compares_the_server_with_base_plus_adapter(server, demo_run):
    from kit.verify import verify
    rows = train_rows(demo_run[0]).select(range(2))
    prompts = [to_messages(r, "alpaca", {}, None, "row")[0]["content"] for r in rows]
    results = verify(demo_run[0], server[0].url + "/v1", "demo", prompts)
    srv = [r for r in results if r.target == "server:demo"][0]
    assert srv.agreement == 1.0 and srv.stopped and srv.passed
