"""Documents, cut into pieces that workers read and tokenize independently.

A .txt file is one document; each line of a .jsonl file (its `text_field`) is one; each row of
an HF dataset is one. A piece is a byte range of a file (cut just after a newline, and for
text where the next line starts with a visible ASCII character, so that byte-level
tokenizers split it exactly as the whole) or a range of rows. Text is decoded as UTF-8 with
universal newlines (as Python's text mode reads it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from jaxlm.data.errors import DataError
from jaxlm.data.paths import as_path
from jaxlm.data.pieces import PIECE_BYTES, Piece

CHUNK_CHARS = 1 << 20  # text per tokenizer call
_LINE_START = re.compile(r"\n(?=[!-~])")  # a newline before a visible ASCII character
_SCAN = 1 << 20


@dataclass
class PieceText:
    """What a piece reads as: texts, whether each ends its document, bytes, replacements."""

    texts: list[str]
    ends: list[bool]
    replaced: int = 0


def _kind(path: str) -> str:
    if not path.endswith((".jsonl", ".json")):
        return "text"
    if path.endswith(".json"):
        with as_path(path).open("rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            return "json"
    return "jsonl"


def _next_cut(f, offset: int, kind: str) -> int | None:
    """The first offset >= `offset` just after a newline (text: one before a visible ASCII
    character), or None if there is none before the end of the file."""
    f.seek(max(offset - 1, 0))
    base = max(offset - 1, 0)
    pattern = re.compile(rb"\n" if kind == "jsonl" else rb"\n(?=[!-~])")
    carry = b""
    while block := f.read(_SCAN):
        data = carry + block
        if m := pattern.search(data):
            return base - len(carry) + m.start() + 1
        carry = data[-1:]
        base += len(block)
    return None


def plan_files(files: list[str], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Pieces of about `piece_bytes` covering `files` in order (empty files have none)."""
    pieces: list[Piece] = []
    for path in files:
        kind = _kind(path)
        with as_path(path).open("rb") as f:
            size = f.seek(0, 2)
            cuts = [0]
            while kind != "json" and cuts[-1] + piece_bytes < size:
                cut = _next_cut(f, cuts[-1] + piece_bytes, kind)
                if cut is None or cut >= size:
                    break
                cuts.append(cut)
        if size:
            pieces += [Piece(kind, path, a, b, b == size)
                       for a, b in zip(cuts, [*cuts[1:], size])]
    return pieces


def decode(raw: bytes, path: str, offset: int, utf8_errors: str) -> tuple[str, int]:
    """(text, replacements): UTF-8 with universal newlines; invalid bytes replaced (and
    counted) or refused, as data.utf8_errors says."""
    try:
        text, bad = raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if utf8_errors == "error":
            raise DataError(f"'{path}' is not valid UTF-8 (byte {offset + e.start}); fix the "
                            "file or set data.utf8_errors=replace") from None
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text, bad


def _records(raw: bytes, piece: Piece, text_field: str) -> list[str]:
    if piece.kind == "json":
        try:
            rows = json.loads(raw)
        except ValueError as e:
            raise DataError(f"could not read '{piece.source}' as JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"'{piece.source}' holds no list of records")
    else:
        rows = []
        for i, line in enumerate(raw.split(b"\n")):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"could not read '{piece.source}' as JSON lines: {e} "
                                    f"(in the line {i + 1} after byte {piece.start})") from None
    texts = []
    for row in rows:
        if not isinstance(row, dict) or text_field not in row:
            fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"'{piece.source}' has no field '{text_field}' (fields: {fields}); "
                            "set data.text_field")
        if row[text_field]:
            texts.append(str(row[text_field]))
    return texts


def read_piece(piece: Piece, text_field: str = "text", utf8_errors: str = "replace"
               ) -> PieceText:
    """The documents (or the part of one) that `piece` holds."""
    if piece.kind == "hf":
        from jaxlm.data import hf

        texts = hf.read_rows(json.loads(piece.source), piece.start, piece.stop, text_field)
        return PieceText(texts, [True] * len(texts))
    with as_path(piece.source).open("rb") as f:
        f.seek(piece.start)
        raw = f.read(piece.stop - piece.start)
    if piece.kind == "text":
        text, bad = decode(raw, piece.source, piece.start, utf8_errors)
        return PieceText([text], [piece.last], bad)
    text, bad = decode(raw, piece.source, piece.start, utf8_errors)
    texts = _records(text.encode("utf-8") if bad else raw, piece, text_field)
    return PieceText(texts, [True] * len(texts), bad)


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` cut into parts of about `size` characters at line starts (see the module)."""
    parts, start = [], 0
    while len(text) - start > size:
        m = _LINE_START.search(text, start + size)
        if m is None:
            break
        parts.append(text[start:m.start() + 1])
        start = m.start() + 1
    parts.append(text[start:])
    return parts


def iter_texts(pieces: list[Piece], text_field: str = "text", utf8_errors: str = "replace",
               share: float = 1.0) -> Iterator[str]:
    """The text of the documents in order, a piece at a time (cut at line starts, so a
    byte-level tokenizer trains on the same words), up to `share` of the pieces' extent."""
    total = sum(p.stop - p.start for p in pieces)
    budget = share * total
    for piece in pieces:
        if budget <= 0:
            return
        texts = read_piece(piece, text_field, utf8_errors).texts
        keep = min(1.0, budget / max(piece.stop - piece.start, 1))
        budget -= piece.stop - piece.start
        if keep < 1.0:  # the piece that crosses the share: its first part
            texts = ([texts[0][:round(keep * len(texts[0]))]] if len(texts) == 1
                     else texts[:max(1, round(keep * len(texts)))])
        yield from texts
