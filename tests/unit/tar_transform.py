"""GNU tar's --transform expressions (sed's ``s,REGEX,REPLACEMENT,``) read in Python.

The charm renames the database's copy in the archive with an expression built
by backup._sed_literal and backup._sed_replacement. These helpers read such an
expression strictly: the regex must be an anchored POSIX basic regular
expression whose every character stands for itself (each special character
escaped, no GNU escape such as a backslash before a parenthesis or a digit), and
the replacement must hold no ``&`` or back-reference. They turn it into a
Python pattern, so that a test checks what the expression matches and what it
renames to; real tar runs the same expressions in test_backup_incremental.py.
"""

from __future__ import annotations

import re

# Characters that mean something in a POSIX basic regular expression.
BRE_SPECIAL = frozenset("\\.[]*^$")


def _tokens(text: str) -> list[tuple[bool, str]]:
    """Split sed text into (escaped, character) pairs.

    Args:
        text: the text, with backslash escapes.

    Returns:
        The characters, each marked as escaped or not.

    Raises:
        ValueError: on a trailing lone backslash.
    """
    tokens: list[tuple[bool, str]] = []
    index = 0
    while index < len(text):
        if text[index] == "\\":
            if index + 1 == len(text):
                raise ValueError(f"trailing backslash in {text!r}")
            tokens.append((True, text[index + 1]))
            index += 2
        else:
            tokens.append((False, text[index]))
            index += 1
    return tokens


def split_expression(expression: str) -> tuple[str, str, str, str]:
    """Split ``s<d>REGEX<d>REPLACEMENT<d>FLAGS`` at its unescaped delimiters.

    Args:
        expression: the expression.

    Returns:
        The delimiter, the regex, the replacement and the flags, as written.

    Raises:
        ValueError: if it is not a substitution with exactly three delimiters.
    """
    if len(expression) < 2 or expression[0] != "s":
        raise ValueError(f"not a substitution: {expression!r}")
    delimiter = expression[1]
    parts = [""]
    index = 2
    while index < len(expression):
        char = expression[index]
        if char == "\\" and index + 1 < len(expression):
            parts[-1] += expression[index : index + 2]
            index += 2
            continue
        if char == delimiter:
            parts.append("")
        else:
            parts[-1] += char
        index += 1
    if len(parts) != 3:
        raise ValueError(f"expected three {delimiter!r} delimiters in {expression!r}")
    regex, replacement, flags = parts
    return delimiter, regex, replacement, flags


def literal_pattern(bre: str, delimiter: str = ",") -> re.Pattern[str]:
    """Turn an anchored basic regular expression made only of literals into a Python pattern.

    Args:
        bre: the regex, ``^...$``.
        delimiter: the expression's delimiter (escaped inside the regex).

    Returns:
        A pattern matching what the BRE matches.

    Raises:
        ValueError: if the BRE is not anchored, or holds anything but literals.
    """
    tokens = _tokens(bre)
    if tokens[:1] != [(False, "^")] or tokens[-1:] != [(False, "$")] or len(tokens) < 2:
        raise ValueError(f"not anchored at both ends: {bre!r}")
    literal = []
    for escaped, char in tokens[1:-1]:
        if escaped and char not in BRE_SPECIAL | {delimiter}:
            raise ValueError(f"GNU escape \\{char} in {bre!r}")
        if not escaped and char in BRE_SPECIAL:
            raise ValueError(f"unescaped special character {char!r} in {bre!r}")
        literal.append(re.escape(char))
    return re.compile(r"\A" + "".join(literal) + r"\Z")


def literal_replacement(replacement: str, delimiter: str = ",") -> str:
    """Return the text a sed replacement produces, if it holds no reference to the match.

    Args:
        replacement: the replacement, as written.
        delimiter: the expression's delimiter.

    Returns:
        The text.

    Raises:
        ValueError: on ``&``, a back-reference or another escape.
    """
    text = []
    for escaped, char in _tokens(replacement):
        if escaped and char not in {"\\", "&", delimiter}:
            raise ValueError(f"escape \\{char} in the replacement {replacement!r}")
        if not escaped and char == "&":
            raise ValueError(f"unescaped & in the replacement {replacement!r}")
        text.append(char)
    return "".join(text)


def apply_transform(expression: str, name: str) -> str:
    """Apply a literal --transform expression to a member name, as tar would.

    Args:
        expression: ``s,^REGEX$,REPLACEMENT,`` (no flags).
        name: the member name.

    Returns:
        The new name, or the name unchanged when the regex does not match it.

    Raises:
        ValueError: if the expression is not a literal renaming.
    """
    delimiter, regex, replacement, flags = split_expression(expression)
    if flags:
        raise ValueError(f"unexpected flags {flags!r}")
    pattern = literal_pattern(regex, delimiter)
    return literal_replacement(replacement, delimiter) if pattern.fullmatch(name) else name
