"""Preference pairs for DPO (data.format=preference): JSON lines of a prompt with a chosen
and a rejected response, as padded next-token rows whose loss mask covers the response only.

Two forms, as HF TRL reads them:
  {"prompt": "2+2=", "chosen": "4", "rejected": "5"}          raw text: prompt + response +
                                                              EOS, no template
  {"prompt": [{"role": "user", "content": "2+2?"}],           the tokenizer's chat template
   "chosen": "4" | {"role": "assistant", "content": "4"} | [that message],
   "rejected": ...}                                           (jaxlm.data.chat); `messages`
                                                              may name the prompt instead
A pair too long for a row keeps the end of its prompt (at least half a row of it, when it is
that long) and the start of its responses; both responses see the same prompt tokens."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.data import pipeline
from jaxlm.data.batch import LMBatch, PreferenceBatch
from jaxlm.data.errors import DataError

FIELDS_HELP = ("preference JSON lines need prompt (a string, or a list of chat messages), "
               "chosen and rejected")


def _response(value: Any, where: str, key: str, chat: bool) -> str:
    """A response's text: a string, or (chat form) one assistant message or a list of it."""
    if chat and isinstance(value, list) and len(value) == 1:
        value = value[0]
    if chat and isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise DataError(f"{where}: '{key}' must be an assistant message "
                            "{\"role\": \"assistant\", \"content\": \"...\"}")
        value = value["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string"
                        + (" or an assistant message" if chat else ""))
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: the prompt must be a non-empty list of messages "
                        "{\"role\": ..., \"content\": \"...\"}")
    return value


def parse_record(record: Any, where: str) -> tuple[str | list[dict[str, str]], str, str]:
    """(prompt, chosen, rejected) of one JSON record; DataError naming what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object; {FIELDS_HELP}")
    prompt = record.get("prompt", record.get("messages"))
    for key, value in (("prompt", prompt), ("chosen", record.get("chosen")),
                       ("rejected", record.get("rejected"))):
        if value is None:
            raise DataError(f"{where} lacks '{key}'; {FIELDS_HELP}")
    chat = isinstance(prompt, list)
    if chat:
        prompt = _messages(prompt, where)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
    return (prompt, _response(record["chosen"], where, "chosen", chat),
            _response(record["rejected"], where, "rejected", chat))


def read_preferences(files: list[str]) -> list[tuple[Any, str, str]]:
    """Every (prompt, chosen, rejected) of the JSON-lines files (local or cloud), in order."""
    return pipeline.read_json_lines(files, parse_record, "preference pairs",
                                    where="'{file}' line {line}")


def _sides(tokenizer: Any, prompt: Any, response: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response mask) of one side of a pair."""
    if isinstance(prompt, list):
        from jaxlm.data import chat

        ids, mask = chat.render_prompt_response(prompt, response, tokenizer)
        start = next((i for i, m in enumerate(mask) if m), len(ids))
        return list(ids[:start]), list(ids[start:]), list(mask[start:])
    before, _ = tokenizer.input_affixes()
    prompt_ids = before + tokenizer.encode(prompt, add_special_tokens=False)
    if not prompt_ids and tokenizer.bos_id is not None:
        prompt_ids = [tokenizer.bos_id]  # something to predict the first response token from
    end = ([tokenizer.eos_id] if tokenizer.eos_id is not None
           else tokenizer.encode("\n", add_special_tokens=False))
    response_ids = tokenizer.encode(response, add_special_tokens=False) + end
    return prompt_ids, response_ids, [1] * len(response_ids)


def preference_rows(pairs: list[tuple[Any, str, str]], tokenizer: Any, seq_len: int
                    ) -> tuple[PreferenceBatch, int]:
    """(rows [N, seq_len] of every pair, how many pairs were cut to fit)."""
    n, pad = len(pairs), tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def empty() -> dict[str, np.ndarray]:
        return {"inputs": np.full((n, seq_len), pad, np.int32),
                "targets": np.full((n, seq_len), pad, np.int32),
                "loss_mask": np.zeros((n, seq_len), np.float32)}

    rows, cut = {"chosen": empty(), "rejected": empty()}, 0
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        sides = {"chosen": _sides(tokenizer, prompt, chosen),
                 "rejected": _sides(tokenizer, prompt, rejected)}
        longest_prompt = max(len(s[0]) for s in sides.values())
        longest_response = max(len(s[1]) for s in sides.values())
        keep = min(longest_prompt, max(seq_len + 1 - longest_response,
                                       min(longest_prompt, seq_len // 2)))
        cut += keep < longest_prompt or keep + longest_response > seq_len + 1
        for name, (p_ids, r_ids, r_mask) in sides.items():
            room = seq_len + 1 - keep
            ids = p_ids[len(p_ids) - min(keep, len(p_ids)):] + r_ids[:room]
            mask = [0] * min(keep, len(p_ids)) + r_mask[:room]
            row, L = rows[name], len(ids)
            row["inputs"][i, :L - 1] = ids[:-1]
            row["targets"][i, :L - 1] = ids[1:]
            row["loss_mask"][i, :L - 1] = mask[1:]
    return PreferenceBatch(chosen=LMBatch(**rows["chosen"]),
                           rejected=LMBatch(**rows["rejected"])), cut


def texts(pairs: list[tuple[Any, str, str]]) -> list[str]:
    """Every string of the pairs (what a BPE tokenizer trains on)."""
    out = []
    for prompt, chosen, rejected in pairs:
        out += [m["content"] for m in prompt] if isinstance(prompt, list) else [prompt]
        out += [chosen, rejected]
    return out
