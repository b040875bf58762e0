"""The precision floor of bench/real_agreement.py's rule: the same model in transformers, fp32 against bf16, walked
with the same rule (decided tokens: the reference's top-1 margin >= --tie nats), each precision as the reference
of the other. A served bf16 model cannot be expected to agree with a bf16 reference more than bf16 agrees with
itself in fp32. On the GPU machine, beside a run's export:

    python bench/precision_floor.py RUN/export/merged16
"""
import argparse
import sys
from pathlib import Path

from real_agreement import greedy, prompts, tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a model folder (e.g. a run's merged16 export)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--tie", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kit.models.template import chat_format

    tok = AutoTokenizer.from_pretrained(args.model)
    stop = set(chat_format(tok).stop_ids)
    questions = prompts(args.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    answers = {}
    for dtype in ("bfloat16", "float32"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype), device_map=device).eval()
        answers[dtype] = greedy(model, tok, questions, args.max_new_tokens)
    for ref, other in (("float32", "bfloat16"), ("bfloat16", "float32")):
        for tie in args.tie:
            got = [(tokens, bool(tokens) and tokens[-1] in stop) for tokens, _ in answers[other]]
            t = tally(answers[ref], got, stop, tie)
            print(f"reference {ref}, answers {other}, tie {tie}: decided {t['decided_tokens']}, parted "
                  f"{t['parted_on_decided']}, agreement {t['decided_agreement']:.4f}, identical "
                  f"{t['identical_answers']}/{t['answers']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
