"""Chat templates: untrusted Jinja programs, rendered the way transformers renders them.

A template comes with the checkpoint, so it is treated as hostile code: it runs in Jinja's immutable
sandbox and only ever sees plain JSON-like data. The environment mirrors transformers'
(`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML), so a template renders here exactly as it does there. What a render
may build is bounded too (`jft.text.template_limits`): a template cannot exhaust memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jft.errors import JftError
from jft.text.template_limits import (
    BoundedSandbox,
    TooLarge,
    bound,
    check_length,
    check_size,
    rendering,
)

# Roles every chat dataset may use, whether or not a template mentions them.
STANDARD_ROLES = ("system", "user", "assistant", "tool")

# What a broken template, or messages it cannot handle, raise while rendering; others are bugs.
_RENDER_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    RecursionError,
)


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    source: str | None = None,
    **extra: Any,
) -> str:
    """Renders `messages` with a chat template; a broken or hostile template raises `JftError`.

    `source` names where the template came from (a file, a GGUF key) in those errors. Special
    tokens that are None stay undefined in the template, as in transformers, so that
    `{{ bos_token }}` renders as nothing rather than as "None".
    """
    where = f"{source}: " if source else ""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as error:
        raise JftError(
            f"{where}chat template has a syntax error on line {error.lineno}: {_one_line(error)}"
        ) from None
    special_tokens = {"bos_token": bos_token, "eos_token": eos_token}
    context = {
        # Templates test `tools is not none`, which an undefined name would pass.
        "tools": None,
        "documents": None,
        **{name: token for name, token in special_tokens.items() if token is not None},
        **_plain(extra),
        "messages": [_without_none_values(message) for message in messages],
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        with rendering():
            return compiled.render(**context)
    except TooLarge as error:
        raise JftError(f"{where}chat template exceeds what a render may build: {error}") from None
    except _RENDER_ERRORS as error:
        raise JftError(f"{where}chat template failed to render: {_one_line(error)}") from error


@lru_cache(maxsize=32)
def template_roles(template: str) -> frozenset[str]:
    """The message roles `template` knows: the standard chat roles, and every role name it
    compares a message's role with (`message['role'] == 'ipython'`, `message.role in [...]`,
    `selectattr('role', 'eq', ...)`, also through a variable set from the role).

    A template that does not name a role still renders it, usually as plain text, so a role
    outside this set is almost surely a typo in the data.
    """
    try:
        tree = _environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return frozenset(STANDARD_ROLES)  # rendering reports the error, naming the template
    role_names: set[str] = set()
    while True:  # names set from a role, or from a name set from one, until no more appear
        found = {
            node.target.name
            for node in tree.find_all(nodes.Assign)
            if isinstance(node.target, nodes.Name) and _is_role(node.node, role_names)
        }
        if found <= role_names:
            break
        role_names |= found
    roles = set(STANDARD_ROLES)
    for compare in tree.find_all(nodes.Compare):
        operands = [compare.expr, *(operand.expr for operand in compare.ops)]
        for left, operand, right in zip(operands[:-1], compare.ops, operands[1:], strict=True):
            if operand.op in ("eq", "ne"):
                for role, other in ((left, right), (right, left)):
                    if _is_role(role, role_names):
                        roles |= _strings(other)
            elif operand.op in ("in", "notin") and _is_role(left, role_names):
                roles |= _strings(right)
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        args = node.args
        if node.name in ("selectattr", "rejectattr") and len(args) == 3:
            if isinstance(args[0], nodes.Const) and args[0].value == "role":
                roles |= _strings(args[2])
        elif node.name in ("eq", "equalto", "==", "sameas", "ne", "!=", "in") and args:
            if _is_role(node.node, role_names):
                roles |= _strings(args[0])
    return frozenset(roles)


def _is_role(node: nodes.Node | None, role_names: set[str]) -> bool:
    while isinstance(node, nodes.Filter) and node.node is not None:  # message.role | lower
        node = node.node
    if isinstance(node, nodes.CondExpr):  # 'model' if m.role == 'assistant' else m.role
        return _is_role(node.expr1, role_names) or _is_role(node.expr2, role_names)
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "role"
    if isinstance(node, nodes.Getattr):
        return node.attr == "role"
    return isinstance(node, nodes.Name) and node.name in role_names


def _strings(node: nodes.Node) -> set[str]:
    """The string constants `node` is: one, or those of a literal list or tuple."""
    items = node.items if isinstance(node, nodes.List | nodes.Tuple) else [node]
    return {
        item.value
        for item in items
        if isinstance(item, nodes.Const) and isinstance(item.value, str)
    }


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


class _Sandbox(BoundedSandbox):
    """Jinja's immutable sandbox, bounded (`template_limits`), and failing loudly on unsafe
    attribute access: Jinja's own sandbox answers an undefined value that renders as "", so an
    escape attempt would pass silently; an error tells the user the template is hostile or
    broken."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe"
        )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    environment = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    bound(environment)
    return environment


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks.

    transformers uses it to find assistant tokens; rendering only needs the body, unchanged.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    check_length(32 * len(format), "strftime_now()")  # "%c" is 24 characters
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type."""

    template_name = "dict"

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses underscore names, the way into Python internals, and
    values over the size limit, which a loop doubling an attribute would soon reach."""

    template_name = "namespace"

    # No named `self`, like Jinja's own signature, so that `namespace(self=...)` still works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        namespace, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name, value in attributes.items():
            _TemplateNamespace._check(name, value)
        jinja2.utils.Namespace.__init__(namespace, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name, value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a namespace attribute may not start with an underscore, got {name!r}"
            )
        check_size(value, f"namespace attribute {name!r}")


def _without_none_values(message: Mapping[str, Any]) -> dict:
    # Chat APIs send `content=None` or `tool_calls=None`; templates handle a missing key but would
    # print "None". transformers drops these keys too.
    return _plain({key: value for key, value in message.items() if value is not None})


def _plain(value: Any) -> Any:
    """The value rebuilt from plain JSON types, so templates cannot reach any object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


def _one_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return " ".join(message.split())
