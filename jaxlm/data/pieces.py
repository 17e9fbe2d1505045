"""What a token store is built from (a leaf module): sources of documents, and the pieces
that workers read and tokenize independently."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PIECE_BYTES = 32 << 20  # text per piece (one shard of the store)


@dataclass(frozen=True)
class Piece:
    kind: str  # "text" | "jsonl" | "json" (one JSON array) | "hf"
    source: str  # a file path, or an HF dataset spec (JSON)
    start: int  # byte offset, or row
    stop: int
    last: bool  # the piece ends its document (text) / always true for records

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Source:
    """Documents that make one store: what they are (hashed into the store key: contents,
    not paths), how to cut them into pieces, and what the manifest records."""

    identity: dict[str, Any]
    plan: Callable[[], list[Piece]]
    description: str
    records: list[dict[str, Any]] = field(default_factory=list)
