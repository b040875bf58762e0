"""The real vLLM server (CPU build, .venv-serve) with the demo's adapter, through the OpenAI client.
The preflight alone, on a small adapter fixture: tests/test_preflight.py."""
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kit.serve import launcher, preflight
from tests.helpers import adapter_reference, free_port, question, train_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(demo_run):
    run_dir = demo_run[0]
    p = preflight.check([run_dir])
    srv = launcher.start(p, port=free_port(), log=run_dir.parent / "serve-test.log", timeout=600)
    try:
        yield srv, p
    finally:
        srv.stop()  # by its PID (process group), also when a test failed
        assert srv.proc.poll() is not None


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="none")


def _answer(client, model, question, return_token_ids=False):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=48,
                                       extra_body={"return_token_ids": True} if return_token_ids else None)
    return r.choices[0]


def test_models_lists_base_and_adapter(client, server):
    ids = {m.id for m in client.models.list().data}
    assert ids == {server[1].base, "demo"}


def test_adapter_gives_trained_answer_and_base_differs(client, server, demo_run):
    row = train_rows(demo_run[0])[0]
    tuned = _answer(client, "demo", question(row))
    decided = adapter_reference(demo_run[0], question(row))  # equal up to a near-tie (tests/helpers.py)
    assert decided and row["output"].startswith(decided) and tuned.message.content.startswith(decided)
    if decided == row["output"]:  # no near-tie: the whole trained answer, stopped at <|eot_id|>
        assert tuned.message.content == row["output"] and tuned.finish_reason == "stop"
    base = _answer(client, server[1].base, question(row))
    assert base.message.content != row["output"]


def _alone(client, question):
    """The server's greedy answer to `question` sent alone: its token ids, how many of them the server decided by
    more than TIE_NATS (tests/helpers.py's near-tie rule, on the server's own top-2 log-probs: batched with other
    requests, it may pick either token at a near-tie) and whether that is the whole answer."""
    from kit.eval.verify import TIE_NATS
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}], temperature=0,
                                       max_tokens=48, logprobs=True, top_logprobs=2,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0]
    margins = [np.subtract(*sorted((t.logprob for t in p.top_logprobs), reverse=True)[:2])
               for p in choice.logprobs.content]
    close = np.flatnonzero(np.array(margins) <= TIE_NATS)
    n = int(close[0]) if close.size else len(choice.token_ids)
    return choice, n, not close.size


def test_sixteen_concurrent_requests_answer_as_each_alone(client, demo_run):
    rows = train_rows(demo_run[0]).select(range(16))
    questions = [question(r) for r in rows]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: _answer(client, "demo", q, return_token_ids=True), questions))
    whole = 0
    for q, got in zip(questions, together):
        alone, n, decided = _alone(client, q)
        assert got.token_ids[:n] == alone.token_ids[:n], q
        if decided:  # no near-tie: the same answer, ended the same way
            assert (got.token_ids, got.finish_reason) == (alone.token_ids, alone.finish_reason), q
            whole += 1
    assert whole, "an answer decided throughout was compared whole"


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
    out = subprocess.run([sys.executable, "-m", "kit.cli", "chat", "--url", server[0].url + "/v1", "--model", "demo",
                          "--prompt", question(row)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    decided = adapter_reference(demo_run[0], question(row))
    assert decided and out.stdout.startswith(f"[demo] {decided}")  # equal up to a near-tie (tests/helpers.py)
    if decided == row["output"]:
        assert out.stdout.strip() == f"[demo] {row['output']}"


def test_verify_compares_the_server_with_base_plus_adapter(server, demo_run):
    from kit.eval.verify import THRESHOLDS, verify
    rows = train_rows(demo_run[0]).select(range(2))
    prompts = [question(r) for r in rows]
    results = verify(demo_run[0], server[0].url + "/v1", "demo", prompts)
    srv = [r for r in results if r.target == "server:demo"][0]
    # kit verify's own bar: agreement at its threshold, or answers that part from the reference at a near-tie
    assert srv.passed and srv.stopped and (srv.agreement >= THRESHOLDS["server"][0] or srv.near_ties)


def test_the_server_says_its_tokens_and_renders_the_trained_template(client, demo_run):
    """What kit verify reads from vLLM: the answer's own token ids and the prompt as the server rendered it."""
    from transformers import AutoTokenizer

    from kit.eval.verify import prompt_ids, served_answer
    from kit.run.rundir import read_adapter
    tok = AutoTokenizer.from_pretrained(str(read_adapter(demo_run[0]).path))
    row = train_rows(demo_run[0])[0]
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question(row)}],
                                       temperature=0, max_tokens=48, extra_body={"return_token_ids": True})
    served = served_answer(r, tok)
    assert served.prompt == prompt_ids(tok, question(row))
    decided = adapter_reference(demo_run[0], question(row))  # equal up to a near-tie (tests/helpers.py)
    assert tok.decode(served.tokens) == r.choices[0].message.content and decided
    assert r.choices[0].message.content.startswith(decided) and row["output"].startswith(decided)
    if served.stopped:  # the stop token is the answer's own, after its tokens
        assert r.choices[0].token_ids[len(served.tokens):] == [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert served.stopped or decided != row["output"], "no near-tie: the trained answer, stopped at <|eot_id|>"


def test_adapters_load_needs_a_server_started_with_runtime_adapters(server, demo_run, capsys):
    from kit.cli import main
    assert main(["adapters", "load", server[0].url + "/v1", str(demo_run[0]), "--name", "again"]) == 2
    err = capsys.readouterr().err
    assert "does not accept runtime adapters" in err and "--allow-runtime-adapters" in err
