"""bench/serve_load.py's rounds, spread over client processes, against bench/stand_in_server.py (streams what it
is asked for, or one token short to test the check): the counts and spans its figures rest on."""
import multiprocessing
import sys
import threading

import pytest

from tests.helpers import BENCH, bench_module

stand_in_server = bench_module("stand_in_server")
StandIn = stand_in_server.StandIn


@pytest.fixture
def stand_in():
    server = stand_in_server.Server(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    StandIn.short = 0


@pytest.fixture
def serve_load(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its own import of kernel_profile, and the pool's workers'
    module = bench_module("serve_load")
    monkeypatch.setitem(sys.modules, "serve_load", module)
    return module


def test_a_round_from_two_client_processes_counts_every_token_and_spans_first_start_to_last_end(stand_in, serve_load):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        done = serve_load.one_round(pool, 2, stand_in, "m", 5, 16)
    made = done.requests
    assert len(made) == 5 and all(r.tokens == 16 and r.ttft is not None for r in made)
    span = max(r.ended for r in made) - min(r.started for r in made)
    assert done.tokens_per_s == pytest.approx(5 * 16 / span)
    assert all(r.started <= r.started + r.ttft <= r.ended for r in made)


def test_a_server_that_stops_short_fails_the_round(stand_in, serve_load):
    StandIn.short = 1
    with multiprocessing.get_context("spawn").Pool(1) as pool, pytest.raises(SystemExit, match="expected 32"):
        serve_load.one_round(pool, 1, stand_in, "m", 2, 16)
