"""kit studio's web server: one page (static/), JSON under /api/, the runs and exports it starts as subprocesses.
The standard library's threaded HTTP server: no framework, nothing fetched from the network by the page.

Only the runs folder is read: a run is named by its folder's name, resolved and refused unless it lies directly in
the runs folder; a recipe is one shipped in the kit; the page's own files are a fixed list.
"""
from __future__ import annotations

import errno
import hmac
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from kit.studio import kitapi

STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html"), "/studio.js": ("studio.js", "text/javascript"),
         "/studio.css": ("studio.css", "text/css")}
COOKIE = "kit_studio_key"
LOGS = ".studio-logs"  # in the runs folder: each started command's output, kept when studio stops
LOG_TAIL, LOG_BYTES = 40, 64 << 10  # lines of a job's output the page shows, read from its last 64 KiB
MAX_BODY = 1 << 20
COMPARE_TOKENS = 64  # new tokens of each answer Compare shows
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Refused(Exception):
    """A request the studio will not serve: HTTP status and the message shown."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """A command started from the page (a run, an export): its output goes to a file in the runs folder, so that
    a run goes on (and its log stays) when studio stops."""
    id: str
    kind: str
    command: list[str]
    log: Path
    run: str
    proc: subprocess.Popen = field(repr=False)
    started: float = field(default_factory=time.time)

    def state(self) -> dict:
        code = self.proc.poll()
        text = ""
        if self.log.is_file():  # the end of the log: an hour of training writes megabytes of progress bars
            with open(self.log, "rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - LOG_BYTES, 0))
                text = f.read().decode("utf-8", errors="replace")
        # tqdm redraws its bar with carriage returns and cursor moves: the last drawing of each line, plain
        lines = [ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in text.split("\n")]
        return {"id": self.id, "kind": self.kind, "run": self.run, "command": kitapi.command_line(self.command),
                "running": code is None, "returncode": code, "log": "\n".join(lines[-LOG_TAIL:]),
                "seconds": round(time.time() - self.started)}


class Studio:
    """The state behind the page: the runs folder and the jobs started from it."""

    def __init__(self, runs: Path, api_key: Optional[str]):
        self.runs, self.api_key = runs.resolve(), api_key
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def run_dir(self, name: str) -> kitapi.RunDir:
        """The run folder `name`, directly in the runs folder; Refused for anything else (.., a path, a link out)."""
        path = (self.runs / name).resolve()
        if not name or "/" in name or path.parent != self.runs or name.startswith("."):
            raise Refused(HTTPStatus.FORBIDDEN, f"'{name}' is not a run of {self.runs}: studio reads only the run "
                                                "folders in its runs folder.")
        if not path.is_dir():
            raise Refused(HTTPStatus.NOT_FOUND, f"no run '{name}' in {self.runs}.")
        return kitapi.RunDir(path)

    def runs_list(self) -> list[dict]:
        folders = sorted(p for p in self.runs.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [kitapi.summary(kitapi.RunDir(p)) for p in folders]

    def start(self, kind: str, command: list[str], run: str) -> dict:
        with self.lock:
            if any(j.proc.poll() is None for j in self.jobs.values() if j.kind == kind and j.run == run):
                raise Refused(HTTPStatus.CONFLICT, f"a {kind} of {run} is already running; wait for it to end.")
            job_id = f"{kind}-{run}-{len(self.jobs) + 1}"
            log = self.runs / LOGS / f"{job_id}.log"
            log.parent.mkdir(exist_ok=True)
            with open(log, "w", encoding="utf-8") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # in studio's folder, as typed
                                        start_new_session=True)  # Ctrl-C to studio leaves the run training
            self.jobs[job_id] = Job(job_id, kind, command, log, run, proc)
        return self.jobs[job_id].state()

    def job(self, job_id: str) -> dict:
        if job_id not in self.jobs:
            raise Refused(HTTPStatus.NOT_FOUND, f"no job {job_id!r} was started by this studio.")
        return self.jobs[job_id].state()


# ---------------------------------------------------------------- the API: one function per route

def _run_detail(s: Studio, q: dict) -> dict:
    run = s.run_dir(q["name"])
    rows, problem = kitapi.read_growing_metrics(run.metrics)
    return {"summary": kitapi.summary(run), "metrics": rows, "problem": problem, "exports": kitapi.exports(run),
            "evaluation": kitapi.evaluation(run)}


def _overrides(q: dict) -> list[str]:
    overrides = q.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise Refused(HTTPStatus.BAD_REQUEST, "overrides: a list of key=value texts.")
    return overrides


def _examples(q: dict) -> int:
    try:
        n = int(q.get("examples", 1000))
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise Refused(HTTPStatus.BAD_REQUEST, f"examples: '{q.get('examples')}' is not a whole number of 1 or more.")
    return n


def _start_run(s: Studio, q: dict) -> dict:
    cfg = kitapi.config(q["recipe"], _overrides(q))  # refused here, with the CLI's messages, before a process starts
    return s.start("train", kitapi.train_command(q["recipe"], _overrides(q), s.runs), cfg.run.name)


def _export(s: Studio, q: dict) -> dict:
    run = s.run_dir(q["run"])
    if q.get("to") not in kitapi.FORMATS or q.get("quant", "q8_0") not in kitapi.QUANTS:
        raise Refused(HTTPStatus.BAD_REQUEST, f"export to {q.get('to')} {q.get('quant', '')}: use one of "
                                              f"{', '.join(kitapi.FORMATS)}, with a GGUF type of "
                                              f"{', '.join(kitapi.QUANTS)}.")
    return s.start("export", kitapi.export_command(run.path, q["to"], q.get("quant", "q8_0")), run.path.name)


def _compare(s: Studio, q: dict) -> dict:
    run, prompt = s.run_dir(q["run"]), str(q.get("prompt", "")).strip()
    if not prompt:
        raise Refused(HTTPStatus.BAD_REQUEST, "prompt: write a question to ask both models.")
    return {**kitapi.answers(run, prompt, COMPARE_TOKENS), "evaluation": kitapi.evaluation(run)}


GET: dict[str, Callable[[Studio, dict], Any]] = {
    "/api/runs": lambda s, q: {"runs": s.runs_list(), "folder": str(s.runs)},
    "/api/run": _run_detail,
    "/api/schema": lambda s, q: kitapi.schema(),
    "/api/recipe": lambda s, q: {"values": kitapi.recipe_values(q["name"])},
    "/api/job": lambda s, q: s.job(q["id"]),
    "/api/jobs": lambda s, q: {"jobs": [j.state() for j in s.jobs.values()]},
}
POST: dict[str, Callable[[Studio, dict], Any]] = {
    "/api/plan": lambda s, q: kitapi.plan(q["recipe"], _overrides(q), _examples(q)),
    "/api/yaml": lambda s, q: {"yaml": kitapi.yaml_text(q["recipe"], _overrides(q))},
    "/api/import": lambda s, q: {"values": kitapi.imported(str(q.get("yaml", "")))},
    "/api/start": _start_run,
    "/api/export": _export,
    "/api/compare": _compare,
}


class Handler(BaseHTTPRequestHandler):
    studio: Studio  # set on the subclass that make_server() makes
    _cookie: Optional[str] = None  # the key's cookie, once a request showed the key
    server_version = "kit-studio"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the page polls every few seconds: a line per request would bury the messages that matter

    def do_GET(self) -> None:
        self._answer(GET, lambda: {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()})

    def do_POST(self) -> None:
        self._answer(POST, self._body)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large.")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Refused(HTTPStatus.BAD_REQUEST, "the request body is not JSON.") from None
        if not isinstance(body, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, "the request body is not a JSON object.")
        return body

    def _answer(self, routes: dict, query: Callable[[], dict]) -> None:
        url = urlsplit(self.path)
        try:
            self._check_key(url.query)
            if url.path in PAGES and routes is GET:
                name, kind = PAGES[url.path]
                return self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), kind)
            if url.path not in routes:
                raise Refused(HTTPStatus.NOT_FOUND, f"{url.path}: no such page; studio serves its page and /api/.")
            result = routes[url.path](self.studio, query())
            self._json(HTTPStatus.OK, result)
        except Refused as e:
            self._json(e.status, {"error": str(e)})
        except KeyError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"{url.path}: the request lacks {e}."})
        except kitapi.Error as e:
            self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": kitapi.cli_message(e)})
        except Exception as e:  # a fault of studio or of a library: the page shows it, the terminal its traceback
            traceback.print_exc()
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{url.path}: {type(e).__name__}: {e}"})

    def _check_key(self, query: str) -> None:
        """With KIT_API_KEY set, every request carries it: once as ?key= (the page's address), then as a cookie."""
        key = self.studio.api_key
        if key is None:
            return
        given = parse_qs(query).get("key", [None])[-1]
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if given is None and COOKIE in cookie:
            given = cookie[COOKIE].value
        bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if not any(g and hmac.compare_digest(g, key) for g in (given, bearer)):
            raise Refused(HTTPStatus.UNAUTHORIZED, f"this studio needs its key: open it at /?key=... with the value of "
                                                   f"{kitapi.API_KEY_ENV}.")
        self._cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/"

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self._cookie:
            self.send_header("Set-Cookie", self._cookie)
        self.end_headers()
        self.wfile.write(body)


# ---------------------------------------------------------------- the command

class StartError(kitapi.Error):
    """Studio cannot start: the message says what, where and what to do (printed as error: ..., exit 2)."""


def check_runs(runs: Path) -> Path:
    """The runs folder, made if missing; StartError when it is a file or cannot be read."""
    try:
        runs.mkdir(parents=True, exist_ok=True)
        next(iter(os.scandir(runs)), None)
    except FileExistsError:
        raise StartError(f"--runs {runs}: a file, not a folder. Pass the folder that holds your runs (runs/ in "
                         "the kit's checkout).") from None
    except OSError as e:
        raise StartError(f"--runs {runs}: cannot be read ({e.strerror}). Fix its permissions (chmod u+rwx) or pass "
                         "another folder.") from None
    if not os.access(runs, os.R_OK | os.X_OK):
        raise StartError(f"--runs {runs}: cannot be read (permission denied). Fix its permissions (chmod u+rwx) or "
                         "pass another folder.")
    return runs


def make_server(runs: Path, host: str, port: int, api_key: Optional[str]) -> ThreadingHTTPServer:
    if host not in kitapi.LOOPBACK and not api_key:
        raise StartError(f"--host {host} opens studio beyond this machine, and it starts training runs: set an API "
                         f"key in the environment variable {kitapi.API_KEY_ENV} first (the page then asks for it).")
    studio = Studio(check_runs(runs), api_key)
    for run in studio.runs_list():
        if run["status"] == "damaged" or run["problem"]:
            print(f"kit studio: {run['name']}: {run['problem']}", file=sys.stderr)
    handler = type("StudioHandler", (Handler,), {"studio": studio})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise StartError(f"port {port} on {host} is already in use (another kit studio? see: ss -ltnp "
                             f"'sport = :{port}'). Stop it, or start studio on another port: --port {port + 1}."
                             ) from None
        raise StartError(f"cannot listen on {host}:{port} ({e.strerror}). Give another --host or --port.") from None


def add_arguments(p) -> None:
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the folder of run directories (default runs)")
    p.add_argument("--host", default="127.0.0.1",
                   help=f"bind address (default loopback; another needs {kitapi.API_KEY_ENV})")
    p.add_argument("--port", type=int, default=7860)


def run_cli(args) -> int:
    server = make_server(args.runs, args.host, args.port, kitapi.api_key())
    key = "?key=..." if server.RequestHandlerClass.studio.api_key else ""
    print(f"kit studio: http://{args.host}:{server.server_address[1]}/{key} (runs in {args.runs.resolve()}); "
          "Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("kit studio: stopped; runs it started go on training (their logs: "
              f"{args.runs.resolve() / LOGS}).", file=sys.stderr)
    finally:
        server.server_close()
    return 0
