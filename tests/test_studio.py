"""kit studio: its page driven in a real headless browser (Debian's chromium, through Playwright's Python client;
nothing is downloaded), one tiny CPU run started from the page and followed to its exports; and what studio
refuses: a taken port, a runs folder that is a file, a half-written run, paths outside the runs folder.

The browser test writes a screenshot of each page to docs/studio/<page>.png (the README shows them)."""
import http.client
import json
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from kit import cli
from kit.studio import server
from tests.helpers import DEMO, ROOT, free_port

CHROMIUM = "/usr/bin/chromium"  # `make setup` installs Debian's chromium (and its driver) when it is missing
# a closed network: without these chromium waits on its update and sync services
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "docs" / "studio"
RUN = "studio-tiny"
# the demo recipe cut to 6 steps, an evaluation (with its sample answers) every 3, the largest learning rate the
# config allows: the fine-tune's answers then differ from the random base's
EDITS = {"run.name": RUN, "train.max_steps": "6", "train.eval_strategy": "steps", "train.eval_steps": "3",
         "train.logging_steps": "1", "train.save_strategy": "no", "train.learning_rate": "0.01"}
INVALID = "train.learning_rate=5"


@pytest.fixture
def studio(tmp_path):
    """A studio on a free loopback port over an empty runs folder, in this process; its base URL."""
    httpd = server.make_server(tmp_path / "runs", "127.0.0.1", free_port(), None)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "runs"
    httpd.shutdown()
    httpd.server_close()


def _cli_error(*overrides: str) -> str:
    """What the training command prints for a configuration it refuses."""
    res = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", "--config", DEMO, "--plan", *overrides],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    return res.stderr.strip()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


@pytest.mark.slow
def test_the_page_plans_starts_watches_compares_and_exports_a_run(studio):
    from playwright.sync_api import expect, sync_playwright
    url, runs = studio
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"{url}/#runs")
        expect(page.locator("#page-runs h1")).to_be_visible()
        assert page.locator("#runs-table tbody tr").count() == 0

        # plan: a shipped recipe as the start; an edited setting changes the plan, an invalid one shows the CLI's
        # message and stops the start
        page.goto(f"{url}/#plan")
        expect(page.locator("#plan-output")).to_contain_text("total steps")
        expect(page.locator("#command")).to_contain_text("python -m kit.recipes.llama31_sft --config demo --plan")
        before = page.locator("#plan-output").inner_text()
        for key, value in EDITS.items():
            field = page.locator(f"[name='{key}']")
            field.select_option(value) if field.evaluate("e => e.tagName") == "SELECT" else field.fill(value)
        expect(page.locator("#plan-output")).to_contain_text("total steps             6\n")
        assert page.locator("#plan-output").inner_text() != before
        expect(page.locator("#command")).to_contain_text("train.max_steps=6")
        page.locator("[name='train.learning_rate']").fill(INVALID.split("=")[1])
        expect(page.locator("#plan-error")).to_have_text(_cli_error(INVALID))
        expect(page.locator("#start")).to_be_disabled()
        page.locator("[name='train.learning_rate']").fill(EDITS["train.learning_rate"])
        expect(page.locator("#plan-error")).to_be_empty()

        # start: the exact command is shown, the progress follows the run, Watch draws its curves as they grow
        page.locator("#start").click()
        expect(page.locator("#job-log")).to_contain_text("$ python -m kit.recipes.llama31_sft --config demo ")
        command = page.locator("#job-log").inner_text().splitlines()[0]
        assert f" run.name={RUN} " in command and " train.save_strategy=no " in command
        assert command.endswith(f" run.output_dir={runs.resolve()}")
        page.goto(f"{url}/#watch/{RUN}")
        drawn = "n => +(document.querySelector('#loss-chart path.train') || {dataset: {}}).dataset.points > n"
        page.wait_for_function(drawn, arg=0, timeout=180_000)
        first = int(page.locator("#loss-chart path.train").get_attribute("data-points"))
        assert first < 6  # still training: the curve then grows as metrics.jsonl does
        page.wait_for_function(drawn, arg=first, timeout=120_000)
        page.goto(f"{url}/#plan")
        page.wait_for_selector("#job-state[data-state=finished]", state="attached", timeout=300_000)
        expect(page.locator("#job-progress")).to_have_attribute("value", "6")
        _shot(page, "plan")

        # runs: the finished run with its model, steps and best eval loss; its manifest on a click
        page.goto(f"{url}/#runs")
        row = page.locator(f"#runs-table tr[data-run='{RUN}']")
        expect(row.locator(".status")).to_have_text("finished")
        expect(row).to_contain_text("random:tiny")
        expect(row).to_contain_text("6 / 6")
        row.click()
        expect(page.locator("#manifest")).to_contain_text('"best_eval_loss"')
        _shot(page, "runs")

        # watch: the loss curves drawn (6 train points, 2 evaluations), lr and tokens/s, the sample answers
        page.goto(f"{url}/#watch/{RUN}")
        train = page.locator("#loss-chart path.train")
        expect(train).to_have_attribute("data-points", "6")
        assert train.get_attribute("d").count("L") == 5
        expect(page.locator("#loss-chart path.eval")).to_have_attribute("data-points", "2")
        expect(page.locator("#lr-chart path.lr")).to_have_attribute("data-points", "6")
        expect(page.locator("#tps-chart path.tps")).to_have_attribute("data-points", "6")
        assert page.locator("#samples tbody tr").count() == 4  # 2 prompts at each of the 2 evaluations
        _shot(page, "watch")

        # compare: one prompt, the base's and the fine-tune's answers side by side, different
        page.goto(f"{url}/#compare/{RUN}")
        page.locator("#prompt").fill("2 곱하기 16는 얼마인가요?")
        page.locator("#ask").click()
        page.wait_for_selector("#compare-state[data-state=done]", state="attached", timeout=180_000)
        base, tuned = page.locator("#answer-base").inner_text(), page.locator("#answer-fine-tune").inner_text()
        assert base.strip() and tuned.strip() and base != tuned, (base, tuned)
        _shot(page, "compare")

        # export: GGUF with its progress, the resulting path and the Ollama Modelfile
        page.goto(f"{url}/#export/{RUN}")
        page.locator("#export-gguf").click()
        page.wait_for_selector("#export-state[data-state=finished]", state="attached", timeout=300_000)
        gguf = runs.resolve() / RUN / "export" / "gguf-q8_0" / f"{RUN}-q8_0.gguf"
        expect(page.locator("#export-result")).to_contain_text(f"gguf: {gguf}")
        expect(page.locator("#modelfile")).to_contain_text(f"FROM ./{gguf.name}")
        _shot(page, "export")
        browser.close()
    assert gguf.is_file()


def test_a_taken_port_is_named_with_the_fix_and_exit_2(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["studio", "--runs", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: port {port} on 127.0.0.1 is already in use" in err and f"--port {port + 1}" in err
    assert "Traceback" not in err


def test_a_runs_folder_that_cannot_be_read_is_named_and_exit_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    assert cli.main(["studio", "--runs", str(runs), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"error: --runs {runs}: a file, not a folder" in err and "Traceback" not in err


def test_another_host_needs_an_api_key_and_every_request_then_carries_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KIT_API_KEY", raising=False)
    assert cli.main(["studio", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "set an API key in the environment variable KIT_API_KEY" in capsys.readouterr().err
    httpd = server.make_server(tmp_path, "127.0.0.1", free_port(), "s3cret")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert _get(f"{url}/api/runs")[0] == 401
        status, _, headers = _get(f"{url}/?key=s3cret")
        assert status == 200 and "kit_studio_key=s3cret" in headers["Set-Cookie"]
        assert _get(f"{url}/api/runs", {"Cookie": "kit_studio_key=s3cret"})[0] == 200
        assert _get(f"{url}/api/runs", {"Cookie": "kit_studio_key=wrong"})[0] == 401
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_half_written_run_is_shown_damaged_with_what_to_do(studio, capsys):
    url, runs = studio
    (runs / "broken").mkdir()
    (runs / "broken" / "manifest.json").write_text('{"command": "python -m kit.rec')  # cut mid-write
    (runs / "broken" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    listed = json.loads(_get(f"{url}/api/runs")[1])["runs"]
    assert [(r["name"], r["status"]) for r in listed] == [("broken", "damaged")]
    assert "half written" in listed[0]["problem"] and "run.overwrite=true" in listed[0]["problem"]
    detail = json.loads(_get(f"{url}/api/run?name=broken")[1])
    assert detail["metrics"] == [{"step": 1, "loss": 2.5}]  # the line being written waits for its end
    # starting over that folder: one line about it, and studio starts
    httpd = server.make_server(runs, "127.0.0.1", free_port(), None)
    httpd.server_close()
    err = capsys.readouterr().err
    assert "kit studio: broken:" in err and "half written" in err and "Traceback" not in err


def test_each_status_is_read_from_the_run_directory(tmp_path):
    from kit.run.rundir import RunDir, claim
    from kit.studio.kitapi import summary
    training = {"status": "training", "model_name": "random:tiny", "plan": {"total_steps": 6}}
    runs = {"planned": None, "training": training, "failed": training, "resumable": {**training,
                                                                                       "status": "interrupted"},
            "finished": {**training, "result": {"total_steps": 6, "best_eval_loss": 1.5}}}
    for name, manifest in runs.items():
        (tmp_path / name).mkdir()
        if manifest is not None:
            (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "training" / "metrics.jsonl").write_text('{"step": 2, "eval_loss": 2.0}\n')
    (tmp_path / "resumable" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "resumable" / "checkpoints" / "checkpoint-3" / "kit-complete").touch()
    claim(RunDir(tmp_path / "training"))  # as a training process: the run's lock, held (flock: seen by any open)
    seen = {name: summary(RunDir(tmp_path / name)) for name in runs}
    assert {name: s["status"] for name, s in seen.items()} == {name: name for name in runs}
    training = seen["training"]
    assert (training["step"], training["total_steps"], training["best_eval_loss"]) == (2, 6, 2.0)
    assert seen["finished"]["best_eval_loss"] == 1.5 and seen["finished"]["model"] == "random:tiny"


def test_a_path_outside_the_runs_folder_is_refused(studio, tmp_path):
    url, runs = studio
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("{}")
    (runs / "link").symlink_to(outside)
    for name in ["../outside", "..", "/etc", "link", ".studio-logs", "a/../../outside"]:
        status, body, _ = _get(f"{url}/api/run?name={urllib.request.quote(name, safe='')}")
        assert status == 403 and "studio reads only the run folders in its runs folder" in body, name
    status, body, _ = _get(f"{url}/api/recipe?name={urllib.request.quote(str(outside / 'x.yaml'))}")
    assert status == 422 and "not a recipe shipped in the kit" in body
    host, port = url.removeprefix("http://").split(":")
    for path in ["/../../etc/passwd", "/static/../../etc/passwd", "/api/../kit/config.py"]:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)  # sent as written: no client normalizes it away
        response = conn.getresponse()
        assert response.status == 404 and b"root:" not in response.read(), path
        conn.close()
    assert _get(f"{url}/api/export", method="POST", body={"run": "../outside", "to": "merged16"})[0] == 403


def _get(url: str, headers=None, method="GET", body=None) -> tuple[int, str, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)
