"""jft.text.chat_template renders like transformers' apply_chat_template and contains
hostile code."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from jft.errors import JftError
from jft.text import chat_template
from jft.text.chat_template import render

MESSAGES = [
    {"role": "system", "content": "Be <b>brief</b> & kind."},
    {"role": "user", "content": "Héllo 🙂, what's 2+2?"},
    {"role": "assistant", "content": "  4  "},
    {"role": "user", "content": "Thanks!\nBye."},
]

TEMPLATES = {
    "indented blocks (trim_blocks, lstrip_blocks)": """
{% for message in messages %}
    {% if message['role'] == 'user' %}
        User: {{ message['content'] }}
    {% else %}
        {{ message['role'] | capitalize }}: {{ message['content'] | trim }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    Assistant:
{% endif %}
""",
    "tojson keeps html and unicode": (
        "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2, sort_keys=true) }}"
    ),
    "loop controls": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.content }}|{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
    ),
    "namespace": (
        "{% set ns = namespace(count=0) %}{% for m in messages %}"
        "{% if m.role == 'user' %}{% set ns.count = ns.count + 1 %}{% endif %}{% endfor %}"
        "{{ ns.count }} user turns"
    ),
    "generation block": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "[{{ m.content }}]{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    ),
    "special tokens, tools and documents": (
        "{{ bos_token }}{% if tools is not none %}tools!{% endif %}"
        "{% if documents is not none %}documents!{% endif %}"
        "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    ),
    "dict helper": "{{ dict(a=1, b=[1, 2]) | tojson }} {{ dict.fromkeys(['x', 'y'], 0) | tojson }}",
    "strftime_now": "{{ strftime_now('%Y') }}",
}


@pytest.fixture(scope="module")
def reference() -> PreTrainedTokenizerFast:
    """A transformers tokenizer with a tiny vocabulary: only its template rendering is used."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def reference_render(reference, template, messages, add_generation_prompt, **extra) -> str:
    return reference.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def ours(template, messages, add_generation_prompt, **extra) -> str:
    return render(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        **extra,
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_matches_transformers_apply_chat_template(reference, name, add_generation_prompt):
    template = TEMPLATES[name]
    expected = reference_render(reference, template, MESSAGES, add_generation_prompt)
    assert ours(template, MESSAGES, add_generation_prompt) == expected


def test_extra_variables_reach_the_template_like_transformers(reference):
    template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0].content }}"
    expected = reference_render(reference, template, MESSAGES, True, enable_thinking=True)
    assert (
        ours(template, MESSAGES, True, enable_thinking=True)
        == expected
        == "<think>" + (MESSAGES[0]["content"])
    )


def test_none_valued_message_keys_are_dropped_like_transformers(reference):
    template = (
        "{% for m in messages %}{{ m.role }}:"
        "{% if 'content' in m %}{{ m.content }}{% else %}(no content){% endif %};{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    expected = reference_render(reference, template, messages, False)
    assert ours(template, messages, False) == expected == "user:hi;assistant:(no content);"


def test_objects_in_messages_render_as_inert_placeholders_like_transformers(reference):
    class Secret:
        def delete_everything(self) -> None:
            raise AssertionError("the template reached the object")

    template = "{{ messages[0].content }} {{ messages[0].content.delete_everything }}"
    messages = [{"role": "user", "content": Secret()}]
    expected = reference_render(reference, template, messages, False)
    assert ours(template, messages, False) == expected == "<Secret> "


def test_missing_special_tokens_render_as_nothing(reference):
    template = "[{{ bos_token }}]{{ messages[0].content }}"
    rendered = render(
        template, MESSAGES, add_generation_prompt=False, bos_token=None, eos_token=None
    )
    assert rendered == "[]" + MESSAGES[0]["content"]


def test_raise_exception_becomes_one_line_jft_error():
    template = "{{ raise_exception('Conversation roles must alternate\\nuser/assistant') }}"
    with pytest.raises(JftError, match="roles must alternate user/assistant") as raised:
        ours(template, MESSAGES, True)
    assert "\n" not in str(raised.value)


def test_syntax_error_becomes_one_line_jft_error_naming_the_line():
    with pytest.raises(JftError, match="syntax error on line 2") as raised:
        ours("ok\n{% for m in messages %}{{ m.content }}", MESSAGES, True)
    assert "\n" not in str(raised.value)


def test_undefined_method_call_becomes_jft_error():
    with pytest.raises(JftError, match="chat template failed to render"):
        ours("{{ messages[0].content.no_such_method() }}", MESSAGES, True)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
        "{{ strftime_now.__globals__['datetime'] }}",
        "{% set items = [] %}{{ items.append(1) }}",
        "{% set ns = namespace(_private=1) %}{{ ns._private }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_refuses_escape_attempts_with_jft_error(template):
    with pytest.raises(JftError, match="unsafe|may not start with an underscore"):
        ours(template, MESSAGES, True)


def test_templates_are_compiled_once():
    template = "{{ messages | length }} cached"
    assert chat_template._compile(template) is chat_template._compile(template)
    assert ours(template, MESSAGES, True) == "4 cached"
