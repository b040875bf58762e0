"""`kit verify`: the same prompts, greedy, through base + adapter (the reference), the merged export,
each GGUF (llama.cpp) and optionally a running OpenAI-compatible server; a table of token agreement
and logit differences; exit 1 when a target disagrees beyond its threshold.

Token agreement: the share of the reference's greedy tokens a target reproduces before it first
differs, averaged over prompts. Max |Δlogit|: over the prompt and the reference continuation.
A server's answer is read as the token ids it generated (vLLM returns them, and the prompt as it rendered
it, when asked with return_token_ids), else as its text re-encoded. One that first differs with a token (or a
stop) that the reference scored within TIE_NATS of its own parts at a near-tie (rounding decides those; the
answers then part ways) and counts as agreeing in the verdict.

A served adapter must also change something: its row "server:NAME vs base" is the share of prompts whose
answer the adapter changes locally (base + adapter against the base alone) where the server's answer with
the adapter differs from its answer with the base (the base that /v1/models names as the adapter's parent).
A failing server row names the likely cause.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kit.core import env
from kit.core.errors import ServerError
from kit.export.gguf import load_llama_cpp
from kit.models.llama import STOP_TOKEN_IDS
from kit.models.template import chat_format
from kit.run.rundir import RunDir
from kit.serve.adapters import Api, v1

if TYPE_CHECKING:
    import numpy

PROMPTS = ["대한민국의 수도는 어디인가요?", "배치 크기란 무엇인가요?", "LoRA를 한 문장으로 설명해 주세요.",
           "What is the capital of France?", "1 더하기 1은?"]
# (min token agreement, max |Δlogit|) per target kind; None: reported, not checked
# Agreement below 100% is allowed for 16-bit targets: a near-tie between two tokens can flip on rounding,
# which the logit bound (on the reference's own tokens) still catches when it is more than rounding.
THRESHOLDS = {"merged16": (0.8, 0.5), "gguf-f16": (0.8, 0.5), "gguf-bf16": (0.8, 1.0), "gguf-q8_0": (0.5, None),
              "gguf-q4_k_m": (None, None), "gguf-q5_k_m": (None, None), "server": (0.9, None),
              "adapter effect": (0.8, None)}
TIE_NATS = 0.25  # two logits this close swap under bf16 rounding (its step is 0.0625-0.125 at a logit's usual size)


@dataclass
class Result:
    target: str
    agreement: float
    max_logit_diff: Optional[float]
    stopped: Optional[bool]  # every continuation ended at a stop token, as the reference's did
    passed: bool
    kind: str = "server"     # its THRESHOLDS entry
    problem: Optional[str] = None
    """The likely cause, when it failed."""
    near_ties: Optional[int] = None
    """Answers (of a server) that first differ at a near-tie of the reference."""


@dataclass
class Reference:
    """One prompt's greedy continuation (stop token included) and the logits over prompt + continuation."""
    ids: list[int]
    continuation: list[int]
    logits: numpy.ndarray  # one row per position of prompt + continuation
    stops: tuple[int, ...] = tuple(STOP_TOKEN_IDS)
    """The run's stop ids (its chat format's; verify passes them, a Reference made by hand has Llama 3.1's)."""

    def near_tie(self, n: int, token: Optional[int]) -> bool:
        """Whether `token` (None: a stop token) scored within TIE_NATS of the continuation's token n."""
        row = self.logits[len(self.ids) - 1 + n]
        other = max(row[t] for t in self.stops) if token is None else row[token]
        return float(row[self.continuation[n]] - other) < TIE_NATS


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def matched(ref: list[int], got: list[int]) -> int:
    """The reference's tokens that `got` reproduces before it first differs."""
    n = 0
    for a, b in zip(ref, got):
        if a != b:
            break
        n += 1
    return n


def agreement(ref: list[int], got: list[int]) -> float:
    return matched(ref, got) / max(len(ref), 1)


def hf_run(model, ids: list[int], max_new: int, stops: Sequence[int], pad: Optional[int],
           ref_seq: list[int] | None = None) -> tuple[list[int], object]:
    """Greedy continuation (stop token included) and the logits over `ref_seq` (default: prompt + this
    continuation), so that every target's logits are compared on the same tokens. stops, pad: the run's stop ids
    and pad id (chat_format of its tokenizer), always given: generate() reads an eos_token_id of None as "no stop"
    and would write past the end of the turn."""
    import torch
    with torch.no_grad():
        prompt = torch.tensor([ids], device=model.device)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=list(stops), pad_token_id=pad)
        seq = out[0].tolist()
        logits = model(input_ids=torch.tensor([ref_seq or seq], device=model.device)).logits[0].float().cpu().numpy()
    return seq[len(ids):], logits


def gguf_run(llm, ids: list[int], max_new: int, ref_seq: list[int], stops: Sequence[int]) -> tuple[list[int], object]:
    """llama.cpp's greedy continuation (stop token included; stops: the run's stop ids) and its logits over
    `ref_seq`."""
    import numpy as np
    llm.reset()
    got = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        got.append(tok)
        if tok in stops or len(got) >= max_new:
            break
    llm.reset()
    llm.eval(ref_seq)
    return got, np.array(llm.scores[:len(ref_seq)])


def _judge(target: str, agrees: list[float], diffs: list[float], stops: list[bool],
           ties: Optional[list[bool]] = None) -> Result:
    """ties: per prompt, whether its answer first differs at a near-tie (then it counts as agreeing)."""
    kind = target if target in THRESHOLDS else "server"
    min_agree, max_diff = THRESHOLDS[kind]
    agree = sum(agrees) / len(agrees)
    judged = sum(1.0 if tie else a for a, tie in zip(agrees, ties)) / len(agrees) if ties else agree
    diff = max(diffs) if diffs else None
    ok = (min_agree is None or judged >= min_agree) and (max_diff is None or diff is None or diff <= max_diff)
    if min_agree is not None:
        ok = ok and all(stops)
    return Result(target, agree, diff, all(stops), ok, kind, near_ties=sum(ties) if ties is not None else None)


def verify(run_dir: Path, url: Optional[str] = None, model_name: Optional[str] = None,
           prompts: list[str] = PROMPTS, max_new: int = 32) -> list[Result]:
    import torch
    from transformers import AutoModelForCausalLM

    from kit.eval.infer import load_adapter_model, on_gpu
    run = RunDir(Path(run_dir))
    llama_cpp = load_llama_cpp(f"kit verify of {run.path}'s GGUF exports") if run.gguf_files() else None
    ref_model, tok = load_adapter_model(run.path)
    stops, pad = chat_format(tok).stop_ids, tok.pad_token_id  # the run's chat format
    refs = []
    for p in prompts:
        ids = prompt_ids(tok, p)
        refs.append(Reference(ids, *hf_run(ref_model, ids, max_new, stops, pad), stops))
    results = []
    if (run.merged16 / "config.json").is_file():
        m = AutoModelForCausalLM.from_pretrained(run.merged16, dtype=torch.float32, **on_gpu(str(run.merged16))).eval()
        results.append(_compare("merged16", refs, lambda ids, seq: hf_run(m, ids, max_new, stops, pad, seq)))
        del m  # its memory, before the GGUF files and the server's answers
    for gguf_file in run.gguf_files():
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=1024, logits_all=True, verbose=False)
        results.append(_compare(gguf_file.parent.name, refs,
                                lambda ids, seq, llm=llm: gguf_run(llm, ids, max_new, seq, stops)))
    if url:
        with ref_model.disable_adapter():  # the base alone: what the adapter changes
            bases = [Reference(r.ids, *hf_run(ref_model, r.ids, max_new, stops, pad), stops) for r in refs]
        results += _server(url, model_name, tok, prompts, refs, bases, max_new)
    return results


def _compare(target: str, refs: list[Reference], run_one) -> Result:
    """run_one(prompt ids, reference sequence) -> (greedy continuation, logits over the reference sequence)."""
    agrees, diffs, stops = [], [], []
    for r in refs:
        got, lg = run_one(r.ids, r.ids + r.continuation)
        agrees.append(agreement(r.continuation, got))
        diffs.append(float(abs(lg - r.logits).max()))
        stops.append(got[-1] in r.stops or r.continuation[-1] not in r.stops)
    return _judge(target, agrees, diffs, stops)


def _tie_aware(ref: Reference, got: list[int]) -> tuple[float, bool]:
    """(agreement of a server's answer with the reference's text, whether it parts from it at a near-tie: its
    token there, or its stop, scored within TIE_NATS of the reference's)."""
    text = _text(ref.continuation, ref.stops)
    n = matched(text, got)
    if n == len(text) and (text or not got):
        return 1.0, False
    return (n / len(text) if text else 0.0), ref.near_tie(n, got[n] if n < len(got) else None)


def _server(url, model_name, tok, prompts, refs: list[Reference], bases: list[Reference], max_new) -> list[Result]:
    """The server's answers against the reference; for an adapter, also against the server's base."""
    import openai
    api = Api(v1(url), env.api_key())
    served = {m["id"]: m for m in api.models()}
    if model_name not in served:
        raise ServerError(f"{api.url} serves no model named {model_name}; it serves: {', '.join(served)}.")
    client = openai.OpenAI(base_url=api.url, api_key=api.key or "none")

    def answer(model: str, prompt: str) -> Answer:
        return served_answer(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_new,
            extra_body={"return_token_ids": True}), tok)

    agrees, ties, stops, answers = [], [], [], []
    for p, ref in zip(prompts, refs):
        a = answer(model_name, p)
        agree, tie = _tie_aware(ref, a.tokens)
        agrees.append(agree)
        ties.append(tie)
        stops.append(a.stopped or ref.continuation[-1] not in ref.stops or tie)  # a tie may run on
        answers.append(a)
    result = _judge(f"server:{model_name}", agrees, [], stops, ties)
    template = _template_problem(answers, refs)
    base = served[model_name].get("parent")
    if base is None:  # a base or merged model: no adapter to tell apart
        if not result.passed:
            result.problem = template
        return [result]
    served_base = [answer(base, p).tokens for p in prompts]
    changed = [i for i, (r, b) in enumerate(zip(refs, bases))
               if _text(r.continuation, r.stops) != _text(b.continuation, b.stops)]
    share = sum(answers[i].tokens != served_base[i] for i in changed) / len(changed) if changed else 0.0
    effect = Result(f"server:{model_name} vs base", share, None, None,
                    bool(changed) and share >= THRESHOLDS["adapter effect"][0], "adapter effect")
    base_agreement = sum(1.0 if tie else a for a, tie in map(_tie_aware, bases, served_base)) / len(refs)
    for r in (result, effect):
        if not r.passed:
            r.problem = template or _cause(model_name, base, bool(changed), base_agreement, share,
                                           all(a.prompt is not None for a in answers))
    return [result, effect]


@dataclass
class Answer:
    """A server's greedy answer to one prompt."""
    tokens: list[int]
    """Its tokens, without a stop token: the server's own ids where it returns them (vLLM does, asked with
    return_token_ids), else its text re-encoded, which can cut the text into other tokens than the model chose
    (a random or undertrained model's runs of spaces, for one) and so part from the reference where it did not."""
    stopped: bool
    """It ended at a stop token, not at max_tokens."""
    prompt: Optional[list[int]]
    """The prompt's ids as the server rendered its chat template (vLLM), None where the server does not say."""


def served_answer(response, tok) -> Answer:
    """An OpenAI chat completion as an Answer (vLLM's token ids are extra fields of the response)."""
    choice = response.choices[0]
    ids = getattr(choice, "token_ids", None)
    tokens = (_text(ids, chat_format(tok).stop_ids) if ids is not None
              else tok.encode(choice.message.content or "", add_special_tokens=False))
    return Answer(tokens, choice.finish_reason == "stop", getattr(response, "prompt_token_ids", None))


def _template_problem(answers: list[Answer], refs: list[Reference]) -> Optional[str]:
    """The cause, when the server rendered a prompt otherwise than training's template (the reference's ids)."""
    for served, local in ((a.prompt, r.ids) for a, r in zip(answers, refs)):
        if served is not None and served != local:
            n = matched(local, served)
            return (f"the server renders the chat prompt otherwise than training: its prompt ids part from the "
                    f"trained template's at token {n} of {len(local)} (server {served[n:n + 4]}, trained "
                    f"{local[n:n + 4]}). It serves another chat template; kit serve passes the adapter's tokenizer, "
                    "with the template trained on: serve it with kit serve RUN_DIR, or pass that template to your "
                    "server.")
    return None


def _text(continuation: list[int], stops: Sequence[int]) -> list[int]:
    """A greedy continuation as a server returns it: its text's tokens, without the stop token."""
    return [t for t in continuation if t not in stops]


def _cause(name: str, base: str, changes_locally: bool, base_agreement: float, share: float,
           template_checked: bool) -> str:
    """The likely cause of a served adapter that disagrees with base + adapter, or changes nothing;
    template_checked: the server rendered every prompt as training did (else _template_problem names that)."""
    if not changes_locally:
        return ("the adapter changes none of these answers, even locally (base + adapter answers as the base alone): "
                "its lora_B weights are zero or nearly so, i.e. untrained (LoRA starts with lora_B = 0). Check the "
                "run's loss (metrics.jsonl) and that adapter/ was saved after training.")
    if base_agreement < THRESHOLDS["server"][0]:
        if template_checked:
            return (f"the server's base model ({base}) answers unlike the local base, on prompts it rendered as "
                    "training did: it is another base than the one the adapter was trained on. Serve it with: "
                    "kit serve RUN_DIR.")
        return (f"the server's base model ({base}) answers unlike the local base: it is another base than the one "
                "the adapter was trained on, or the server renders another chat template than training (kit serve "
                "passes the adapter's tokenizer, with the template trained on). Serve it with: kit serve RUN_DIR.")
    if share < THRESHOLDS["adapter effect"][0]:
        return (f"vLLM serves {name} but answers as its base does: it did not apply the adapter's weights. Likely "
                "their names: vLLM matches base_model.model.model.layers.N.<projection>.lora_A/lora_B and skips "
                "other module-name prefixes. Re-save the adapter with PEFT, or serve the merged export (kit export "
                "RUN_DIR --to merged16, then kit serve RUN_DIR --merged).")
    return (f"vLLM applies {name}, but its answers are not base + adapter's: part of the adapter is applied otherwise "
            "than by PEFT (module names vLLM does not match for some projections, or the scaling: lora_alpha, "
            "use_rslora), or the server quantizes the weights (kit serve --fp8).")


def table(results: list[Result]) -> str:
    rows = [("target", "token agreement", "first differs at a near-tie", "max |Δlogit|", "stops", "threshold",
             "verdict")]
    for r in results:
        a, d = THRESHOLDS[r.kind]
        thr = ", ".join(x for x in [f">= {a:.0%}" if a is not None else "", f"<= {d}" if d is not None else ""] if x)
        rows.append((r.target, f"{r.agreement:.0%}", "-" if r.near_ties is None else str(r.near_ties),
                     "-" if r.max_logit_diff is None else f"{r.max_logit_diff:.4f}",
                     {True: "yes", False: "no", None: "-"}[r.stopped], thr or "reported only",
                     "ok" if r.passed else "DISAGREES"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines + [f"{r.target}: {r.problem}" for r in results if r.problem])


def add_arguments(p) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--url", help="also check a running OpenAI-compatible server (…/v1)")
    p.add_argument("--model", help="the served model or adapter name, with --url")
    p.add_argument("--prompt", action="append", help="a prompt to use (repeatable; default: a built-in set)")
    p.add_argument("--max-new-tokens", type=int, default=32)


def run_cli(args) -> int:
    if args.url and not args.model:
        print("error: --url needs --model (the served name, e.g. the run's folder name)", file=sys.stderr)
        return 2
    results = verify(args.run_dir, args.url, args.model, args.prompt or PROMPTS, args.max_new_tokens)
    if not results:
        print(f"error: {args.run_dir} has no exports to verify (kit export ...) and no --url.", file=sys.stderr)
        return 2
    print(table(results))
    return 0 if all(r.passed for r in results) else 1
