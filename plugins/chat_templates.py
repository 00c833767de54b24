"""Built-in chat templates for the LLaVA-1.6 language models, as the original LLaVA conversation formats
build them (``mistral_instruct``, ``llava_v1``, ``chatml_direct``).

They are Jinja sources over transformers' conversation format; each LLM preset names its template in its
``chat_template`` metadata. Within a turn, every image part becomes ``<image>\\n`` before the turn's text
(as llava-hf's templates and the original LLaVA do). A ``system`` message replaces the default system
prompt. The tokenizer adds BOS, so no template writes it.
"""

from __future__ import annotations

from llavakit.core.chat import ChatTemplate
from llavakit.core.hooks import hookimpl

# Renders one message's content: images first (one "<image>\n" each), then the text parts in order.
_CONTENT_MACRO = """\
{%- macro content_of(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}
{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

_SYSTEM = """\
{%- set ns = namespace(system=default_system) -%}
{%- for message in messages if message['role'] == 'system' -%}{%- set ns.system = content_of(message) -%}{%- endfor -%}
"""

_ROLE_CHECK = """\
{%- if message['role'] not in ('user', 'assistant', 'system') -%}
{{- raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') -}}
{%- endif -%}
"""

#: Llama-2 style ``[INST] … [/INST]`` (LLaVA's ``mistral_instruct``: empty system, sep "", sep2 "</s>").
MISTRAL = (
    _CONTENT_MACRO
    + "{%- set default_system = '' -%}\n"
    + _SYSTEM
    + """\
{%- set ns.first = true -%}
{%- for message in messages -%}
""" + _ROLE_CHECK + """\
{%- if message['role'] == 'user' -%}
{{- '[INST] ' -}}
{%- if ns.first and ns.system -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}
{{- content_of(message) + ' [/INST]' -}}
{%- set ns.first = false -%}
{%- elif message['role'] == 'assistant' -%}
{{- ' ' + content_of(message) + ' </s>' -}}
{%- endif -%}
{%- endfor -%}
"""
)

#: Vicuna v1 (LLaVA's ``llava_v1``: "USER: … ASSISTANT:", sep " ", sep2 "</s>").
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
VICUNA = (
    _CONTENT_MACRO
    + "{%- set default_system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}\n"
    + _SYSTEM
    + """\
{{- ns.system + ' ' -}}
{%- for message in messages -%}
""" + _ROLE_CHECK + """\
{%- if message['role'] == 'user' -%}
{{- 'USER: ' + content_of(message) + ' ' -}}
{%- elif message['role'] == 'assistant' -%}
{{- 'ASSISTANT: ' + content_of(message) + '</s>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""
)

#: ChatML with the "Answer the questions." system turn (LLaVA's ``chatml_direct``, used by llava-v1.6-34b).
CHATML_34B = (
    _CONTENT_MACRO
    + "{%- set default_system = 'Answer the questions.' -%}\n"
    + _SYSTEM
    + """\
{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>' -}}
{%- for message in messages -%}
""" + _ROLE_CHECK + """\
{%- if message['role'] != 'system' -%}
{{- '<|im_start|>' + message['role'] + '\\n' + content_of(message) + '<|im_end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""
)

BUILTIN_TEMPLATES: tuple[ChatTemplate, ...] = (
    ChatTemplate(
        name="mistral",
        source=MISTRAL,
        description="[INST] … [/INST] (llava-v1.6-mistral-7b, LLaVA's mistral_instruct)",
    ),
    ChatTemplate(
        name="vicuna",
        source=VICUNA,
        description="Vicuna v1 USER:/ASSISTANT: with the curious-human system prompt (llava-v1.6-vicuna, llava_v1)",
    ),
    ChatTemplate(
        name="chatml-34b",
        source=CHATML_34B,
        stop_strings=("<|im_end|>",),
        description="ChatML with the 'Answer the questions.' system turn (llava-v1.6-34b, chatml_direct)",
    ),
)


@hookimpl
def register_chat_templates(register):
    for template in BUILTIN_TEMPLATES:
        register(template.name, template, description=template.description)
