"""Export a run: the adapter merged into the 16-bit base (safetensors, bf16), or GGUF (kit.export.gguf) for
llama.cpp and Ollama. Every output is written under a temporary name and renamed when complete.

    kit export runs/demo --to merged16
    kit export runs/demo --to gguf --quant q8_0
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from kit.config.export import FORMATS, KQUANTS, QUANTS
from kit.core import env
from kit.core.errors import ExportError
from kit.core.io import atomic_dir, clean_leftovers, disk_full
from kit.export.gguf import check_exportable, check_quantizer, kquantize, modelfile, write_gguf
from kit.models.hub import base_config
from kit.models.template import generation_config
from kit.run.rundir import ADAPTER_WEIGHTS, RunDir, read_adapter

BYTES_PER_WEIGHT = {"merged16": 2.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 2.0 + 0.6, "q5_k_m": 2.0 + 0.7}


def merged_model(run_dir: Path):
    """(merged model in bf16, tokenizer): the run's adapter merged into the 16-bit base it applies to."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    adapter = read_adapter(run_dir)
    adapter.check_fits(base_config(adapter.base), adapter.base)
    try:
        model = AutoModelForCausalLM.from_pretrained(adapter.base, dtype=torch.bfloat16, token=env.hf_token())
    except OSError as e:  # transformers' word for weights that are neither here nor downloadable
        raise ExportError(f"the base model {adapter.base} cannot be loaded ({str(e).strip().splitlines()[0][:200]}). "
                          "Download its weights where there is network, or point base_model_name_or_path in "
                          f"{adapter.path / 'adapter_config.json'} at a local copy; nothing was written.") from None
    model = PeftModel.from_pretrained(model, str(adapter.path))
    return model.merge_and_unload(), AutoTokenizer.from_pretrained(str(adapter.path))


def check_space(target: Path, n_params: int, kind: str, tokenizer_bytes: int) -> None:
    """Room for the weights and the tokenizer (a tiny model's weights can weigh less than Llama 3.1's tokenizer),
    on the disk that will hold `target` (its nearest existing folder: export/ is new on a first export)."""
    need = n_params * BYTES_PER_WEIGHT[kind] * 1.05 + tokenizer_bytes
    free = shutil.disk_usage(next(p for p in target.parents if p.exists())).free
    if free < need:
        raise ExportError(f"not enough disk for {kind}: about {need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB "
                          f"free under {target.parent}. Free space or export elsewhere; nothing was written.")


def write_merged16(model, tokenizer, out: Path) -> None:
    """The merged model, greedy and stopping at the run's stop tokens, with the run's tokenizer and chat template."""
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out, max_shard_size="5GB", safe_serialization=True)
    tokenizer.save_pretrained(out)


def export(run_dir: Path, to: str, quant: str = "q8_0") -> Path:
    """Write RUN_DIR/export/merged16/ or RUN_DIR/export/gguf-<quant>/; returns the folder."""
    run = RunDir(Path(run_dir))
    if to not in FORMATS:
        raise ExportError(f"--to {to}: use {' or '.join(FORMATS)}.")
    if to == "gguf" and quant not in QUANTS:
        raise ExportError(f"--quant {quant}: unknown GGUF type; use one of {', '.join(QUANTS)}.")
    if to == "gguf":  # before the model merges
        check_quantizer(quant, f"--quant {quant} (llama.cpp's quantizer)")
        from transformers import AutoTokenizer
        adapter = read_adapter(run.path)
        check_exportable(AutoTokenizer.from_pretrained(str(adapter.path)), base_config(adapter.base), adapter.base)
    target = run.merged16 if to == "merged16" else run.gguf(quant)
    for folder in (run.merged16, *map(run.gguf, QUANTS)):  # what an interrupted export (any format) left
        clean_leftovers(folder)
    model, tokenizer = merged_model(run.path)
    tokenizer_files = [f for f in read_adapter(run.path).path.iterdir() if f.is_file() and f.name != ADAPTER_WEIGHTS]
    check_space(target, sum(p.numel() for p in model.parameters()), "merged16" if to == "merged16" else quant,
                sum(f.stat().st_size for f in tokenizer_files))
    try:
        with atomic_dir(target, replace=True) as tmp:
            if to == "merged16":
                write_merged16(model, tokenizer, tmp)
            else:
                name = f"{run.name}-{quant}.gguf"
                if quant in KQUANTS:
                    write_gguf(model, tokenizer, tmp / "f16.gguf", "f16", run.name)
                    kquantize(tmp / "f16.gguf", tmp / name, quant)
                    (tmp / "f16.gguf").unlink()
                else:
                    write_gguf(model, tokenizer, tmp / name, quant, run.name)
                (tmp / "Modelfile").write_text(modelfile(name, tokenizer))
    except Exception as e:
        if disk_full(e):
            raise ExportError(f"the disk filled up while writing {target} ({os.strerror(errno.ENOSPC)}); the partial "
                              "export was removed and earlier exports are untouched. Free space and export again."
                              ) from None
        raise
    return target


def add_arguments(p) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--quant", help=f"with --to gguf, the GGUF type: {', '.join(QUANTS)} (default q8_0)")


def run_cli(args) -> int:
    if args.quant is not None and args.to != "gguf":
        raise ExportError(f"--quant {args.quant}: {args.to} is not quantized; --quant goes with --to gguf.")
    quant = args.quant or "q8_0"
    out = export(args.run_dir, args.to, quant)
    print(f"exported {args.to}{'' if args.to == 'merged16' else ' ' + quant} to {out}")
    return 0
