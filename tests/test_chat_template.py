"""jft.text.chat_template renders like transformers' apply_chat_template and contains
hostile code."""

from __future__ import annotations

import re

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
    # Everything the size limits intercept, at sizes real templates use.
    "operators, formatting and slices": (
        "{{ 'ab' * 3 }} {{ 3 * [1] }} {{ 2 ** 10 }} {{ 7 % 3 }} {{ 2 ** -1 }} {{ 3 * 4 + 1 }}"
        " {{ '%-5s|%05.1f|%*d' % ('a', 2.5, 4, 7) }} {{ '%(x)s' % {'x': 'y'} }}"
        " {{ '{0:>6}|{1!r}|{0:^5}'.format('b', 'c') }}"
        " {{ '{a}'.format_map({'a': 1}) }} {{ messages[1].content[:3] ~ messages[0].role[::-1] }}"
        " {{ 'x'.ljust(4) ~ '|' ~ 'a\tb'.expandtabs(4) ~ '-'.join(['p', 'q']) }}"
        " {{ messages[1]['content'].replace('l', 'L') }}"
    ),
    "filters that grow text": (
        "{{ 'a\nb'|indent(2, true) }} {{ ['x', 'y']|join(', ') }} {{ 'abc'|replace('b', 'BB') }}"
        " {{ 'ab'|center(6) }} {{ '%s-%s'|format('a', 'b') }} {{ 'a b c'|wordwrap(3) }}"
        " {{ messages[0]|tojson(indent=2) }} {{ messages|map(attribute='role')|join('/') }}"
        " {{ [1, 2, 3]|batch(2)|list }} {{ 'x&y'|e }} {{ [[1], [2, 3]]|sum(start=[]) }}"
    ),
    "blocks and macros": (
        "{% set seen %}{% for m in messages %}{{ m.role ~ ';' }}{% endfor %}{% endset %}{{ seen }}"
        "{% macro box(text) %}[{{ text }}{{ caller() if caller }}]{% endmacro %}"
        "{{ box(messages[0].role) }}{% call box('c') %}!{% endcall %}"
        "{% filter upper %}{{ messages[2].content }}{% endfilter %}"
        "{% set ns = namespace(all='') %}{% for m in messages %}"
        "{% set ns.all = ns.all + m.role[0] %}{% endfor %}{{ ns.all }} {{ messages }}"
    ),
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


# ---------------------------------------------------------------------------------------------
# Size limits

SOURCE = "/models/evil/chat_template.jinja"
BIG = "x" * 1000  # a literal, repeated by a loop to build the block below quickly


@pytest.mark.parametrize(
    "template, refusal",
    [
        ("{{ 'x' * 10**10 }}", r"str \* int would make 10000000000 characters"),
        ("{{ 10 ** (10 ** 10) }}", r"int \*\* int would make a 33219280949-bit integer"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}",
            r"str \+ str would make 16777216 characters",
        ),
        (
            "{% set ns = namespace(s='x' * 6000000) %}{% set ns.pair = [ns.s, ns.s] %}",
            r"namespace attribute 'pair' would make",
        ),
        (
            "{% set a %}{% for i in range(100000) %}{% for j in range(100000) %}" + BIG
            + "{% endfor %}{% endfor %}{% endset %}",
            r"a block's output would make 10001000 characters",
        ),
        ("{% for i in range(100000) %}" + BIG * 10 + "{% endfor %}", "the joined output"),
        ("{{ 'x'|center(10**10) }}", "the center filter was given 10000000000"),
        ("{{ 'x'.ljust(10**10) }}", r"str.ljust\(\) was given 10000000000"),
        ("{{ '%9999999999s' % 'x' }}", r"str % str would make 10000000011 characters"),
        ("{{ '%*s' % (9999999999, 'x') }}", "str % tuple would make"),
        ("{{ '{:>9999999999}'.format('x') }}", r"str.format\(\) would make"),
        ("{{ '{:>{w[0]}}'.format('x', w=[9999999999]) }}", r"str.format\(\) would make"),
        ("{{ ('x' * 1000000)|replace('x', 'x' * 100) }}", "the replace filter would make"),
        ("{{ ('x' * 1000000).replace('', 'y' * 100) }}", r"str.replace\(\) would make"),
        ("{% set big = 'x' * 5000000 %}{{ [big, big, big]|join }}", "the join filter"),
        ("{{ ('y' * 5000000).join(['a', 'b', 'c']) }}", r"str.join\(\) would make"),
        ("{{ range(100000)|map('center', 9999999)|join }}", "the join filter"),
        ("{{ ('\\n' * 1000000)|indent(100, true, true) }}", "the indent filter would make"),
        ("{{ ('\\t' * 1000000).expandtabs(1000) }}", r"str.expandtabs\(\) would make"),
        ("{% set a = 'x' * 6000000 %}{% set b = a ~ a %}", "'~' concatenation would make"),
        ("{% set big = 'x' * 6000000 %}{{ [big, big] }}", "an output value would make"),
        ("{{ lipsum(9999999) }}", r"lipsum\(\) would make"),
        # Many values that are each under the limit: what a render builds is added up.
        (
            "{% macro f(n) %}{% set s = 'x' * 9999999 %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "brings all the render built to",
        ),
        (
            "{% macro f(s) %}{{ f(s[1:]) }}{% endmacro %}{{ f('x' * 9999999) }}",
            "a slice brings all the render built to",
        ),
    ],
)
def test_templates_that_build_too_much_fail_fast_with_one_line_naming_the_source(
    template, refusal
):
    with pytest.raises(JftError) as raised:
        render(template, MESSAGES, add_generation_prompt=False, bos_token=None, eos_token=None,
               source=SOURCE)
    message = str(raised.value)
    assert message.startswith(f"{SOURCE}: chat template exceeds what a render may build: ")
    assert re.search(refusal, message), message
    assert re.search(r"\(limit \d+ (characters|bits)\)$", message) and "\n" not in message


def test_growing_operators_are_not_folded_into_constants_at_compile_time():
    # Folding would compute 'x' * 10**10 while compiling, outside every check.
    code = chat_template._environment().compile("{{ 'ab' * 3 }}{{ 'x'|upper ~ 'y' }}", raw=True)
    assert "call_binop(context, '*', 'ab', 3)" in code
    assert "ababab" not in code and "'X'" not in code and "join_strings" in code


def test_other_errors_name_the_source_too():
    with pytest.raises(JftError, match=f"^{SOURCE}: chat template has a syntax error on line 1"):
        render("{% for %}", MESSAGES, add_generation_prompt=False, bos_token=None,
               eos_token=None, source=SOURCE)
    with pytest.raises(JftError, match=f"^{SOURCE}: chat template failed to render: boom$"):
        render("{{ raise_exception('boom') }}", MESSAGES, add_generation_prompt=False,
               bos_token=None, eos_token=None, source=SOURCE)


# ---------------------------------------------------------------------------------------------
# Roles


@pytest.mark.parametrize(
    "template, extra_roles",
    [
        ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", set()),
        ("{% for m in messages %}{% if m['role'] == 'ipython' %}x{% endif %}{% endfor %}",
         {"ipython"}),
        ("{% if 'context' == messages[0].role %}x{% endif %}", {"context"}),
        ("{% for m in messages %}{% if m.role not in ['tool_results', 'developer'] %}x"
         "{% endif %}{% endfor %}", {"tool_results", "developer"}),
        ("{{ messages|selectattr('role', 'equalto', 'function')|list|length }}", {"function"}),
        ("{% for m in messages %}{% if m.role is eq('observation') %}x{% endif %}{% endfor %}",
         {"observation"}),
        # Gemma's mapping: the role is renamed through a variable, then compared.
        ("{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else "
         "m['role'] %}{% set r = role %}{% if r == 'model' %}x{% endif %}{% endfor %}",
         {"model"}),
        ("{% if messages[0]['content'] == 'not a role' %}x{% endif %}", set()),
        ("{% for %}", set()),  # a syntax error is reported by rendering
    ],
)
def test_template_roles_are_the_standard_ones_and_those_the_template_compares_with(
    template, extra_roles
):
    assert chat_template.template_roles(template) == {*chat_template.STANDARD_ROLES, *extra_roles}
