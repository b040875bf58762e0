"""Chat families (issue 25): each family the kit knows (kit.models.families) is picked from a tokenizer's own chat
template or, without one, from its vocabulary; the kit installs the family's template, the end-of-turn token as
eos and a pad token the vocabulary has, and trains each assistant answer and its end-of-turn token, nothing else,
token by token. A template the kit does not know is kept as it is; a tokenizer that shows no family, or a family
its vocabulary lacks, is refused naming model.chat_template.

The tokenizers are built here, a few KB each: a BPE trained in memory on a few sentences (Korean among them) with
the family's special tokens, pre-tokenized as the family's own tokenizers are (byte-level BPE for Llama 3 and
ChatML, SentencePiece-style for Gemma and Mistral), carrying the family's real upstream chat template."""
import logging

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

from kit.config.load import load_config
from kit.core.errors import ConfigError
from kit.data.load import tokenize
from kit.models.families import CUSTOM, FAMILIES
from kit.models.template import install, layout, render
from tests.helpers import run_recipe

# ---------------------------------------------------------------- the families' own templates, as published

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# HuggingFaceTB/SmolLM2-135M-Instruct (the template kit:smollm2 carries), with its default system prompt
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

# google/gemma-3-*-it, tokenizer_config.json
GEMMA3_IT = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# mistralai/Mistral-7B-Instruct-v0.2 (as llama.cpp's tests/test-chat-template.cpp carries it); its vocabulary has
# no [INST] token: the template writes it as text
MISTRAL_V02 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501 (the template as published)

# meta-llama/Llama-2-7b-chat-hf: [INST] as Mistral writes it, but another format (<<SYS>>, a bos every turn)
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# a format no family has: kept as it is
CUSTOM_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")

# ---------------------------------------------------------------- KB-sized tokenizers

CONVERSATION = [
    {"role": "system", "content": "친절하게 답하세요."},
    {"role": "user", "content": "1 더하기 1은 무엇인가요?"},
    {"role": "assistant", "content": "2입니다."},
    {"role": "user", "content": "고마워요!"},
    {"role": "assistant", "content": "천만에요. 또 물어보세요."},
]
CORPUS = [m["content"] for m in CONVERSATION] + [
    "You are a helpful assistant.", "Hello there, how are you today?", "I am fine, thank you.",
    "오늘 날씨가 좋네요. 산책하러 갈까요?", "system user model assistant ### System: User: Assistant: [INST] [/INST]"]

# Llama 3's split pattern (tiktoken's cl100k), before its byte-level BPE
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe(specials: list[str], kind: str) -> Tokenizer:
    """A BPE trained on CORPUS, `specials` its first ids: 'llama3' (Llama 3's split, byte-level), 'bytes'
    (GPT-2's byte-level, digits apart: SmolLM2, Qwen), 'sentencepiece' (a leading ▁: Mistral) or 'gemma'
    (spaces as ▁, none added)."""
    tok = Tokenizer(models.BPE())
    if kind in ("llama3", "bytes"):
        split = (pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated") if kind == "llama3"
                 else pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=kind == "bytes")])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if kind == "sentencepiece" else "never")
        tok.decoder = decoders.Metaspace(prepend_scheme="first" if kind == "sentencepiece" else "never")
        alphabet = sorted(set("".join(CORPUS)) | {"\n", "▁"})
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    return tok


LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|finetune_right_pad_id|>"]
# name: (family, special tokens, pre-tokenizer, the published template, the tokenizer's own bos/eos/unk/pad)
TOKENIZERS = {
    "llama3": ("llama3", LLAMA3_TOKENS, "llama3", LLAMA3_INSTRUCT,
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
    "smollm2": ("chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bytes", SMOLLM2,
                dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                     pad_token="<|im_end|>")),
    "gemma3": ("gemma3", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "gemma",
               GEMMA3_IT, dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")),
    # v0.3's vocabulary ([INST] and [/INST] tokens) under v0.2's template (v0.3's own, with tools, also writes [INST])
    "mistral-v0.3": ("mistral", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "sentencepiece", MISTRAL_V02,
                     dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    "mistral-v0.2": ("mistral", ["<unk>", "<s>", "</s>"], "sentencepiece", MISTRAL_V02,
                     dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
}
BY_VOCABULARY = [name for name in TOKENIZERS if name != "mistral-v0.2"]  # [INST] is text there: no marker token


def _tokenizer(specials: list[str], kind: str, template=None, **roles) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, kind), chat_template=template, **roles)


def family_tokenizer(name: str, with_template: bool = True) -> PreTrainedTokenizerFast:
    _, specials, kind, template, roles = TOKENIZERS[name]
    return _tokenizer(specials, kind, template if with_template else None, **roles)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- detection

@pytest.mark.parametrize("name", TOKENIZERS)
def test_family_is_picked_from_the_tokenizers_own_template(name):
    family = FAMILIES[TOKENIZERS[name][0]]
    tok = family_tokenizer(name)
    chat = install(tok, "auto", name)
    assert chat.family == family.name
    assert tok.chat_template == chat.template == family.template  # the kit's template replaces the model's
    assert tok.eos_token == chat.end_of_turn == family.end_of_turn
    assert tok.convert_tokens_to_ids(family.end_of_turn) in chat.stop_ids
    assert family.bos is None or tok.bos_token == family.bos


@pytest.mark.parametrize("name", BY_VOCABULARY)
def test_family_is_picked_from_the_vocabulary_without_a_template(name):
    family = FAMILIES[TOKENIZERS[name][0]]
    tok = family_tokenizer(name, with_template=False)
    assert install(tok, "auto", name).family == family.name
    assert tok.chat_template == family.template and tok.eos_token == family.end_of_turn


def test_mistral_v02_writes_inst_as_text_and_is_mistral_by_its_template_or_when_named():
    """Mistral 7B Instruct v0.1/v0.2 have no [INST] token: their template shows the family; without it the
    vocabulary does not, and model.chat_template=mistral is accepted (its end of turn, </s>, is a token)."""
    assert install(family_tokenizer("mistral-v0.2"), "auto").family == "mistral"
    bare = family_tokenizer("mistral-v0.2", with_template=False)
    with pytest.raises(ConfigError, match="carries no chat template .* Set model.chat_template to one of llama3, "
                                          "chatml, gemma3, mistral"):
        install(bare, "auto")
    assert install(bare, "mistral").family == "mistral" and bare.eos_token == "</s>"


def test_llama2_template_shares_inst_but_is_not_mistral_and_is_kept():
    tok = _tokenizer(["<unk>", "<s>", "</s>"], "sentencepiece", LLAMA2_CHAT, bos_token="<s>", eos_token="</s>",
                     unk_token="<unk>")
    chat = install(tok, "auto", "llama-2")
    assert chat.family == CUSTOM and tok.chat_template == LLAMA2_CHAT and chat.end_of_turn == "</s>"


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_the_kits_template_writes_a_conversation_as_the_models_own_does(name):
    """ChatML and Gemma 3: a conversation with a system turn, rendered by the kit's template and by the model's,
    is the same text (SmolLM2's default system prompt stands only where a conversation has none)."""
    tok = family_tokenizer(name)
    own = render(tok, CONVERSATION)
    install(tok)
    assert render(tok, CONVERSATION) == own
    assert render(tok, CONVERSATION[:4], add_generation_prompt=True) == tok.apply_chat_template(
        CONVERSATION[:4], chat_template={"smollm2": SMOLLM2, "gemma3": GEMMA3_IT}[name], tokenize=False,
        add_generation_prompt=True)


# ---------------------------------------------------------------- rendering and masking, token by token

RENDERED = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              "Today Date: 26 Jul 2024\n\n친절하게 답하세요.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "1 더하기 1은 무엇인가요?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n2입니다.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n고마워요!<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n천만에요. 또 물어보세요.<|eot_id|>",
    "chatml": "<|im_start|>system\n친절하게 답하세요.<|im_end|>\n<|im_start|>user\n1 더하기 1은 무엇인가요?<|im_end|>\n"
              "<|im_start|>assistant\n2입니다.<|im_end|>\n<|im_start|>user\n고마워요!<|im_end|>\n"
              "<|im_start|>assistant\n천만에요. 또 물어보세요.<|im_end|>\n",
    # no system role: the system turn opens the first user turn; the assistant is 'model'
    "gemma3": "<bos><start_of_turn>user\n친절하게 답하세요.\n\n1 더하기 1은 무엇인가요?<end_of_turn>\n"
              "<start_of_turn>model\n2입니다.<end_of_turn>\n<start_of_turn>user\n고마워요!<end_of_turn>\n"
              "<start_of_turn>model\n천만에요. 또 물어보세요.<end_of_turn>\n",
    # no system role: the system turn opens the first [INST]
    "mistral": "<s>[INST] 친절하게 답하세요.\n\n1 더하기 1은 무엇인가요? [/INST] 2입니다.</s>[INST] 고마워요! [/INST] "
               "천만에요. 또 물어보세요.</s>",
}
# what opens an answer (tokenized on its own), and the text the template writes before the answer that is
# tokenized with it (Mistral's space: '▁2' is one token)
OPENS = {"llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", ""), "chatml": ("<|im_start|>assistant\n", ""),
         "gemma3": ("<start_of_turn>model\n", ""), "mistral": ("[/INST]", " ")}


def _find(ids: list[int], part: list[int], start: int) -> int:
    for i in range(start, len(ids) - len(part) + 1):
        if ids[i:i + len(part)] == part:
            return i
    raise AssertionError(f"{part} not found in {ids[start:]}")


def assert_only_answers_trained(tok, messages, end_of_turn: str, opens: str, lead: str = "") -> None:
    """kit.data.tokenize (responses_only) labels exactly each assistant answer's tokens and its end-of-turn
    token: located here independently, by tokenizing what opens an answer and the answer + end of turn apart."""
    ex = tokenize(messages, tok, max_len=1024, responses_only=True)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == _ids(tok, render(tok, messages))
    header, eot = _ids(tok, opens), tok.convert_tokens_to_ids(end_of_turn)
    expected, at = set(), 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        answer = _ids(tok, lead + m["content"] + end_of_turn)
        assert answer[-1] == eot and eot not in answer[:-1]
        at = _find(ids, header, at) + len(header)
        assert ids[at:at + len(answer)] == answer, tok.convert_ids_to_tokens(ids[at:])
        expected |= set(range(at, at + len(answer)))
        at += len(answer)
        if at < len(ids):  # what follows the end of turn (a line break, the next turn) is not trained
            assert labels[at] == -100
    trained = {i for i, label in enumerate(labels) if label != -100}
    shown = [(t, i in trained) for i, t in enumerate(tok.convert_ids_to_tokens(ids))]
    assert trained == expected, shown
    assert all(labels[i] == ids[i] for i in trained)
    assert len(expected) == sum(len(_ids(tok, lead + m["content"])) + 1 for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("name, with_template", [(n, True) for n in TOKENIZERS] + [(n, False) for n in BY_VOCABULARY],
                         ids=[f"{n}-template" for n in TOKENIZERS] + [f"{n}-vocabulary" for n in BY_VOCABULARY])
def test_only_assistant_answers_and_their_end_of_turn_carry_labels(name, with_template):
    family = FAMILIES[TOKENIZERS[name][0]]
    tok = family_tokenizer(name, with_template)
    chat = install(tok, "auto", name)
    assert render(tok, CONVERSATION) == RENDERED[family.name]
    if not family.system_role:
        assert "system" not in RENDERED[family.name]
    text, spans = layout(tok, CONVERSATION, chat.end_of_turn)
    assert [text[a:b] for a, b in spans] == [OPENS[family.name][1] + m["content"] + family.end_of_turn
                                             for m in CONVERSATION if m["role"] == "assistant"]
    assert_only_answers_trained(tok, CONVERSATION, chat.end_of_turn, *OPENS[family.name])


def test_template_the_kit_does_not_know_is_kept_said_and_trained_on_answers_and_eos(caplog):
    tok = _tokenizer(["<|endoftext|>"], "bytes", CUSTOM_TEMPLATE, eos_token="<|endoftext|>")
    with caplog.at_level(logging.INFO, logger="kit"):
        chat = install(tok, "auto", "my-model")
    assert chat.family == CUSTOM and tok.chat_template == CUSTOM_TEMPLATE and tok.eos_token == "<|endoftext|>"
    assert "the tokenizer's own (my-model); the kit does not know its family" in caplog.text
    assert "answers ending at <|endoftext|>" in caplog.text
    assert render(tok, CONVERSATION[:3]) == ("### System:\n친절하게 답하세요.\n\n"
                                             "### User:\n1 더하기 1은 무엇인가요?\n\n"
                                             "### Assistant:\n2입니다.<|endoftext|>\n\n")
    assert_only_answers_trained(tok, CONVERSATION, "<|endoftext|>", "### Assistant:\n")


# ---------------------------------------------------------------- pad

PADS = {"llama3": "<|finetune_right_pad_id|>", "smollm2": "<|endoftext|>", "gemma3": "<pad>", "mistral-v0.3": "<unk>",
        "mistral-v0.2": "<unk>"}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_pad_is_a_token_of_the_vocabulary_and_not_the_end_of_turn(name):
    tok = family_tokenizer(name)
    chat = install(tok)
    assert tok.pad_token == PADS[name] and tok.pad_token in tok.get_vocab()
    assert tok.pad_token != chat.end_of_turn and tok.padding_side == "right"


@pytest.mark.parametrize("specials, own_pad, family, pad", [
    # SmolLM2 pads with its end of turn; ChatML's <|endoftext|> is taken instead
    (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "chatml", "<|endoftext|>"),
    # none of the family's candidates: the tokenizer's own pad
    (["<|im_start|>", "<|im_end|>", "[PAD]"], "[PAD]", "chatml", "[PAD]"),
    # the tokenizer's own pad is no token of its vocabulary: not taken
    (["<|im_start|>", "<|im_end|>"], "[PAD]", "chatml", "<|im_end|>"),
    # Gemma without <pad>: its unk
    (["<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], None, "gemma3", "<unk>"),
    # Llama 3.0 (no <|finetune_right_pad_id|>) and nothing else: the end of turn, which labels never miss
    (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None,
     "llama3", "<|eot_id|>"),
], ids=["chatml-own-pad-is-end-of-turn", "own-pad", "own-pad-not-in-vocabulary", "gemma-unk", "only-end-of-turn"])
def test_pad_falls_back_to_tokens_the_vocabulary_has(specials, own_pad, family, pad):
    tok = _tokenizer(specials, "bytes")
    tok.pad_token = own_pad  # as the tokenizer's files may name it, in the vocabulary or not
    tok.unk_token = "<unk>" if "<unk>" in specials else None
    assert install(tok, family).family == family
    assert tok.pad_token == pad and pad in tok.get_vocab()
    # padded as kit.train.trainer batches (DataCollatorForSeq2Seq), the shorter example keeps its answers' labels
    short, long = (tokenize(c, tok, max_len=1024, responses_only=True) for c in (CONVERSATION[:3], CONVERSATION))
    short_labels = short["labels"]
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(
        [{k: e[k] for k in ("input_ids", "labels")} for e in (short, long)])
    n = len(short["input_ids"])
    assert batch["labels"][0].tolist() == short_labels + [-100] * (len(long["input_ids"]) - n)
    assert batch["input_ids"][0].tolist()[n:] == [tok.pad_token_id] * (len(long["input_ids"]) - n)
    assert tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn) in short_labels


# ---------------------------------------------------------------- refusals

def test_no_template_and_no_family_in_the_vocabulary_is_refused_naming_the_setting():
    tok = _tokenizer(["<|endoftext|>"], "bytes", eos_token="<|endoftext|>")
    with pytest.raises(ConfigError, match=r"the tokenizer of my-model carries no chat template and its vocabulary "
                                          r"shows no family the kit knows\. Set model.chat_template to one of llama3, "
                                          r"chatml, gemma3, mistral"):
        install(tok, "auto", "my-model")
    with pytest.raises(ConfigError, match="model.chat_template=tokenizer: the tokenizer of my-model carries no chat "
                                          "template"):
        install(tok, "tokenizer", "my-model")


@pytest.mark.parametrize("with_template", [True, False], ids=["template", "vocabulary"])
def test_a_family_the_vocabulary_lacks_is_refused_naming_the_mismatch(with_template):
    tok = family_tokenizer("smollm2", with_template)
    with pytest.raises(ConfigError, match=r"model.chat_template=gemma3: the tokenizer of smollm2 has no "
                                          r"'<start_of_turn>' token, so it is not a Gemma 3 model; its own template "
                                          r"looks like chatml\. Set model.chat_template=chatml\."):
        install(tok, "gemma3", "smollm2")
    assert tok.chat_template == (SMOLLM2 if with_template else None)  # nothing changed


def test_unknown_chat_template_setting_lists_the_choices():
    with pytest.raises(ConfigError, match=r"model.chat_template='nonsense': use one of auto, llama3, chatml, gemma3, "
                                          r"mistral, tokenizer\."):
        load_config(None, ["model.chat_template=nonsense"])


@pytest.mark.parametrize("setting, begins, ends", [
    ("gemma3", "error: model.chat_template=gemma3: the tokenizer of kit:smollm2 has no '<start_of_turn>' token, ",
     "so it is not a Gemma 3 model; its own template looks like chatml. Set model.chat_template=chatml."),
    ("nonsense", "error: override 'model.chat_template=nonsense': model.chat_template='nonsense': ",
     "use one of auto, llama3, chatml, gemma3, mistral, tokenizer."),
], ids=["gemma3", "nonsense"])
def test_recipe_with_a_chat_template_the_model_lacks_exits_2_before_the_run_directory(tmp_path, setting, begins, ends):
    """The real SmolLM2 (kit:smollm2, materialized once beside the Hugging Face cache) is ChatML."""
    res = run_recipe(["--config", "smollm2", f"model.chat_template={setting}", f"run.output_dir={tmp_path / 'runs'}"],
                     cwd=tmp_path, timeout=300, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert errors[0] == begins + ends, errors[0]
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else
