"""A stand-in for vLLM's OpenAI chat endpoint that answers at no model cost: streamed requests get exactly
max_tokens chunks (then the usage chunk), others one short answer. For measuring the load generator itself
(bench/serve_load.py) and for its tests.

    python bench/stand_in_server.py --port 8899 &
    python bench/serve_load.py --url http://127.0.0.1:8899/v1 --model m --concurrency 32 --clients 1
"""
import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn(BaseHTTPRequestHandler):
    short = 0
    """tokens each stream leaves out (tests of the token check)"""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        base = {"id": "x", "created": 0, "model": body["model"]}
        self.send_response(200)
        if not body.get("stream"):
            answer = json.dumps({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "답"}, "finish_reason": "stop"}]}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        tokens = body["max_tokens"] - self.short
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base["object"] = "chat.completion.chunk"
        for _ in range(tokens):
            self._event({**base, "choices": [{"index": 0, "delta": {"content": "토큰"}, "finish_reason": None}]})
        self._event({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens,
                                                     "total_tokens": tokens + 3}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, data):
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")

    def log_message(self, *_):
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 256  # 32 requests connect at once; the default backlog of 5 delays them by seconds
    daemon_threads = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8899)
    Server(("127.0.0.1", ap.parse_args().port), StandIn).serve_forever()


if __name__ == "__main__":
    main()
