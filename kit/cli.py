"""`kit`: one entry point for the kit's commands. Heavy imports happen inside each command.

    kit train [--config FILE] [--plan] [key=value ...]    same as python -m kit.recipes.llama31_sft
    kit ask RUN_DIR --prompt TEXT                          greedy answer from base + the run's adapter
"""
from __future__ import annotations

import argparse
import sys


def cmd_ask(args) -> int:
    from kit.infer import generate, load_adapter_model
    try:
        model, tok = load_adapter_model(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(generate(model, tok, [{"role": "user", "content": args.prompt}], args.max_new_tokens))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        from kit.recipes.llama31_sft import main as train_main
        return train_main(argv[1:])
    p = argparse.ArgumentParser(prog="kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="fine-tune (see: kit train --help)", add_help=False)
    ask = sub.add_parser("ask", help="answer one prompt greedily with a run's adapter")
    ask.add_argument("run_dir")
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    return {"ask": cmd_ask}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
