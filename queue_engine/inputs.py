"""What every entry point refuses before any field is read: JSON that nests
too deeply or holds ``NaN``, integers too long for any field, and text that
no database column or UTF-8 answer can hold (NUL characters, unpaired
surrogates). Request bodies, batch ``params``, and every line of a JSONL
file are read with :func:`read_json`; CSV cells and form fields are checked
with :func:`text_problem`.
"""

import json

from .errors import InvalidJsonError

#: JSON nested deeper than this is refused; no request needs more than six levels.
MAX_JSON_DEPTH = 32
#: No field takes an integer this long; see :func:`_parse_int`.
MAX_INT_DIGITS = 100
TOO_LARGE = 10**MAX_INT_DIGITS


def text_problem(text):
    r"""Why ``text`` cannot be stored or sent back, or None.

    PostgreSQL's text refuses NUL, and an unpaired UTF-16 surrogate (what
    JSON's ``"\ud800"`` decodes to) is not Unicode: no database column and
    no UTF-8 answer can hold it.

    >>> text_problem("fine") is None
    True
    >>> print(text_problem("a\x00b"))
    contains a NUL character (\u0000) at character 2; remove it
    >>> print(text_problem("a\ud800"))
    contains an unpaired UTF-16 surrogate (\ud800) at character 2, which is not text; send valid Unicode
    """
    position = text.find("\x00")
    if position >= 0:
        return f"contains a NUL character (\\u0000) at character {position + 1}; remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"contains an unpaired UTF-16 surrogate (\\u{ord(text[e.start]):04x}) at character {e.start + 1}, "
                "which is not text; send valid Unicode")
    return None


def check_text(value):
    """``value`` unchanged, or a ValueError saying why a string cannot be stored
    (:func:`text_problem`); other types are left to the field's type check."""
    problem = isinstance(value, str) and text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def check_not_blank(text):
    if not text.strip():
        raise ValueError("must not be blank")
    return text


def format_location(parts):
    r"""A field's place, from pydantic's or :func:`check_json_value`'s path;
    a name that cannot be printed is shown quoted, with escapes.

    >>> format_location(("messages", 0, "content"))
    'messages.0.content'
    >>> print(format_location(("metadata", "a\x00b")))
    metadata.'a\x00b'
    """
    return ".".join(repr(part) if isinstance(part, str) and not part.isprintable() else str(part) for part in parts)


def read_json(text, param=None):
    """The value of the JSON ``text``, once nothing in it is unfit for any field.

    Args:
        text: JSON text: a request body, a form field, a line of a JSONL file.
        param: the field ``text`` came in (``"params"``); the place of a
            problem inside it is named from there.

    Raises:
        InvalidJsonError: code ``invalid_json`` when the text is not JSON,
            holds ``NaN`` or ``Infinity``, or nests deeper than
            :data:`MAX_JSON_DEPTH`; code ``invalid_request``, naming the
            field, when a string in it fails :func:`text_problem`.
    """
    try:
        value = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except RecursionError:
        # The C decoder recurses once per level and gives up near the interpreter's limit.
        raise InvalidJsonError(f"nested more than {MAX_JSON_DEPTH} levels deep", param) from None
    except json.JSONDecodeError as e:
        where = f"character {e.colno}" if e.lineno == 1 else f"line {e.lineno}, character {e.colno}"
        raise InvalidJsonError(f"not valid JSON ({e.msg} at {where})", param) from None
    except ValueError as e:  # from _refuse_constant
        raise InvalidJsonError(f"not valid JSON ({e})", param) from None
    check_json_value(value, () if param is None else (param,))
    return value


def check_json_value(value, path=()):
    """Refuse a parsed JSON ``value`` that nests too deeply or holds text that
    :func:`text_problem` refuses, in a key or a string anywhere in it.

    Args:
        path: where ``value`` sits, as the start of the place a problem is named by.

    Raises:
        InvalidJsonError: as :func:`read_json` describes.
    """
    pending = [(value, tuple(path))]
    while pending:  # a loop, not recursion: depth is refused here, not by the interpreter
        item, where = pending.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise InvalidJsonError(problem, format_location(where) or None, "invalid_request")
        elif isinstance(item, (dict, list)):
            if len(where) - len(path) >= MAX_JSON_DEPTH:
                top = format_location(where[:len(path) + 1]) or None
                raise InvalidJsonError(f"nested more than {MAX_JSON_DEPTH} levels deep", top)
            if isinstance(item, list):
                pending.extend(((child, (*where, number)) for number, child in enumerate(item)))
                continue
            for key, child in item.items():
                problem = text_problem(key)
                if problem:
                    raise InvalidJsonError(f"the key {key!r} {problem}", format_location(where) or None,
                                           "invalid_request")
                pending.append((child, (*where, key)))


def _parse_int(digits):
    # Python refuses integers over 4,300 digits with a ValueError that names
    # no field. No field takes one over MAX_INT_DIGITS, so a longer number
    # reads as +-TOO_LARGE and the field's own bound refuses it by name
    # ("params.seed: Input should be less than or equal to ...").
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        return -TOO_LARGE if digits.startswith("-") else TOO_LARGE
    return int(digits)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number; send a finite number")
