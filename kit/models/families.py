"""Chat families: one table row per chat format the kit knows, each fact of a family defined once.

A family gives the Jinja chat template the kit installs in the tokenizers it saves, the token that ends every
turn (the last token an answer trains on), the stop tokens, the pad candidates, whether it has a system role,
and its Ollama Modelfile template. `detect` picks the family from a tokenizer's own template or vocabulary;
a template the kit does not know is kept as it is (family `custom`, see kit.models.template).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kit.models.llama import EOM, EOS, EOT, PAD, SYSTEM_PREAMBLE, header


def _jinja(text: str) -> str:
    return "'" + text.replace("\n", "\\n") + "'"


# The system turn, when a family has none, is folded into the first user turn as Gemma's and Mistral's own
# templates do.
_FOLD_SYSTEM = ("{%- if messages and messages[0]['role'] == 'system' %}"
                "{%- set first = messages[0]['content'] | trim + '\\n\\n' %}{%- set messages = messages[1:] %}"
                "{%- else %}{%- set first = '' %}{%- endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    template: str
    """The Jinja chat template (Hugging Face's apply_chat_template, vLLM and llama.cpp read it)."""
    end_of_turn: str
    """Closes every turn: the last token an answer trains on, and the tokenizer's eos."""
    stops: tuple[str, ...]
    """Generation ends at any of these that the vocabulary has."""
    pads: tuple[str, ...]
    """Pad token candidates, in order; the first one the vocabulary has is used."""
    marker: str
    """Text that only this family's templates and vocabularies hold."""
    system_role: bool
    modelfile: str
    """Ollama's TEMPLATE (Go syntax)."""
    bos: Optional[str] = None
    """The text every conversation starts with, where the family has one."""
    marker_token: bool = True
    """Whether every vocabulary of the family holds the marker as one token (Mistral v0.1/v0.2 write [INST] as
    text)."""
    unlike: tuple[str, ...] = ()
    """Text of another format that shares the marker: a template holding it is not this family's."""

    @property
    def tokens(self) -> tuple[str, ...]:
        """The tokens every tokenizer of the family has: one that lacks any is not of the family."""
        return (self.marker, self.end_of_turn) if self.marker_token else (self.end_of_turn,)


LLAMA3 = Family(
    name="llama3", title="Llama 3.x",
    template=(
        "{{- bos_token }}"
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
        "{%- else %}{%- set system_message = '' %}{%- endif %}"
        "{{- " + _jinja(header("system")) + " }}"
        "{{- " + _jinja(SYSTEM_PREAMBLE) + " }}"
        "{{- system_message }}{{- " + _jinja(EOT) + " }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
        + _jinja(EOT) + " }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- " + _jinja(header("assistant")) + " }}{%- endif %}"),
    end_of_turn=EOT, stops=(EOS, EOM, EOT), pads=(PAD,), marker="<|start_header_id|>", system_role=True,
    modelfile=(f"{header('system')}{SYSTEM_PREAMBLE}{{{{ if .System }}}}{{{{ .System }}}}{{{{ end }}}}{EOT}"
               f"{{{{ range .Messages }}}}{header('{{ .Role }}')}{{{{ .Content }}}}{EOT}{{{{ end }}}}"
               f"{header('assistant')}"),
    bos="<|begin_of_text|>")

CHATML = Family(
    name="chatml", title="ChatML (SmolLM2, Qwen 2.5/3 without thinking)",
    template=(
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    end_of_turn="<|im_end|>", stops=("<|im_end|>", "<|endoftext|>"), pads=("<|endoftext|>", "<|pad|>"),
    marker="<|im_start|>", system_role=True,
    modelfile=("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"))

GEMMA3 = Family(
    name="gemma3", title="Gemma 3",
    template=(
        "{{- bos_token }}" + _FOLD_SYSTEM +
        "{%- for message in messages %}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim"
        " + '<end_of_turn>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"),
    end_of_turn="<end_of_turn>", stops=("<end_of_turn>", "<eos>"), pads=("<pad>",), marker="<start_of_turn>",
    system_role=False,
    modelfile=("{{ range $i, $m := .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model"
               "{{ else }}user{{ end }}\n{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}"
               "<end_of_turn>\n{{ end }}<start_of_turn>model\n"),
    bos="<bos>")

MISTRAL = Family(
    name="mistral", title="Mistral",
    template=(
        "{{- bos_token }}" + _FOLD_SYSTEM +
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- '[INST] ' + (first if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
        "{%- endfor %}"),
    end_of_turn="</s>", stops=("</s>",), pads=("<pad>", "[control_8]", "<unk>"), marker="[INST]",
    system_role=False,
    modelfile=("{{ range $i, $m := .Messages }}{{ if eq .Role \"user\" }}[INST] "
               "{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }} [/INST]"
               "{{ else }} {{ .Content }}</s>{{ end }}{{ end }}"),
    bos="<s>", marker_token=False, unlike=("<<SYS>>",))  # Llama 2's [INST] format: its own template is kept

FAMILIES = {f.name: f for f in (LLAMA3, CHATML, GEMMA3, MISTRAL)}
CUSTOM = "custom"  # a tokenizer's own template the kit does not know (kit.models.template)


def by_template(template: Optional[str]) -> Optional[Family]:
    """The family whose marker the template holds (None: no template, or one the kit does not know)."""
    return next((f for f in FAMILIES.values()
                 if template and f.marker in template and not any(t in template for t in f.unlike)), None)


def by_vocabulary(vocab: dict[str, int]) -> Optional[Family]:
    """The family whose marker token the vocabulary holds (a tokenizer saved without a template)."""
    return next((f for f in FAMILIES.values() if f.marker in vocab), None)
