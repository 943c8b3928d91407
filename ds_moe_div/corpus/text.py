"""Text clean-up and document splitting: long texts become documents of at most `max_chars` characters.

Prose splits at blank lines, code at line ends, and a line longer than the limit is cut hard. Pieces are
packed greedily, so documents stay close to the limit and the split is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import ClassVar, Literal

SplitKind = Literal["prose", "code"]
_MANY_BLANKS = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def decode(data: bytes) -> str:
    """UTF-8 if it is, else Latin-1 (old text files), never an exception."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalise(text: str) -> str:
    """Unix line ends, no trailing blanks, at most one empty line in a row, no NULs."""
    text = (
        text.replace("\r\n", "\n")
        .replace("\r", "\n")
        .replace("\x00", "")
        .replace("\t", "    ")
    )
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    return _MANY_BLANKS.sub("\n\n", text).strip("\n")


def _pieces(text: str, kind: SplitKind) -> list[str]:
    if kind == "prose":
        return [p + "\n\n" for p in text.split("\n\n")]
    return [line + "\n" for line in text.split("\n")]


def _hard_cut(piece: str, max_chars: int) -> Iterator[str]:
    for start in range(0, len(piece), max_chars):
        yield piece[start : start + max_chars]


def split_text(text: str, *, max_chars: int, kind: SplitKind = "prose") -> list[str]:
    """Split `text` into chunks of at most `max_chars` characters (prose: at blank lines, code: at line ends).

    A paragraph longer than the limit is split at its line ends; a line longer than the limit is cut.
    Joining the chunks gives back the text up to whitespace at the cut points.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text, kind):
        if len(piece) > max_chars:
            sub = (
                split_text(piece, max_chars=max_chars, kind="code")
                if kind == "prose"
                else None
            )
            parts = (
                sub
                if sub and max(map(len, sub)) <= max_chars
                else list(_hard_cut(piece, max_chars))
            )
        else:
            parts = [piece]
        for part in parts:
            if current and len(current) + len(part) > max_chars:
                chunks.append(current)
                current = ""
            current += part
    chunks.append(current)
    return [c.strip("\n") for c in chunks if c.strip()]


class _TextExtractor(HTMLParser):
    _SKIP: ClassVar[set[str]] = {"script", "style", "head", "nav"}
    _BLOCK: ClassVar[set[str]] = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "dt",
        "dd",
        "table",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n"))


_ROFF_ESCAPES = [
    (re.compile(r"\\f[BIRPC1-4]|\\f\(..|\\f\[[^\]]*\]"), ""),
    (re.compile(r"\\\((em|en)"), "--"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((aq|oq|cq)"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&|^]|\\s[-+]?\d"), ""),
    (re.compile(r"\\e"), "\\\\"),
]


def roff_to_text(source: str) -> str:
    """Man-page roff to plain text: drop comments and layout requests, keep the words of headings."""
    out: list[str] = []
    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"", ".\\}")) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in ("SH", "SS"):
                out.append("\n" + rest.strip('"'))
            elif request in (
                "B",
                "I",
                "BR",
                "IR",
                "RB",
                "BI",
                "IB",
                "RI",
                "TP",
                "IP",
                "Nm",
                "Nd",
            ):
                out.append(rest.replace('"', ""))
            elif request in ("PP", "LP", "P", "sp"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return text.replace("\\\\", "\\")
