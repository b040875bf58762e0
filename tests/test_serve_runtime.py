"""The real vLLM server (CPU build) started as users start it, `kit serve RUN --allow-runtime-adapters`:
adapters loaded and unloaded while it serves (kit adapters), refused when they fail the preflight;
kit verify telling an adapter that changes the answers from one that changes nothing; and vLLM's whole
process tree ending with kit serve when kit serve is killed with SIGKILL (the module's last test)."""
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kit.cli import main
from kit.serve import launcher
from tests.helpers import adapter_reference, free_port, question, train_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(demo_run, tmp_path_factory):
    """(the kit serve process, its /v1 URL)."""
    port = free_port()
    out = tmp_path_factory.mktemp("runtime") / "kit-serve.out"
    with open(out, "w") as log:
        kit = subprocess.Popen([sys.executable, "-m", "kit.cli", "serve", str(demo_run[0]), "--allow-runtime-adapters",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            launcher.wait_healthy(kit, f"http://127.0.0.1:{port}", 600)
        except (TimeoutError, ChildProcessError) as e:
            pytest.fail(f"kit serve {e}:\n{out.read_text()[-3000:]}")
        yield kit, f"http://127.0.0.1:{port}/v1"
    finally:
        if kit.poll() is None:
            kit.send_signal(signal.SIGTERM)
            kit.wait(120)


@pytest.fixture(scope="module")
def variants(demo_run, tmp_path_factory):
    """Copies of the demo's adapter: as trained, corrupt, DoRA, of a rank above the server's --max-lora-rank
    (by its config), and with every lora_B zero (changes nothing)."""
    from safetensors.torch import load_file, save_file
    root = tmp_path_factory.mktemp("variants")
    for name in ("hot", "corrupt", "dora", "rank512", "zero"):
        shutil.copytree(demo_run[0] / "adapter", root / name / "adapter")
    weights = root / "corrupt" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for name, change in (("dora", {"use_dora": True}), ("rank512", {"r": 512})):
        cfg = root / name / "adapter" / "adapter_config.json"
        cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), **change)))
    weights = root / "zero" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.zero_() if ".lora_B." in k else v for k, v in tensors.items()}, weights, {"format": "pt"})
    return root


def _models(url) -> dict:
    with urllib.request.urlopen(url + "/models", timeout=30) as r:
        return {m["id"]: m.get("parent") for m in json.load(r)["data"]}


def _answer(url, model, text):
    import openai
    r = openai.OpenAI(base_url=url, api_key="none").chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=48)
    return r.choices[0].message.content


def test_adapter_loaded_at_run_time_answers_as_trained_and_unloads(server, demo_run, variants, capsys):
    import openai
    url = server[1]
    base = next(m for m, parent in _models(url).items() if parent is None)
    assert main(["adapters", "load", url, str(variants / "hot"), "--name", "hot"]) == 0
    assert "kit chat --url" in capsys.readouterr().out
    assert _models(url)["hot"] == base
    row = train_rows(demo_run[0])[1]
    answer, decided = _answer(url, "hot", question(row)), adapter_reference(demo_run[0], question(row))  # "hot": a copy
    assert decided and row["output"].startswith(decided) and answer.startswith(decided)  # equal up to a near-tie
    assert answer == row["output"] or decided != row["output"]
    assert main(["adapters", "unload", url, "hot"]) == 0
    assert "hot" not in _models(url) and "demo" in _models(url)
    with pytest.raises(openai.NotFoundError):
        _answer(url, "hot", question(row))
    capsys.readouterr()
    assert main(["adapters", "unload", url, "hot"]) == 2
    assert "serves no adapter named hot; its adapters: demo" in capsys.readouterr().err


@pytest.mark.parametrize("variant, expected", [("corrupt", "the file is corrupt"), ("dora", "DoRA")])
def test_adapter_failing_the_preflight_is_refused(server, variants, capsys, variant, expected):
    url = server[1]
    assert main(["adapters", "load", url, str(variants / variant)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert variant not in _models(url)


def test_a_rank_above_the_servers_is_explained(server, demo_run, variants, capsys):
    from kit.run.rundir import read_adapter
    from kit.serve.preflight import lora_rank
    url, served = server[1], lora_rank(read_adapter(demo_run[0]).rank)
    assert main(["adapters", "load", url, str(variants / "rank512")]) == 2
    err = capsys.readouterr().err
    assert f"greater than max_lora_rank {served}" in err and "restart kit serve with --max-lora-rank 512" in err
    assert "rank512" not in _models(url)


def test_verify_shows_the_served_adapter_changes_the_answers(server, demo_run):
    from kit.eval.verify import THRESHOLDS, verify
    prompts = [question(r) for r in train_rows(demo_run[0]).select(range(2))]
    results = {r.target: r for r in verify(demo_run[0], server[1], "demo", prompts)}
    # kit verify's own bars (a near-tie may flip under bf16), not exact agreement
    srv = results["server:demo"]
    assert srv.passed and (srv.agreement >= THRESHOLDS["server"][0] or srv.near_ties)
    effect = results["server:demo vs base"]
    assert effect.passed and effect.agreement >= THRESHOLDS["adapter effect"][0] and effect.problem is None


def test_verify_reports_an_adapter_that_changes_nothing(server, demo_run, variants):
    from kit.eval.verify import table, verify
    url = server[1]
    assert main(["adapters", "load", url, str(variants / "zero")]) == 0
    prompts = [question(r) for r in train_rows(demo_run[0]).select(range(2))]
    results = verify(variants / "zero", url, "zero", prompts)
    effect = next(r for r in results if r.target == "server:zero vs base")
    assert not effect.passed and "changes none of these answers" in effect.problem and "lora_B" in effect.problem
    assert "server:zero vs base: the adapter changes none" in table(results)


def _session(sid: int) -> list[int]:
    """The live processes of session `sid` (vLLM's API server leads its own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def test_sigkill_of_kit_serve_ends_the_whole_vllm_tree(server):
    """Last in this module: it ends the server."""
    kit, url = server
    children = Path(f"/proc/{kit.pid}/task/{kit.pid}/children").read_text().split()
    vllm = next(int(c) for c in children if b"vllm.entrypoints" in Path(f"/proc/{c}/cmdline").read_bytes())
    assert len(_session(vllm)) >= 2  # the API server and its engine core (and worker)
    kit.send_signal(signal.SIGKILL)
    kit.wait()
    deadline = time.monotonic() + 90
    while _session(vllm) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session(vllm) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5)
