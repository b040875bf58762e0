"""Greedy agreement of served models with the local reference on the tokens that are decided: a real model's
answers, where a random-weight model's would part at near-ties everywhere. Run beside servers that
bench/serve_matrix.py started (its --after names them in KIT_MATRIX_URLS), on the GPU machine:

    python bench/serve_matrix.py RUN --out DIR --concurrency 1 --repeats 1 \\
        --variant "adapter|0||--gpu-memory-utilization 0.2" \\
        --variant "merged|0||--merged --gpu-memory-utilization 0.2" \\
        --variant "fp8|0||--merged --fp8 --gpu-memory-utilization 0.2" \\
        --after "python bench/real_agreement.py RUN --out DIR/agreement.json"

Two references, in transformers (bf16 on the GPU): the run's base + adapter (PEFT, unmerged: what `kit serve RUN`
runs) and, when the run has one, its merged16 export (the weights a `--merged` server runs); each server is
walked along both. Each answer is walked along the reference's greedy tokens up to where the server first parts
from it: tokens the reference chose by at least --tie nats over its runner-up count as decided (agreed while the
answers go together; the parting token counts as a disagreement when it was decided there, and as a near-tie, not
counted, when it was not). Prints one JSON line per server and reference.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from serve_matrix import served_models

QUESTIONS_EN = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
                "Give one synonym for 'happy'.", "What does a CPU do?", "Translate 'good morning' to Spanish.",
                "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?"]


def prompts(n: int) -> list[str]:
    """The first questions of the kit's Korean sample set (held-out ones among them), then English ones."""
    from kit.data.rows import SAMPLE_FILE
    rows = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    korean = [r["instruction"] for r in rows[:max(n - len(QUESTIONS_EN), 0)]]
    return (korean + QUESTIONS_EN)[:n]


def walk(continuation: list[int], margins: list[float], got: list[int], stopped: bool, stop_ids: set,
         tie: float) -> tuple[int, int, bool]:
    """(decided tokens agreed, decided tokens parted on (0 or 1), whole answer identical) of one answer."""
    agreed = 0
    served = [t for t in got if t not in stop_ids] + ([continuation[-1]] if stopped and continuation[-1] in stop_ids
                                                      else [])
    for n, token in enumerate(continuation):
        same = n < len(served) and served[n] == token
        if not same:
            return agreed, int(margins[n] >= tie), False
        agreed += margins[n] >= tie
    return agreed, 0, len(served) == len(continuation)


def tally(refs: list[tuple[list[int], list[float]]], answers: list[tuple[list[int], bool]], stop_ids: set,
          tie: float) -> dict:
    """Each answer (tokens, stopped) walked along its reference (continuation, margins): the agreement on decided
    tokens over all of them."""
    agreed = parted = identical = 0
    for (tokens, stopped), (continuation, margins) in zip(answers, refs):
        a, p, same = walk(continuation, margins, tokens, stopped, stop_ids, tie)
        agreed, parted, identical = agreed + a, parted + p, identical + same
    return {"decided_agreement": agreed / max(agreed + parted, 1), "decided_tokens": agreed + parted,
            "parted_on_decided": parted, "identical_answers": identical, "answers": len(answers), "tie_nats": tie}


def greedy(model, tok, questions: list[str], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Each question's greedy continuation under `model` and the top-1 margin (nats) of each of its tokens."""
    import torch

    from kit.eval.verify import hf_run, prompt_ids
    from kit.models.template import chat_format
    stops = chat_format(tok).stop_ids  # the answer ends where a server's does: at the end of the turn
    out = []
    for q in questions:
        ids = prompt_ids(tok, q)
        continuation, logits = hf_run(model, ids, max_new_tokens, stops, tok.pad_token_id)
        top2 = torch.tensor(logits[len(ids) - 1:len(ids) - 1 + len(continuation)]).topk(2, dim=-1).values
        out.append((continuation, (top2[:, 0] - top2[:, 1]).tolist()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--tie", type=float, default=0.1, help="nats: a smaller top-1 margin is a near-tie")
    args = ap.parse_args()
    import openai
    import torch
    from transformers import AutoModelForCausalLM

    from kit.eval.infer import load_adapter_model
    from kit.eval.verify import served_answer
    from kit.models.template import chat_format
    from kit.run.rundir import RunDir

    questions = prompts(args.prompts)

    model, tok = load_adapter_model(args.run, dtype="bfloat16")
    stop_ids = set(chat_format(tok).stop_ids)
    references = {"base+adapter": greedy(model, tok, questions, args.max_new_tokens)}
    merged = RunDir(args.run).merged16
    if (merged / "config.json").exists():  # the weights a --merged server runs, in transformers
        del model
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map="auto").eval()
        references["merged16"] = greedy(model, tok, questions, args.max_new_tokens)
    results = []
    for pair in os.environ.get("KIT_MATRIX_URLS", "").split():
        label, url = pair.split("=", 1)
        client = openai.OpenAI(base_url=url, api_key=os.environ.get("KIT_API_KEY", "none"))
        name = served_models(url)[0]  # an adapter server's adapter, not its base
        answers = [served_answer(client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=args.max_new_tokens,
            extra_body={"return_token_ids": True}), tok) for q in questions]
        for reference, refs in references.items():
            results.append({"label": label, "model": name, "reference": reference,
                            **tally(refs, [(a.tokens, a.stopped) for a in answers], stop_ids, args.tie)})
            print(json.dumps(results[-1]), flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
