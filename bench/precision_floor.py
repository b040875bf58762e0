"""The precision floor of bench/real_agreement.py's rule: the same model in transformers, fp32 against bf16, walked
with the same rule (decided tokens: the reference's top-1 margin >= --tie nats), each precision as the reference
of the other. A served bf16 model cannot be expected to agree with a bf16 reference more than bf16 agrees with
itself in fp32. On the GPU machine, beside a run's export:

    python bench/precision_floor.py RUN/export/merged16
"""
import argparse
import sys
from pathlib import Path

from real_agreement import prompts, walk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a model folder (e.g. a run's merged16 export)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--tie", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kit.eval.verify import hf_run, prompt_ids
    from kit.models.template import chat_format

    tok = AutoTokenizer.from_pretrained(args.model)
    stop = set(chat_format(tok).stop_ids)
    questions = prompts(args.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    answers = {}
    for dtype in ("bfloat16", "float32"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype), device_map=device).eval()
        answers[dtype] = []
        for q in questions:
            ids = prompt_ids(tok, q)
            continuation, logits = hf_run(model, ids, args.max_new_tokens)
            top2 = torch.tensor(logits[len(ids) - 1:len(ids) - 1 + len(continuation)]).topk(2, dim=-1).values
            answers[dtype].append((continuation, (top2[:, 0] - top2[:, 1]).tolist()))
    for ref, other in (("float32", "bfloat16"), ("bfloat16", "float32")):
        for tie in args.tie:
            agreed = parted = identical = 0
            for (continuation, margins), (got, _) in zip(answers[ref], answers[other]):
                a, p, same = walk(continuation, margins, got, bool(got) and got[-1] in stop, stop, tie)
                agreed, parted, identical = agreed + a, parted + p, identical + same
            print(f"reference {ref}, answers {other}, tie {tie}: decided {agreed + parted}, parted {parted}, "
                  f"agreement {agreed / max(agreed + parted, 1):.4f}, identical {identical}/{len(questions)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
