"""QLoRA's CPU part, so that CI runs it: bitsandbytes (0.50) quantizes to NF4 and trains a LoRA on CPU, through
the kit's own loader, with the paged 8-bit AdamW the GPU recipe uses. The recipe itself still refuses
model.load_in_4bit on CPU (kit.config.schema.check_device); Unsloth's 4-bit path and the speed are the GPU
tests' (tests/test_gpu.py)."""
import torch

from kit.config.load import load_config
from kit.train.backend import Backend, detect_device
from kit.train.model import load_model


def test_nf4_base_with_lora_trains_on_cpu(tiny_base, tokenizer):
    import bitsandbytes as bnb
    cfg = load_config("demo", ["model.backend=hf", "model.load_in_4bit=true", "lora.r=4"])
    model = load_model(cfg, str(tiny_base), Backend("hf", detect_device(), "fp32"), checkpointing=False,
                       tiled_mlp=False)
    quantized = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(w.quant_state.quant_type == "nf4" for w in quantized), "the 7 projections"
    assert all(w.dtype == torch.uint8 and w.numel() * 2 == w.quant_state.shape.numel() for w in quantized), "4-bit"
    turns = [{"role": "user", "content": "배치 크기란 무엇인가요?"},
             {"role": "assistant", "content": "한 스텝에서 함께 처리하는 샘플의 수입니다."}]
    ids = tokenizer.apply_chat_template(turns, return_tensors="pt", return_dict=True)["input_ids"]

    def base_logits():  # bitsandbytes repacks the 4-bit weights for its CPU kernel at the first forward: compare
        with torch.no_grad(), model.disable_adapter():  # what the base computes, not its bytes
            return model(input_ids=ids).logits
    base = base_logits()
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    optimizer = bnb.optim.PagedAdamW8bit(trained, lr=2e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(a, b) for a, b in zip(before, trained)), "every LoRA matrix trained"
    assert torch.equal(base_logits(), base), "the 4-bit base stayed frozen"
