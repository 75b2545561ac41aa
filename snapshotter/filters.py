"""containerd's filter language, as the snapshots ``List`` RPC receives it.

containerd (``filters/parser.go``) defines::

    selectors := selector ("," selector)*          all selectors must match (AND)
    selector  := fieldpath [operator value]        no operator: the field must be present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := Go string syntax ("..."); for "~=" also /.../ and |...|

A ``List`` request carries several such strings and an item is returned if ANY of them matches (OR).
There is no OR inside one string: ``|`` is only an alternative regexp quote. containerd itself sends
e.g. ``labels."containerd.io/snapshot.ref"==sha256:...,parent=="sha256:..."`` when it resolves a remote
snapshot, so quoted label keys with dots and slashes must work. Field lookup mirrors containerd's
snapshot adaptor: ``kind`` (active/view/committed), ``name``, ``parent`` and ``labels.<key>`` where the
key is the rest of the path joined with dots.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from remora.errors import InvalidInput

# A field resolver: fieldpath -> (value, present)
Adaptor = Callable[[list[str]], "tuple[str, bool]"]


class FilterSyntaxError(InvalidInput):
    """A filter string that does not parse (reported to the client as INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "?" (present), "==", "!=", "~="
    value: str = ""

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(list(self.fieldpath))
        if self.operator == "?":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        try:
            return re.search(self.value, value) is not None
        except re.error:  # containerd logs and treats a bad regexp as "no match"
            return False


@dataclass(frozen=True)
class Filter:
    """OR over filter strings, each an AND over selectors. No strings at all matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(adaptor) for s in sels) for sels in self.alternatives)


def parse_all(strings: list[str] | tuple[str, ...]) -> Filter:
    """Parse the ``filters`` of a List request. An empty string matches all, like containerd."""
    alts = []
    for s in strings:
        if s == "":
            return Filter(())
        alts.append(_Parser(s).selectors())
    return Filter(tuple(alts))


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, msg: str) -> FilterSyntaxError:
        return FilterSyntaxError(f"filters: parse error: [{self.s}] at {self.i}: {msg}")

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_space()
        return self.s[self.i] if self.i < len(self.s) else ""

    def selectors(self) -> tuple[Selector, ...]:
        sels = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(sels)
            if ch != ",":
                raise self.error(f"unexpected input: {ch!r}")
            self.i += 1
            sels.append(self.selector())

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.i += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), "?")
        op = self.operator()
        return Selector(tuple(path), op, self.value(alt_quotes=op == "~="))

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted(ch)
        start = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() and self.s[self.i].isascii() or self.s[self.i] == "_"):
            self.i += 1
        if start == self.i:
            raise self.error("expected field or quoted")
        return self.s[start:self.i]

    def operator(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in "=!~":
            self.i += 1
        op = self.s[start:self.i]
        if op not in ("==", "!=", "~="):
            raise self.error(f'expected an operator ("=="|"!="|"~="), got {op!r}')
        return op

    def value(self, alt_quotes: bool) -> str:
        ch = self.peek()
        if ch in ('"', "/", "|"):
            if ch != '"' and not alt_quotes:
                raise self.error("invalid quote encountered")
            return self.quoted(ch)
        start = self.i
        while self.i < len(self.s) and self.s[self.i] != "," and not self.s[self.i].isspace():
            self.i += 1
        if start == self.i:
            raise self.error("expected value or quoted")
        return self.s[start:self.i]

    def quoted(self, quote: str) -> str:
        out: list[str] = []
        self.i += 1
        while True:
            if self.i >= len(self.s) or self.s[self.i] == "\n":
                raise self.error("quoted literal not terminated")
            ch = self.s[self.i]
            self.i += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            if self.i >= len(self.s):
                raise self.error("quoted literal not terminated")
            esc = self.s[self.i]
            self.i += 1
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
            elif esc == quote:
                # regexp quotes keep the backslash for anything but the quote itself
                out.append(esc)
            elif esc in "xuU01234567":
                n = {"x": 2, "u": 4, "U": 8}.get(esc, 3)
                digits = self.s[self.i:self.i + n] if esc in "xuU" else self.s[self.i - 1:self.i + 2]
                base = 8 if esc not in "xuU" else 16
                try:
                    out.append(chr(int(digits, base)))
                except ValueError:
                    raise self.error("illegal numeric escape sequence") from None
                self.i += n if esc in "xuU" else 2
            elif quote in "/|":
                out.append("\\" + esc)  # regexp escapes such as \d pass through to the regexp
            else:
                raise self.error("illegal escape sequence")


def snapshot_adaptor(kind: str, name: str, parent: str, labels: Mapping[str, str]) -> Adaptor:
    """Field lookup for one snapshot, exactly like containerd's ``adaptSnapshot``."""

    def field(path: list[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return field
