"""vLLM serving the merged 16-bit export (kit serve --merged), on CPU; its own module so that the
adapter server of test_serve.py has stopped before this one starts."""
import socket

import pytest

from conftest import train_rows
from kit import serve
from kit.data import to_messages
from kit.export import export

pytestmark = pytest.mark.slow


def test_merged_export_served_by_vllm_gives_the_trained_answer(demo_run):
    import openai
    run_dir = demo_run[0]
    if not (run_dir / "export" / "merged16" / "config.json").is_file():
        export(run_dir, "merged16")
    p = serve.plan([run_dir], merged=True)
    assert p.adapters == [] and p.base.endswith("export/merged16")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = serve.start(p, port=port, log=run_dir.parent / "serve-merged.log", timeout=600)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        row = train_rows(run_dir)[0]
        question = to_messages(row, "alpaca", {}, None, "row")[0]["content"]
        r = client.chat.completions.create(model=p.base, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=48)
        assert r.choices[0].message.content == row["output"] and r.choices[0].finish_reason == "stop"
    finally:
        srv.stop()
    assert srv.proc.poll() is not None


def test_merged_without_export_is_refused(tmp_path):
    with pytest.raises(serve.PreflightError, match="no merged export"):
        serve.plan([tmp_path], merged=True)
