"""Container health: healthy when nothing listens on KIT_HEALTH_PORT (training, export), or when the
server listening there answers /health with 200."""
import socket
import sys
import urllib.request

from kit.core import env


def main() -> int:
    port = env.health_port()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return 0 if r.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
