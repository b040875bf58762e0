"""The steps every recipe runs, in order: setup (the Hub, the backend, the base model and its tokenizer), start (the
run directory), data, plan, train, save (adapter, manifest, report, exports). train.method picks what differs
between methods (the data: examples or preference pairs; the trainer; the manifest's lines about the method);
a recipe module (kit.recipes.llama31_sft, kit.recipes.dpo) is its default recipe, its methods and its command.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kit.config.load import DEFAULT_RECIPE, load_config, shipped_recipes, to_yaml
from kit.config.schema import Config, check_models, describe
from kit.core.errors import ConfigError, KitError, exit_with
from kit.core.io import write_json
from kit.data.load import TrainingData, load_data, mixture_table
from kit.data.preference import load_pairs
from kit.export import gguf
from kit.export.exporter import export
from kit.models import gguf_source
from kit.models.template import ChatFormat, chat_format, load_tokenizer
from kit.models.tiny import build_random_model
from kit.run import rundir
from kit.run.rundir import RunDir, save_adapter
from kit.train import distributed, report, trackers
from kit.train.backend import Backend, activate, check_machine, detect_device
from kit.train.plan import Plan, check_context, execution, longest_example, make_plan

if TYPE_CHECKING:
    from kit.train.trainer import Trained

METHODS = {"sft": load_data, "dpo": load_pairs, "orpo": load_pairs}  # train.method -> its data


def parse_args(argv: list[str], prog: str, recipe: str, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"a shipped recipe ({', '.join(shipped_recipes())}) or a recipe YAML file "
                                    f"(default: {recipe})")
    p.add_argument("--plan", action="store_true", help="print the step plan and exit; loads no model")
    p.add_argument("--examples", type=_count, help="with --plan: assume this many training examples (no data read)")
    p.add_argument("--max-context", action="store_true",
                   help="with --plan: the longest example that fits model.gpu_memory_gib (one a micro-batch, "
                        "checkpointing on); loads no model, reads no data")
    p.add_argument("--devices", type=_count, metavar="N", help="train on N GPUs of this machine, one process each "
                                                                "(DDP, through torchrun); with --plan: plan for N")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.learning_rate=2e-4 lora.r=32")
    return p.parse_intermixed_args(argv)  # options may come between overrides: `a=1 --devices 2 b=2`


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of 1 or more")
    return int(text)


@dataclass(frozen=True)
class Setup:
    """What the steps after setup share."""
    backend: Backend
    base: str
    """What the trainer loads: a Hub id or a model folder."""
    tokenizer: Any
    chat: ChatFormat


def run(cfg: Config, world: distributed.World, module: str, plan_only: bool = False, devices: int = 1) -> None:
    """Train as this process's part of `world` (one process, or the ranks torchrun started); plan_only: print
    the plan for `devices` devices; `module`: the recipe module that runs, for the record."""
    ready = setup(cfg, world)
    # the run directory once the model's chat format is known, before the data load; rank 0 creates it, the
    # others wait for it
    resume = None if plan_only else distributed.on_main(world, start_run, cfg, world.size)
    data = distributed.main_first(world, METHODS[cfg.train.method], cfg, ready.tokenizer)
    plan = plan_steps(cfg, world, ready, data, devices)
    if plan_only:
        return
    if resume is not None:
        rundir.check_unfinished(resume, plan.total_steps)
    run_dir = RunDir(cfg.run_dir)
    ready = random_weights(cfg, world, ready, run_dir)
    trained, record = train(cfg, ready, data, plan, run_dir, resume, module)
    if world.main:
        save(cfg, ready, plan, run_dir, trained, record)


def setup(cfg: Config, world: distributed.World) -> Setup:
    """The models checked on the Hub, the backend active (Unsloth before TRL), the base model and its tokenizer;
    rank 0 first: the others read what it downloaded, dequantized and cached."""
    check_models(cfg)  # in seconds, where the Hub client would retry for a minute
    backend = activate(cfg, world)  # checks this machine, joins the other ranks, imports Unsloth before TRL
    base = distributed.main_first(world, base_model, cfg.model.name)
    check_context(cfg)  # the base's config.json, now in the cache
    tokenizer = distributed.main_first(world, load_tokenizer, tokenizer_source(cfg, base), cfg.model.revision,
                                       cfg.model.chat_template, cfg.model.tokenizer or cfg.model.name)
    return Setup(backend, base, tokenizer, chat_format(tokenizer))


def plan_steps(cfg: Config, world: distributed.World, ready: Setup, data: TrainingData, devices: int) -> Plan:
    """The plan for this data on `devices` devices, shown by rank 0."""
    from kit.train import trainer  # the import boundary: transformers, TRL and PEFT come in here, after Unsloth
    plan = trainer.plan(cfg, ready.backend, data, devices)
    if world.main:
        source = f"a mixture of {len(data.mixture)} sources" if data.mixture else cfg.data.path
        print(f"plan for {cfg.run_dir} ({source}):\n{plan.render()}")
        if data.mixture:
            print(mixture_table(data.mixture))
    return plan


def random_weights(cfg: Config, world: distributed.World, ready: Setup, run_dir: RunDir) -> Setup:
    """model.name=random:*: the random-weight base, built into the run directory by rank 0; else `ready`."""
    if cfg.model.random_shape is None:
        return ready
    shape, seed = cfg.model.random_shape, cfg.model.random_seed
    base = distributed.on_main(world, build_random_model, shape, seed, run_dir.base_model)
    return dataclasses.replace(ready, base=str(base.resolve()))


def train(cfg: Config, ready: Setup, data: TrainingData, plan: Plan, run_dir: RunDir, resume: Optional[Path],
          module: str) -> tuple[Trained, dict]:
    """Train with the method's trainer: (what it trained, the manifest as training started)."""
    from kit.train import trainer
    record = {**report.manifest(cfg, ready.backend, data, plan, ready.base, ready.chat, module),
              **trainer.method_record(cfg)}
    begin = functools.partial(rundir.begin, run_dir, to_yaml(cfg), {**record, "status": "training"}, resume)
    trained = trainer.train(cfg, ready.backend, ready.tokenizer, data, run_dir, ready.base, resume, plan.execution,
                            begin)
    return trained, record


def save(cfg: Config, ready: Setup, plan: Plan, run_dir: RunDir, trained: Trained, record: dict) -> None:
    """Rank 0: the adapter, the manifest with the result, the report and the exports the recipe asks for."""
    adapter = save_adapter(trained.model, ready.tokenizer, run_dir.adapter, ready.base)
    result = report.finish(cfg, run_dir, ready.backend, plan, trained, adapter, ready.chat)
    preference = {"preference": trained.preference} if trained.preference is not None else {}
    write_json(run_dir.manifest, {**record, "result": dataclasses.asdict(result), "overfit_alarms": trained.alarms,
                                  **preference})
    print(report.summary(result))
    if trained.preference is not None:
        p = trained.preference
        print(f"held-out preference accuracy: {p['accuracy']:.3f} over {p['pairs']} pairs (start: 0; reference: "
              f"{p['reference']}); raw log-probs prefer chosen: base {p['base_logprob_accuracy']:.3f}, trained "
              f"{p['policy_logprob_accuracy']:.3f}")
    for fmt in cfg.export.formats:
        print(f"exported {fmt} to {export(run_dir.path, fmt, cfg.export.gguf_quant)}")


def base_model(name: str) -> str:
    """What the trainer loads for model.name: a GGUF file (or the kit's packaged model) as the model folder it
    is dequantized to, once; a Hub id or folder as it is."""
    return str(gguf_source.materialize(name)) if gguf_source.is_gguf_source(name) else name


def tokenizer_source(cfg: Config, base: str) -> str:
    """model.tokenizer, else the model's own ('bundled': Llama 3.1's, for a random-weight model)."""
    return "bundled" if cfg.model.random_shape is not None else (cfg.model.tokenizer or base)


def start_run(cfg: Config, devices: int) -> Optional[Path]:
    """The run directory, created; on resume, the checkpoint to go on from, written by as many processes."""
    trackers.check(cfg)  # before the run directory changes and the model loads
    if "gguf" in cfg.export.formats:  # not after an hour of training
        gguf.check_quantizer(cfg.export.gguf_quant, f"export.gguf_quant={cfg.export.gguf_quant}")
    resume = rundir.start(cfg)
    if resume is not None:
        rundir.check_devices(resume, devices)
    return resume


def launch(cfg: Config, devices: int, argv: list[str], module: str) -> None:
    """--devices N: check once what would stop the N processes, then let torchrun start them."""
    check_models(cfg)
    check_machine(cfg, distributed.World(size=devices, local_size=devices))
    start_run(cfg, devices)  # the run directory, as rank 0 will find it
    distributed.launch(devices, argv, module)


def plan_without_data(cfg: Config, examples: int, devices: int = 1) -> Plan:
    """--plan --examples N: the step arithmetic, and the GPU memory for the worst case (no data read).
    A quantized base or a memory budget means the plan is for a CUDA GPU."""
    check_context(cfg)
    steps = make_plan(cfg, examples, devices=devices)
    cuda = cfg.model.quantization != "16-bit" or cfg.model.gpu_memory_gib is not None
    how = execution(cfg, None, cuda=cuda, card_gib=None, steps=steps.total_steps, devices=devices)
    return dataclasses.replace(steps, execution=how)


def main(argv: Optional[list[str]], prog: str, recipe: str, methods: tuple[str, ...], doc: str, module: str) -> int:
    """A recipe's command: `recipe` when --config is not given; `methods`: the train.method values it trains;
    `module`: the recipe module (python -m `module` runs this command), recorded and started by torchrun."""
    world = distributed.world()
    # rank 0 speaks for the run: the other ranks log only errors
    logging.basicConfig(level=logging.INFO if world.main else logging.ERROR, format="%(levelname)s kit: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog, recipe, doc)
    if args.help_config:
        print(describe())
        return 0
    cfg, command = None, [*prog.split(), *argv]
    try:
        cfg = load_config(args.config or recipe, args.overrides)
        if cfg.train.method not in methods:
            raise ConfigError(f"train.method={cfg.train.method}: {prog} trains {' or '.join(methods)}; set "
                              f"train.method={methods[0]}, or use python -m kit.recipes.llama31_sft.")
        devices = args.devices or world.size
        if world.size > 1 and devices != world.size:
            raise ConfigError(f"--devices {devices}: this process is one of {world.size} that the launcher started; "
                              f"pass --devices {world.size} or leave it out.")
        if args.max_context:
            if not args.plan:
                raise ConfigError("--max-context is a question for the plan: add --plan.")
            device = detect_device()
            print(longest_example(cfg, None if cfg.model.gpu_memory_gib else device.memory_gib, device.host_gib))
        elif args.plan and args.examples is not None:
            print(plan_without_data(cfg, args.examples, devices).render())
        elif devices > world.size and not args.plan:
            # the processes run this module: they are told the recipe this command defaults to
            launch(cfg, devices, argv if args.config or recipe == DEFAULT_RECIPE else ["--config", recipe, *argv],
                   module)
        else:
            run(cfg, world, module, plan_only=args.plan, devices=devices)
    except KitError as e:
        return exit_with(e) if world.main else 2  # every rank meets the same problem; rank 0 reports it
    except KeyboardInterrupt:
        if cfg is None or args.plan or not world.main:
            return 130
        return rundir.interrupted(RunDir(cfg.run_dir), command)
    except Exception as e:  # a full disk or an unwritable folder while training or saving: the run says failed
        stopped = rundir.failed(RunDir(cfg.run_dir), e, command) if cfg and world.main and not args.plan else None
        if stopped is None:
            raise
        return exit_with(stopped)
    finally:
        distributed.leave(world)
    return 0

