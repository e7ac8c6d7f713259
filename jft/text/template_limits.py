"""Limits on what a chat template's render may build.

Jinja's sandbox stops a template reaching Python, not one building values until the machine
runs out of memory (`{{ 'x' * 10**10 }}`). So every place a render makes something bigger than
its inputs is bounded, and checked before it allocates: no string, list or output over
`MAX_CHARS` characters (a container counted as the text it would print), no integer over
`MAX_INT_BITS` bits, and at most `MAX_BUILT_CHARS` characters built in all, which bounds many
values held at once (deep macro recursion, long chains of `{% set %}`). Real templates stay far
below these.

`BoundedSandbox` intercepts operators, calls, slices and `str.format`; its code generator sends
output buffers and `~` through bounded versions; `bound` wraps the filters and the joins; a
render runs inside `rendering()`, which keeps its running total.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import update_wrapper
from types import GeneratorType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum

MAX_CHARS = 10_000_000  # any one string, list or output a render builds, in characters
MAX_BUILT_CHARS = 10 * MAX_CHARS  # everything a render builds, added up
MAX_INT_BITS = 10_000
_SEQUENCES = (str, bytes, list, tuple)
# Characters built so far by the render in progress; None outside one, so that no filter runs
# at compile time, where Jinja would fold its result into constants that nothing bounds.
_built: ContextVar[list[int] | None] = ContextVar("chat_template_built", default=None)


@contextlib.contextmanager
def rendering() -> Iterator[None]:
    """The extent of one render, whose built characters add up against `MAX_BUILT_CHARS`."""
    budget = _built.set([0])
    try:
        yield
    finally:
        _built.reset(budget)


def bound(environment: BoundedSandbox) -> None:
    """Bounds `environment`'s joins, filters and `lipsum` (after its own filters are set)."""
    environment.concat = _bounded_join
    environment.finalize = _finalize
    for name, function in environment.filters.items():
        environment.filters[name] = _bounded_filter(name, function)
    environment.globals["lipsum"] = _lipsum


def check_size(value: Any, what: str) -> None:
    """Refuses a value larger than a render may build (e.g. set into a namespace)."""
    _check(_size(value), what)


def check_length(size: int, what: str) -> None:
    """Refuses, before it is built, a value of `size` characters."""
    _check(size, what)


class TooLarge(jinja2.exceptions.SecurityError):
    """A render would build more than the limits allow."""


def _check(size: int, what: str) -> None:
    """Refuses, before it is built, a value of `size` characters."""
    if size > MAX_CHARS:
        raise TooLarge(f"{what} would make {size} characters (limit {MAX_CHARS} characters)")


def _built_value(value: Any, what: str) -> Any:
    """`value`, just built, counted against the render's limits."""
    size = len(value) if type(value) is str else _size(value)
    _check(size, what)
    built = _built.get()
    if built is not None:
        built[0] += size
        if built[0] > MAX_BUILT_CHARS:
            raise TooLarge(
                f"{what} brings all the render built to {built[0]} characters "
                f"(limit {MAX_BUILT_CHARS} characters)"
            )
    return value


def _check_int_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise TooLarge(f"{what} would make a {bits}-bit integer (limit {MAX_INT_BITS} bits)")


def _size(value: Any, indent: int = 0) -> int:
    """About how many characters `str(value)` has, counting `indent` per nesting level and item
    (JSON or pprint); stops counting soon after passing `MAX_CHARS`.

    A container counts every item it references, so a list holding one long string many times
    is as large as the text it prints.
    """
    if isinstance(value, str):
        return len(value)
    total = 0
    pending = [(value, 0)]
    while pending and total <= MAX_CHARS:
        item, depth = pending.pop()
        total += 2 + indent * depth  # quotes, brackets or a separator; the indentation
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, bytes | bytearray):
            total += 4 * len(item)  # \xNN
        elif isinstance(item, bool | float) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, jinja2.Undefined):
            pass
        elif isinstance(item, jinja2.utils.Namespace):
            pending.append((item._Namespace__attrs, depth))
        elif isinstance(item, Mapping | list | tuple | set | frozenset):
            children = item.items() if isinstance(item, Mapping) else item
            for child in children:
                pending.append((child, depth + 1))
                total += 1
                if total > MAX_CHARS:
                    break
        else:
            total += 64  # a repr such as <Macro 'm'>
    return total


def _bounded_join(pieces: Iterable[Any]) -> str:
    """`environment.concat`: joins a render's output, a block `{% set %}`'s, a macro's."""
    parts, total = [], 0
    for piece in pieces:
        total += len(piece)
        if total > MAX_CHARS:
            _check(total, "the joined output")
        parts.append(piece)
    return _built_value("".join(parts), "the joined output")


class _OutputBuffer(list):
    """Where compiled code collects a block's, macro's or `{% set %}`'s output before joining
    it: bounded as it grows, since loops inside would fill it long before the join."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def append(self, piece: str) -> None:
        self._grow(len(piece))
        super().append(piece)

    def extend(self, pieces: Iterable[str]) -> None:
        pieces = tuple(pieces)
        self._grow(sum(map(len, pieces)))
        super().extend(pieces)

    def _grow(self, size: int) -> None:
        self.size += size
        _check(self.size, "a block's output")


class _CodeGenerator(CodeGenerator):
    """Jinja's compiler, with output buffers and `~` going through the bounded versions."""

    def buffer(self, frame: Any) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Getitem(self, node: nodes.Getitem, frame: Any) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        # Jinja writes a slice as Python's `value[a:b]`, which the sandbox never sees.
        self.write("environment.getitem(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
            self.write(", ")
        self.write("))")

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        # The `~` operator, which no binop hook sees.
        self.write("environment.join_strings((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, bounding what a render builds (the module docstring). The
    arithmetic that can grow a value is intercepted; Jinja then never folds it into a
    constant at compile time either. `bound` installs the rest (filters, joins, outputs)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+" and type(left) is str and type(right) is str:  # most of them
            _check(len(left) + len(right), "str + str")
            return _built_value(left + right, "str + str")
        what = f"{type(left).__name__} {operator} {type(right).__name__}"
        _check_binop(operator, left, right, what)
        result = self.binop_table[operator](left, right)
        # A number is bounded by its bits, checked above; only sequences count as built.
        return _built_value(result, what) if isinstance(result, _SEQUENCES) else result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        what = f"{_callable_name(__obj)}()"
        args, kwargs = _bounded_arguments(args, kwargs, what)
        _check(_call_size(__obj, args, kwargs), what)
        result = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        return _built_value(result, what)

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        # A slice copies; a deep recursion over slices would hold a copy per level.
        return _built_value(value, "a slice") if isinstance(argument, slice) else value

    def wrap_str_format(self, value: Any) -> Any:
        format = super().wrap_str_format(value)
        if format is None:
            return None
        text, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            fields = ((), args[0]) if is_map and len(args) == 1 else (args, kwargs)
            _FormatSize(self).vformat(text, *fields)  # a first run, checking each field first
            return format(*args, **kwargs)

        return update_wrapper(checked, value)

    @staticmethod
    def output_buffer() -> _OutputBuffer:
        return _OutputBuffer()

    @staticmethod
    def join_strings(values: tuple) -> str:
        _check(sum(_size(value) for value in values), "'~' concatenation")
        return _built_value("".join(map(str, values)), "'~' concatenation")


def _check_binop(operator: str, left: Any, right: Any, what: str) -> None:
    """Refuses an operation whose result would be over the limits, before computing it."""
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, _SEQUENCES) and isinstance(times, int):
                _check(_size(sequence) * max(times, 0), what)
                return
        if isinstance(left, int) and isinstance(right, int):
            _check_int_bits(left.bit_length() + right.bit_length(), what)
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _check_int_bits(math.ceil(right * math.log2(abs(left))), what)
    elif operator == "+":
        if isinstance(left, int) and isinstance(right, int):
            _check_int_bits(max(left.bit_length(), right.bit_length()) + 1, what)
        elif isinstance(left, _SEQUENCES):
            _check(_size(left) + _size(right), what)
    elif operator == "%" and isinstance(left, str):
        _check(_printf_size(left, right), what)


_PRINTF_FIELD = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d+))?[hlL]?"
    r"(?P<kind>.)",
    re.DOTALL,
)


def _printf_size(template: str, values: Any) -> int:
    """About how long `template % values` is: its text, and each field's value or width."""
    positional = iter(values if isinstance(values, tuple) else (values,))
    size = len(template)
    for field in _PRINTF_FIELD.finditer(template):
        if field["kind"] == "%":
            continue
        # In the order % takes them: a `*` width, a `*` precision, then the value.
        width, precision = (
            next(positional, 0) if part == "*" else int(part or 0)
            for part in (field["width"], field["precision"])
        )
        if field["key"] is not None and isinstance(values, Mapping):
            value = values.get(field["key"])
        else:
            value = next(positional, None)
        measured = _size(value) * (4 if field["kind"] in "ra" else 1)
        width, precision = (abs(n) if isinstance(n, int) else 0 for n in (width, precision))
        size += max(width, measured + precision)
    return size


# [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_FORMAT_SPEC = re.compile(
    r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[a-zA-Z%]?", re.DOTALL
)


class _FormatSize(SandboxedFormatter):
    """`str.format` run once as a check: each field's size added up before it is formatted."""

    def vformat(self, format_string: str, args: Sequence, kwargs: Mapping) -> str:
        self.size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:  # repr() of a container would build what is measured here
            _check(self.size + _size(value) * (4 if conversion in "ra" else 1), "str.format()")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> str:
        spec = _FORMAT_SPEC.fullmatch(format_spec)
        width, precision = (int(spec[name] or 0) if spec else 0 for name in ("width", "precision"))
        self.size += max(width, _size(value) + precision)
        _check(self.size, "str.format()")
        return super().format_field(value, format_spec)


def _callable_name(function: Any) -> str:
    owner = getattr(function, "__self__", None)
    name = getattr(function, "template_name", None) or getattr(function, "__name__", "a call")
    if isinstance(owner, str | bytes) or hasattr(owner, "template_name"):  # dict.fromkeys
        return f"{getattr(owner, 'template_name', type(owner).__name__)}.{name}"
    return name


def _bounded_arguments(args: tuple, kwargs: dict, what: str, skip: int = 0) -> tuple[tuple, dict]:
    """The arguments, refusing integers no size may reach (widths, counts), and with generators
    read into lists a bounded item at a time: a generator's items are only built when read."""
    if not kwargs and all(type(value) is str for value in args[skip:]):  # most calls, fast
        return args, kwargs
    args = (*args[:skip], *(_bounded_argument(value, what) for value in args[skip:]))
    return args, {key: _bounded_argument(value, what) for key, value in kwargs.items()}


def _bounded_argument(value: Any, what: str) -> Any:
    if isinstance(value, int) and abs(value) > MAX_CHARS:
        shown = value if value.bit_length() <= 64 else f"a {value.bit_length()}-bit integer"
        raise TooLarge(
            f"{what} was given {shown}, more than any size a render may build "
            f"(limit {MAX_CHARS} characters)"
        )
    if isinstance(value, GeneratorType):
        items, size = [], 0
        for item in value:
            size += _size(item) + 2
            _check(size, what)
            items.append(item)
        return items
    return value


def _call_size(function: Any, args: tuple, kwargs: dict) -> int:
    """About how long the result of the string methods that can multiply a size is."""
    text, name = getattr(function, "__self__", None), getattr(function, "__name__", "")
    if not isinstance(text, str | bytes):
        return 0
    positional = [*args, *kwargs.values()]  # these methods take their arguments in order
    if name == "replace" and len(positional) >= 2:
        return _replace_size(text, *positional[:3])
    if name == "join" and positional:
        return _join_size(text, positional[0])
    if name == "expandtabs":
        tabsize = positional[0] if positional else 8
        return len(text) + text.count("\t" if isinstance(text, str) else b"\t") * tabsize
    if name == "translate" and positional and isinstance(positional[0], Mapping):
        longest = max((_size(value) for value in positional[0].values()), default=1)
        return len(text) * max(longest, 1)
    return 0


def _replace_size(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(text, str | bytes) and type(old) is type(new) is type(text)):
        return 0  # the method itself refuses these
    occurrences = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * (len(new) - len(old))


def _join_size(separator: Any, items: Any) -> int:
    if not isinstance(items, Iterable) or isinstance(items, Iterator):
        return 0  # an iterator is read by the join itself; generators were read already
    size = 0
    for item in items:
        size += _size(item) + len(separator)
        if size > MAX_CHARS:
            break
    return size


def _indent_size(text: Any, width: Any) -> int:
    if not isinstance(text, str):
        return 0
    indentation = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    return len(text) + (text.count("\n") + 1) * indentation


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""  # what else becomes text is measured apart


# Filters whose result can outgrow their arguments: an estimate of its size, from the bound
# arguments (defaults applied). Every filter is also bounded by its arguments' sizes (times its
# growth below, for the escaping and case-mapping ones) and by its result's size.
_FILTER_SIZES = {
    "replace": lambda a: _replace_size(a["s"], a["old"], a["new"], a["count"]),
    "indent": lambda a: _indent_size(a["s"], a["width"]),
    "wordwrap": lambda a: _size(a["s"]) * (1 + _size(a["wrapstring"] or "\n")),
    "join": lambda a: _join_size(a["d"], a["value"]),
    "format": lambda a: _printf_size(_text(a["value"]), a["kwargs"] or a["args"]),
    "center": lambda a: _int(a["width"]),
    # Escapes rarely double a text; the result's own check catches the worst (\u0000, 6x).
    "tojson": lambda a: (
        _size(a["value"], len(a["indent"]) if isinstance(a["indent"], str) else _int(a["indent"]))
        * (2 + sum(len(s) for s in a["separators"] or () if isinstance(s, str)))
    ),
    "pprint": lambda a: 2 * _size(a["value"], 1),
    "urlize": lambda a: _size(a["value"]) * (64 + _size(a["target"]) + _size(a["rel"])),
    "batch": lambda a: 2 * _size(a["value"]) + _int(a["linecount"]) * (2 + _size(a["fill_with"])),
    "slice": lambda a: 2 * _size(a["value"]) + _int(a["slices"]) * (4 + _size(a["fill_with"])),
}
_FILTER_GROWTH = {
    **dict.fromkeys(("escape", "e", "forceescape", "xmlattr"), 6),  # & -> &amp;, " -> &#34;
    "urlencode": 12,  # a 4-byte character -> %F0%9F%99%82
    **dict.fromkeys(("upper", "lower", "title", "capitalize"), 3),  # ŉ -> ʼN
}


def _bounded_filter(name: str, function: Any) -> Any:
    """The filter, refusing arguments and results over the limits. Templates call filters
    directly, not through `_Sandbox.call`, so they are wrapped one by one."""
    skip = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context or environment
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if skip and parameters and parameters[0].name in ("context", "eval_ctx", "environment", "env"):
        signature = signature.replace(parameters=parameters[1:])  # async variants lack it
    what = f"the {name} filter"
    growth = _FILTER_GROWTH.get(name, 1)
    simple = name not in _FILTER_SIZES

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if _built.get() is None:
            raise nodes.Impossible()  # compile time: not folded into a constant (see _built)
        if simple and not kwargs and len(args) == skip + 1 and type(args[-1]) is str:
            _check(growth * len(args[-1]), what)  # one string, as most filters take: fast
            return _built_value(function(*args), what)
        args, kwargs = _bounded_arguments(args, kwargs, what, skip)
        _check(_filter_size(name, signature, args, kwargs, skip), what)
        return _built_value(function(*args, **kwargs), what)

    return update_wrapper(bounded, function)


def _filter_size(
    name: str, signature: inspect.Signature, args: tuple, kwargs: dict, skip: int
) -> int:
    inputs = sum(map(_size, args[skip:])) + sum(map(_size, kwargs.values()))
    size = inputs * _FILTER_GROWTH.get(name, 1)
    estimate = _FILTER_SIZES.get(name)
    if estimate is None:
        return size
    try:
        bound = signature.bind(*args[skip:], **kwargs)
    except TypeError:
        return size  # the filter itself reports its misuse
    bound.apply_defaults()
    return max(size, estimate(bound.arguments))


def _finalize(value: Any) -> Any:
    """Each `{{ ... }}` value before Jinja turns it into text: a container's text can be far
    larger than the container."""
    if not isinstance(value, str):
        _built_value(value, "an output value")
    return value


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    _check(16 * _int(n) * _int(max), "lipsum()")  # words of up to 14 letters, and a space
    return generate_lorem_ipsum(n, html, min, max)
