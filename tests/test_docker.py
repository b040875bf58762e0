"""The CPU image, proven with podman where no Docker engine runs: inside the container, train the demo,
serve it with vLLM and get the trained answer through `kit chat`. Build the image first with
tests/docker/build.sh (about half an hour); without podman or the image this test is skipped."""
import shutil
import subprocess

import pytest

IMAGE = "localhost/kit:cpu"
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--shm-size", "1g", "--ulimit", "nofile=20000:20000",
       "--ulimit", "nproc=4096:4096"]

pytestmark = pytest.mark.slow


def _image_ready() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed"
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        return f"{IMAGE} is not built; build it with tests/docker/build.sh"
    return None


@pytest.mark.skipif(_image_ready() is not None, reason=str(_image_ready()))
def test_demo_trains_serves_and_answers_inside_the_container():
    script = r"""
set -e
kit train --config demo run.output_dir=/runs > /tmp/train.log 2>&1 || { tail -30 /tmp/train.log; exit 1; }
grep -A14 'training finished' /tmp/train.log
kit serve /runs/demo --port 8000 > /tmp/serve.log 2>&1 &
pid=$!
until python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { tail -40 /tmp/serve.log; exit 1; }
  sleep 1
done
kit chat --url http://127.0.0.1:8000/v1 --model demo --prompt "독일의 수도는 어디인가요?"
python -m kit.serve.health && echo "healthcheck: ok while serving"
kill -TERM $pid && wait $pid && echo "kit serve: stopped cleanly"
"""
    out = subprocess.run([*RUN, "--entrypoint", "bash", IMAGE, "-c", script], capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[demo] 독일의 수도는 베를린입니다." in out.stdout
    assert "healthcheck: ok while serving" in out.stdout and "kit serve: stopped cleanly" in out.stdout
    health = subprocess.run(["podman", "image", "inspect", IMAGE, "--format", "{{json .Config.Healthcheck}}"],
                            capture_output=True, text=True).stdout
    assert "kit.serve.health" in health, health  # kept by the docker-format build (OCI drops HEALTHCHECK)
    labels = subprocess.run(["podman", "image", "inspect", IMAGE, "--format",
                             "{{index .Labels \"org.opencontainers.image.revision\"}}"],
                            capture_output=True, text=True).stdout.strip()
    assert len(labels) == 40
