"""Fine-tune Llama 3.1 8B Instruct with LoRA or 4-bit QLoRA: setup -> train -> save.

    python -m kit.recipes.llama31_sft                                  # recipes/llama31_sft.yaml
    python -m kit.recipes.llama31_sft --config recipes/demo.yaml       # tiny model, CPU, minutes
    python -m kit.recipes.llama31_sft train.learning_rate=2e-4 lora.r=32 data.path=./my.jsonl
    python -m kit.recipes.llama31_sft --plan                           # steps, checkpoints; no model

Backends: Unsloth (default; its CUDA kernels, or its CPU fallback) or transformers + PEFT (model.backend=hf).
The run directory runs/<run.name>/ receives config.yaml, manifest.json, metrics.jsonl, tensorboard/,
loss.png, checkpoints/ and the final PEFT adapter in adapter/.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kit.config import Config, ConfigError, check_device, describe, load_config, to_dict
from kit.data import DataError
from kit.export import ExportError

log = logging.getLogger("kit")
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class Run:
    """Everything setup() resolved, handed to train() and save()."""
    cfg: Config
    device: object
    backend: str
    precision: str
    tokenizer: object
    train_data: object
    eval_data: object
    plan: object
    resume: Optional[Path]
    base_model: str
    model: object = None


# ---------------------------------------------------------------- setup

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m kit.recipes.llama31_sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (default: recipes/llama31_sft.yaml)")
    p.add_argument("--plan", action="store_true", help="print the step plan and exit; loads no model")
    p.add_argument("--examples", type=int, help="with --plan: assume this many training examples (no data read)")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.learning_rate=2e-4 lora.r=32")
    return p.parse_args(argv)


def config_path(arg: Optional[str]) -> Path:
    if arg is None:
        return RECIPES / "llama31_sft.yaml"
    p = Path(arg)
    return p if p.exists() or p.parent != Path(".") else RECIPES / p.with_suffix(".yaml").name


def prepare_run_dir(cfg: Config) -> Optional[Path]:
    """Refuse to clobber an earlier run; find the checkpoint to resume from. Returns it or None."""
    from kit.callbacks import complete_checkpoints
    from kit.io import move_aside
    run_dir, resume = cfg.run_dir, cfg.train.resume_from_checkpoint
    if resume is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            if not cfg.run.overwrite:
                raise ConfigError(f"run directory {run_dir} already exists. Resume it with "
                                  "train.resume_from_checkpoint=auto, choose another run.name=..., or pass "
                                  "run.overwrite=true (the old run is moved aside, not deleted).")
            log.warning(f"run.overwrite: moved the previous run to {move_aside(run_dir)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints") if run_dir.exists() else []
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint=auto: {run_dir}/checkpoints holds no complete "
                              "checkpoint to resume from. Start a new run without resume_from_checkpoint.")
        return found[-1]
    ckpt = Path(resume)
    if not (ckpt / "trainer_state.json").is_file():
        raise ConfigError(f"train.resume_from_checkpoint={resume}: not a checkpoint folder (no trainer_state.json).")
    return ckpt


def load_data(cfg: Config, tokenizer):
    """Train and eval examples, tokenized and masked; prints what was truncated or dropped."""
    from kit.data import load_rows, prepare, split_eval
    d = cfg.data
    rows = load_rows(d.path, d.split, d.subset, d.revision)
    if d.eval_path or d.eval_split:
        eval_rows = load_rows(d.eval_path or d.path, d.eval_split or "train", d.subset, d.revision)
    elif d.eval_ratio > 0 and cfg.train.eval_strategy != "no":
        rows, eval_rows = split_eval(rows, d.eval_ratio, cfg.train.seed, d.path)
    else:
        eval_rows = None
    if d.max_examples:
        rows = rows.select(range(min(d.max_examples, len(rows))))
    common = dict(fmt=d.format, fields=d.fields, system_prompt=d.system_prompt, max_len=cfg.model.max_seq_length,
                  responses_only=d.train_on_responses_only, overlong=d.overlong)
    train = prepare(rows, tokenizer, source=d.path, **common)
    evals = prepare(eval_rows, tokenizer, source=d.eval_path or f"{d.path} (eval)", **common) if eval_rows else None
    for name, p in (("train", train), ("eval", evals)):
        if p is None:
            continue
        if p.truncated:
            log.warning(f"{name}: {p.truncated} example(s) longer than max_seq_length={cfg.model.max_seq_length} "
                        "were truncated (data.overlong=drop drops them instead).")
        if p.dropped_overlong:
            log.warning(f"{name}: dropped {len(p.dropped_overlong)} over-long example(s), rows {p.dropped_overlong[:10]}")
        if p.dropped_masked:
            log.warning(f"{name}: dropped {len(p.dropped_masked)} example(s) with no trainable token left, "
                        f"rows {p.dropped_masked[:10]}")
    return train, evals


def make_plan(cfg: Config, train, evals, devices: int):
    from kit.plan import make_plan as plan_for
    examples = len(train.dataset)
    if cfg.train.packing:
        from trl.data_utils import pack_dataset
        examples = len(pack_dataset(train.dataset, cfg.model.max_seq_length, strategy="bfd"))
    return plan_for(cfg, examples, len(evals.dataset) if evals else 0, devices, train.mean_tokens)


def setup(cfg: Config, plan_only: bool = False) -> Run:
    from kit import backends
    from kit.chat import load_tokenizer
    device = backends.detect_device()
    check_device(cfg, device.cuda, device.bf16)
    backend = backends.resolve_backend(cfg)
    backends.activate(backend)
    precision = backends.resolve_precision(cfg, device)
    random_shape = cfg.model.name[len("random:"):] if cfg.model.name.startswith("random:") else None
    tokenizer = load_tokenizer("bundled" if random_shape else (cfg.model.tokenizer or cfg.model.name),
                               cfg.model.revision)
    train_data, eval_data = load_data(cfg, tokenizer)
    plan = make_plan(cfg, train_data, eval_data, devices=1)
    resume = None if plan_only else prepare_run_dir(cfg)
    base = cfg.model.name
    if random_shape and not plan_only:
        from kit.tiny import build_random_model
        base = str(build_random_model(random_shape, cfg.model.random_seed, cfg.run_dir / "base-model").resolve())
    return Run(cfg, device, backend, precision, tokenizer, train_data, eval_data, plan, resume, base)


# ---------------------------------------------------------------- train

def trainer_args(run: Run):
    from trl import SFTConfig
    t, cfg = run.cfg.train, run.cfg
    early = t.early_stopping_patience is not None
    warmup = t.warmup_steps if t.warmup_steps is not None else (t.warmup_ratio or 0.0)  # < 1: a ratio
    return SFTConfig(
        output_dir=str(cfg.run_dir / "checkpoints"), per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=warmup, optim=t.optim, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, eval_strategy=t.eval_strategy if run.eval_data else "no",
        eval_steps=t.eval_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, seed=t.seed, data_seed=t.seed,
        bf16=run.precision == "bf16", fp16=run.precision == "fp16", use_cpu=not run.device.cuda,
        gradient_checkpointing=False,  # the backend enabled its own variant
        max_length=cfg.model.max_seq_length, packing=t.packing, report_to="none",
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None, include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0, disable_tqdm=False, logging_first_step=True, remove_unused_columns=True)


def build_trainer(run: Run, alarm):
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer
    from kit.callbacks import MarkComplete, MetricsFile
    t, run_dir = run.cfg.train, run.cfg.run_dir
    callbacks = [MetricsFile(run_dir / "metrics.jsonl"), alarm, MarkComplete()]
    if t.report_to_tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(str(run_dir / "tensorboard"))))
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    data = dict(train_dataset=run.train_data.dataset, eval_dataset=run.eval_data.dataset if run.eval_data else None,
                callbacks=callbacks)
    if run.backend == "hf" and not run.device.cuda:
        # TRL's loss runs a Triton kernel (its fused LM head) that needs a GPU; on CPU the HF backend trains the
        # same tokenized, masked examples with transformers' Trainer (Unsloth's CPU path patches TRL itself).
        from transformers import DataCollatorForSeq2Seq, Trainer
        collator = DataCollatorForSeq2Seq(run.tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=run.model, args=trainer_args(run), data_collator=collator,
                          processing_class=run.tokenizer, **data)
    else:
        trainer = SFTTrainer(model=run.model, args=trainer_args(run), processing_class=run.tokenizer, **data)
    if run.precision == "fp16":  # TRL casts QLoRA adapters to bf16; fp16 loss scaling needs fp32 masters
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer


def trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, forget logs written after the checkpoint: those steps are trained again."""
    import json
    from kit.io import atomic_write_text
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def train(run: Run):
    from kit import backends
    from kit.callbacks import OverfitAlarm
    run.model = backends.load_model(run.cfg, run.base_model, run.precision, run.device)
    alarm = OverfitAlarm(run.cfg.train.overfit_patience)
    trainer = build_trainer(run, alarm)
    if run.resume:
        step = int(run.resume.name.split("-")[-1])
        trim_metrics(run.cfg.run_dir / "metrics.jsonl", step)
        log.info(f"resuming from {run.resume} (step {step})")
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the training peak, not the load's
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    return trainer, alarm, result, time.time() - start


# ---------------------------------------------------------------- save

def save_adapter(run: Run, trainer) -> Path:
    from kit.io import atomic_dir
    target = run.cfg.run_dir / "adapter"
    with atomic_dir(target, replace=True) as tmp:
        trainer.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        _point_adapter_at_base(tmp, run.base_model)
    return target


def _point_adapter_at_base(folder: Path, base: str) -> None:
    import json
    cfg_file = folder / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["base_model_name_or_path"] = base  # Unsloth may record its own -bnb-4bit repo name here
    cfg_file.write_text(json.dumps(data, indent=2))


def write_manifest(run: Run, extra: dict) -> None:
    from kit import report
    from kit.io import write_json
    m = run.cfg.model
    write_json(run.cfg.run_dir / "manifest.json", {
        "command": report.command_line(), "base_model": run.base_model, "model_name": m.name,
        "backend": run.backend, "precision": run.precision, "device": run.device.name,
        "seed": run.cfg.train.seed, "dataset": {"path": run.cfg.data.path, "fingerprint": run.train_data.fingerprint,
                                                 "examples": len(run.train_data.dataset),
                                                 "eval_examples": len(run.eval_data.dataset) if run.eval_data else 0},
        "plan": vars(run.plan), "git_commit": report.git_commit(), "packages": report.package_versions(),
        "requirements": report.requirement_files(), **extra})


def _tokens_before(checkpoint: Optional[Path]) -> int:
    """Tokens already trained when resuming: they were not trained in this process's time."""
    import json
    if checkpoint is None:
        return 0
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)


def save(run: Run, trainer, alarm, result, seconds: float) -> str:
    from kit import report
    run_dir = run.cfg.run_dir
    adapter = save_adapter(run, trainer)
    metrics = report.read_metrics(run_dir / "metrics.jsonl")
    report.plot_losses(metrics, run_dir / "loss.png", f"{run.cfg.run.name}: {run.cfg.model.name}")
    evals = [m for m in metrics if "eval_loss" in m]
    best = min(evals, key=lambda m: m["eval_loss"]) if evals else {}
    tokens = trainer.state.num_input_tokens_seen - _tokens_before(run.resume)
    peak, peak_kind = report.peak_memory()
    info = dict(run_dir=str(run_dir), model=run.cfg.model.name, backend=run.backend, precision=run.precision,
                load_in_4bit=run.cfg.model.load_in_4bit, r=run.cfg.lora.r, device=run.device.name,
                steps=trainer.state.global_step, total_steps=run.plan.total_steps,
                stopped_early=trainer.state.global_step < run.plan.total_steps, seconds=seconds, tokens=tokens,
                tokens_per_s=tokens / max(seconds, 1e-9), peak_gib=peak, peak_kind=peak_kind,
                train_loss=next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
                best_eval_loss=best.get("eval_loss"), best_eval_step=best.get("step"), alarms=len(alarm.alarms),
                adapter=str(adapter), loss_png=str(run_dir / "loss.png"))
    write_manifest(run, {"result": info, "overfit_alarms": alarm.alarms})
    return report.summary(info)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s kit: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(config_path(args.config), args.overrides)
        if args.plan and args.examples is not None:
            from kit.plan import make_plan as plan_for
            print(plan_for(cfg, args.examples).render())
            return 0
        run = setup(cfg, plan_only=args.plan)
        print(f"plan for {cfg.run_dir} ({cfg.data.path}):\n{run.plan.render()}")
        if args.plan:
            return 0
        from kit.io import atomic_write_text
        import yaml
        atomic_write_text(cfg.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        write_manifest(run, {"status": "training"})
        trainer, alarm, result, seconds = train(run)
        print(save(run, trainer, alarm, result, seconds))
        from kit.export import export
        for fmt in cfg.export.formats:
            print(f"exported {fmt} to {export(cfg.run_dir, fmt, cfg.export.gguf_quant)}")
        return 0
    except (ConfigError, DataError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
