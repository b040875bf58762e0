"""kit: LoRA and 4-bit QLoRA fine-tuning through Unsloth's kernels, export (adapter, merged 16-bit, GGUF) and
serving through vLLM."""
import logging

# Library messages a user can do nothing about, kept to errors: torchao registers its enums with torch's pytree
# as torch now deprecates (a warning at each import), and bitsandbytes looks for an optional package of CPU
# kernels (the kit trains 4-bit on CUDA only).
for _library in ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_library).setLevel(logging.ERROR)
del _library
# torchao tries its kernels built for other GPUs (sm90a, MX formats) and says so for each it cannot load
logging.getLogger("torchao").addFilter(lambda record: not record.getMessage().startswith("Failed to load "))
