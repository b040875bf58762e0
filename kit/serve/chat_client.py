"""`kit chat`: a streaming chat REPL (or one-shot --prompt) against any OpenAI-compatible server."""
from __future__ import annotations

import sys

from kit.core import env


def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL")
    p.add_argument("--model", required=True, help="served model or adapter name (see /v1/models)")
    p.add_argument("--prompt", help="ask once and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key-env", default=env.API_KEY_ENV, help="environment variable holding the API key")


def ask(client, model: str, messages: list[dict], max_tokens: int, temperature: float, out=sys.stdout) -> str:
    """Stream one answer to `out`; returns it. The first line names the model that answered."""
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                            temperature=temperature, stream=True)
    text, shown = [], False
    for chunk in stream:
        if not shown:
            out.write(f"[{chunk.model}] ")
            shown = True
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            text.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    return "".join(text)


def run_cli(args) -> int:
    import openai
    client = openai.OpenAI(base_url=args.url, api_key=env.api_key(args.api_key_env) or "none")
    history = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if args.prompt is not None:
            ask(client, args.model, history + [{"role": "user", "content": args.prompt}], args.max_tokens,
                args.temperature)
            return 0
        print(f"chatting with {args.model} at {args.url} (empty line or Ctrl-D to quit)")
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                return 0
            if not line:
                return 0
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": ask(client, args.model, history, args.max_tokens,
                                                                 args.temperature)})
    except openai.APIConnectionError:
        print(f"error: no server answers at {args.url}; start one with: kit serve RUN_DIR", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:
        print(f"error: the server answered {e.status_code}: {e.message}", file=sys.stderr)
        return 1
