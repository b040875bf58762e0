"""`kit`: one entry point for the kit's commands. Heavy imports happen inside each command.

    kit train [--config RECIPE] [--plan] [key=value ...]  same as python -m kit.recipes.llama31_sft
    kit train --config dpo_demo [key=value ...]            DPO (ORPO: train.method=orpo): the recipe's train.method
    kit ask RUN_DIR --prompt TEXT                          greedy answer from base + the run's adapter
    kit export RUN_DIR --to merged16|gguf [--quant q8_0]   merged 16-bit model or GGUF (+ Ollama Modelfile)
    kit verify RUN_DIR [--url URL --model NAME]            exports (and a server) agree with base + adapter?
    kit eval RUN_DIR [--tasks NAMES] [--merged|--base]     lm-evaluation-harness: the held-out split, lm-eval tasks
    kit compare RUN_DIR [--example N]                      base vs fine-tuned: one held-out answer each, ROUGE-L
    kit serve RUN_DIR [RUN_DIR ...] [--merged] [-- VLLM]   vLLM's OpenAI-compatible server (VLLM: its own options)
    kit chat --url URL --model NAME [--prompt TEXT]        streaming chat with a served model
    kit adapters load URL RUN_DIR [--name NAME]            load an adapter into a running server
    kit adapters unload URL NAME                           unload one (kit serve --allow-runtime-adapters)
    kit studio [--runs DIR] [--host H] [--port 7860]       a local web page: runs, watch, plan, compare, export
"""
from __future__ import annotations

import argparse
import sys

from kit.core.errors import KitError, exit_with
from kit.eval import compare, evaluation, verify
from kit.export import exporter
from kit.serve import adapters, chat_client, launcher
from kit.studio import server as studio


def cmd_ask(args) -> int:
    from kit.eval.infer import generate, load_adapter_model
    model, tok = load_adapter_model(args.run_dir)
    print(generate(model, tok, [{"role": "user", "content": args.prompt}], args.max_new_tokens))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    vllm_options = []
    if argv and argv[0] == "serve" and "--" in argv:  # kit serve's own options, then vLLM's
        cut = argv.index("--")
        argv, vllm_options = argv[:cut], argv[cut + 1:]
    if argv and argv[0] == "train":
        from kit.recipes.llama31_sft import main as train_main
        return train_main(argv[1:], prog="kit train")
    p = argparse.ArgumentParser(prog="kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="fine-tune (see: kit train --help)", add_help=False)
    ask = sub.add_parser("ask", help="answer one prompt greedily with a run's adapter")
    ask.add_argument("run_dir")
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    exporter.add_arguments(sub.add_parser("export", help="merged 16-bit safetensors or GGUF"))
    verify.add_arguments(sub.add_parser("verify", help="compare exports and a server against base + adapter"))
    evaluation.add_arguments(sub.add_parser("eval", help="lm-evaluation-harness on the run's held-out split and "
                                                         "lm-eval tasks"))
    compare.add_arguments(sub.add_parser("compare", help="the base model and the fine-tune on the held-out split: "
                                                         "one question's answers, both scores"))
    launcher.add_arguments(sub.add_parser("serve", help="serve runs with vLLM (base + adapters, or --merged)"))
    chat_client.add_arguments(sub.add_parser("chat", help="chat with a served model (OpenAI API)"))
    adapters.add_arguments(sub.add_parser("adapters", help="load or unload adapters of a running server"))
    studio.add_arguments(sub.add_parser("studio", help="a local web page to plan, watch, compare and export runs"))
    args = p.parse_args(argv)
    if args.command == "serve":
        args.vllm_options = vllm_options
    commands = {"ask": cmd_ask, "export": exporter.run_cli, "verify": verify.run_cli, "eval": evaluation.run_cli,
                "compare": compare.run_cli, "serve": launcher.run_cli, "chat": chat_client.run_cli,
                "adapters": adapters.run_cli, "studio": studio.run_cli}
    try:
        return commands[args.command](args)
    except KitError as e:
        return exit_with(e)
    except KeyboardInterrupt:  # each file the commands write is written whole or not at all (kit.core.io)
        print(f"kit {args.command}: stopped (Ctrl-C); run it again to finish.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
