"""The export section: what is exported after training; the formats and GGUF types the kit writes."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kit.config.issue import Issue

FORMATS = ("merged16", "gguf")
DIRECT = ("f16", "bf16", "q8_0")  # written by the gguf package alone
KQUANTS = ("q4_k_m", "q5_k_m")  # quantized from f16 by llama.cpp
QUANTS = DIRECT + KQUANTS


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=list)
    """Exports written after training, into RUN_DIR/export/: merged16 and/or gguf (see kit export)."""
    gguf_quant: str = "q8_0"
    """GGUF type for the gguf export: f16, bf16, q8_0, q4_k_m or q5_k_m."""


# ---------------------------------------------------------------- validation

def issues(e: ExportConfig) -> Iterator[Issue]:
    if bad := [f for f in e.formats if f not in FORMATS]:
        yield Issue("export.formats", f"export.formats: {bad} unknown; use {' and/or '.join(FORMATS)}.")
    if e.gguf_quant not in QUANTS:
        yield Issue("export.gguf_quant", f"export.gguf_quant='{e.gguf_quant}': use one of {', '.join(QUANTS)}.")
