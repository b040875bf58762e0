"""Fine-tune Llama 3.1 8B Instruct with LoRA or 4-bit QLoRA: setup -> train -> save.

    python -m kit.recipes.llama31_sft                                  # the llama31_sft recipe
    python -m kit.recipes.llama31_sft --config demo                    # tiny model, CPU, minutes
    python -m kit.recipes.llama31_sft train.learning_rate=2e-4 lora.r=32 data.path=./my.jsonl
    python -m kit.recipes.llama31_sft --plan                           # steps, checkpoints; no model

--config names a recipe shipped in the kit (llama31_sft, demo) or a YAML file of your own.
Backends: Unsloth (default; its CUDA kernels, or its CPU fallback) or transformers + PEFT (model.backend=hf).
The run directory runs/<run.name>/ receives config.yaml, manifest.json, metrics.jsonl, tensorboard/,
loss.png, checkpoints/ and the final PEFT adapter in adapter/ (kit.rundir).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from kit import report, rundir
from kit.backend import activate
from kit.config import DEFAULT_RECIPE, Config, describe, load_config, shipped_recipes, to_yaml
from kit.data import load_data
from kit.errors import KitError
from kit.export import export
from kit.io import atomic_write_text, write_json
from kit.plan import make_plan
from kit.rundir import RunDir, save_adapter
from kit.template import load_tokenizer
from kit.tiny import build_random_model

PROG = "python -m kit.recipes.llama31_sft"


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"a shipped recipe ({', '.join(shipped_recipes())}) or a recipe YAML file "
                                    f"(default: {DEFAULT_RECIPE})")
    p.add_argument("--plan", action="store_true", help="print the step plan and exit; loads no model")
    p.add_argument("--examples", type=int, help="with --plan: assume this many training examples (no data read)")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.learning_rate=2e-4 lora.r=32")
    return p.parse_args(argv)


def run(cfg: Config, plan_only: bool = False) -> None:
    # ---------------------------------------------------------------- setup
    backend = activate(cfg)  # checks this machine, then imports Unsloth before anything imports transformers/TRL
    from kit import train  # the import boundary: transformers, TRL and PEFT come in here, after Unsloth

    tokenizer = load_tokenizer(cfg.model.tokenizer_source, cfg.model.revision)
    data = load_data(cfg, tokenizer)
    plan = train.plan(cfg, data)
    print(f"plan for {cfg.run_dir} ({cfg.data.path}):\n{plan.render()}")
    if plan_only:
        return
    run_dir = RunDir(cfg.run_dir)
    resume = rundir.start(cfg)
    base = cfg.model.name
    if cfg.model.random_shape is not None:
        base = str(build_random_model(cfg.model.random_shape, cfg.model.random_seed, run_dir.base_model).resolve())
    atomic_write_text(run_dir.config, to_yaml(cfg))
    record = report.manifest(cfg, backend, data, plan, base)
    write_json(run_dir.manifest, {**record, "status": "training"})

    # ---------------------------------------------------------------- train
    trained = train.train(cfg, backend, tokenizer, data, run_dir, base, resume)

    # ---------------------------------------------------------------- save
    adapter = save_adapter(trained.model, tokenizer, run_dir.adapter, base)
    result = report.finish(cfg, run_dir, backend, plan, trained, adapter)
    write_json(run_dir.manifest, {**record, "result": dataclasses.asdict(result), "overfit_alarms": trained.alarms})
    print(report.summary(result))
    for fmt in cfg.export.formats:
        print(f"exported {fmt} to {export(run_dir.path, fmt, cfg.export.gguf_quant)}")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s kit: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config or DEFAULT_RECIPE, args.overrides)
        if args.plan and args.examples is not None:
            print(make_plan(cfg, args.examples).render())
        else:
            run(cfg, plan_only=args.plan)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
