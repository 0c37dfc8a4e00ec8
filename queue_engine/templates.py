"""Prompt templates over the columns of a CSV batch.

A template is text with ``{column}`` placeholders, read with Python's own
format syntax (``string.Formatter().parse``): ``{{`` and ``}}`` are literal
braces. A placeholder names a column, whole: ``{first name}`` and
``{score.v2}`` name the columns ``first name`` and ``score.v2`` (the name is
never split into attributes or indexes). A conversion (``{a!r}``) or a
format spec (``{a:>3}``) is refused: a cell is text and goes in as it is.

The template is filled by joining its literal pieces and the cells, never by
``str.format``, so nothing in a cell is read as a format.
"""

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """A parsed template: ``pieces`` alternate literal text and column names
    as ``(literal, column or None)`` pairs."""

    text: str
    pieces: tuple

    @classmethod
    def parse(cls, text):
        """The template ``text``, parsed.

        Raises:
            ValueError: an unbalanced brace, an empty placeholder, a conversion
                or a format spec; the message says which and how to fix it.

        >>> Template.parse("Title: {title} {{x}}").columns
        ('title',)
        """
        pieces = []
        try:
            for literal, column, format_spec, conversion in string.Formatter().parse(text):
                if column is not None:
                    if conversion is not None or format_spec:
                        shown = "{" + column + (f"!{conversion}" if conversion else "") + \
                                (f":{format_spec}" if format_spec else "") + "}"
                        raise ValueError(
                            f"the placeholder {shown} has a conversion or a format spec; write just "
                            f"{{{column}}} (cells go in as they are)")
                    if not column.strip():
                        raise ValueError("an empty placeholder {}: name a column in it, e.g. {title} "
                                         "(write {{ and }} for literal braces)")
                pieces.append((literal, column))
        except ValueError as e:
            if "placeholder" in str(e):
                raise
            raise ValueError(f"{e}: write {{{{ and }}}} for literal braces, {{column}} for a cell") from None
        if not any(column is not None for _, column in pieces):
            raise ValueError("the template has no {column} placeholder; name at least one column, e.g. {title}")
        return cls(text, tuple(pieces))

    @property
    def columns(self):
        """The columns it names, in order of first use, each once."""
        return tuple(dict.fromkeys(column for _, column in self.pieces if column is not None))

    def missing_columns(self, header):
        """The columns it names that ``header`` lacks."""
        return [column for column in self.columns if column not in header]

    def fill(self, cells):
        """The text with each placeholder replaced by ``cells[column]``.

        >>> Template.parse("Q: {q}\\nA:").fill({"q": "Why?"})
        'Q: Why?\\nA:'
        """
        return "".join(literal + (cells[column] if column is not None else "") for literal, column in self.pieces)
