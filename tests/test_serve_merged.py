"""vLLM serving the merged 16-bit export (kit serve --merged), on CPU; its own module so that the
adapter server of test_serve.py has stopped before this one starts."""
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from kit.export.exporter import export
from kit.serve import launcher, preflight
from tests.helpers import adapter_reference, question, train_rows

pytestmark = pytest.mark.slow


def test_merged_export_served_by_vllm_gives_the_trained_answer(demo_run):
    """Through the command line, as users run it; SIGTERM (docker stop) stops kit and vLLM cleanly."""
    import openai
    run_dir = demo_run[0]
    if not (run_dir / "export" / "merged16" / "config.json").is_file():
        export(run_dir, "merged16")
    p = preflight.check([run_dir], merged=True)
    assert p.adapters == [] and p.base.endswith("export/merged16")
    assert p.max_model_len == 256  # the run's max_seq_length, as for base + adapter
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(run_dir.parent / "serve-merged.out", "w") as log:
        cli = subprocess.Popen([sys.executable, "-m", "kit.cli", "serve", str(run_dir), "--merged",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        launcher.wait_healthy(cli, url, timeout=600)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        row = train_rows(run_dir)[0]
        r = client.chat.completions.create(model=p.base, messages=[{"role": "user", "content": question(row)}],
                                           temperature=0, max_tokens=48)
        answer = r.choices[0].message.content
        decided = adapter_reference(run_dir, question(row))  # equal up to a near-tie (tests/helpers.py)
        assert decided and row["output"].startswith(decided) and answer.startswith(decided)
        if decided == row["output"]:  # no near-tie: the whole trained answer, stopped at <|eot_id|>
            assert answer == row["output"] and r.choices[0].finish_reason == "stop"
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
        with pytest.raises(OSError):  # vLLM is gone with it
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"api_server.*--port {port}"])  # a vLLM left behind by a failed stop
