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

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm.config import Config
from jaxlm.data import pipeline
from jaxlm.data.batch import LMBatch, PreferenceBatch
from jaxlm.data.errors import DataError
from jaxlm.data.paths import as_path

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
    """Every (prompt, chosen, rejected) of the JSON-lines files, in order."""
    out = []
    for f in files:
        with as_path(f).open(encoding="utf-8") as fh:  # local or gs://
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"'{f}' line {n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not JSON ({e.msg}); {FIELDS_HELP}") from None
                out.append(parse_record(record, where))
    if not out:
        raise DataError(f"no preference pairs in {', '.join(files)}")
    return out


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


def _texts(pairs: list[tuple[Any, str, str]]) -> list[str]:
    """Every string of the pairs (what a BPE tokenizer trains on)."""
    out = []
    for prompt, chosen, rejected in pairs:
        out += [m["content"] for m in prompt] if isinstance(prompt, list) else [prompt]
        out += [chosen, rejected]
    return out


def preference_data(cfg: Config, run_dir: Path, train_data: Any, tokenizer_for: Any) -> Any:
    """TrainData of preference pairs: data.files (else data.name=chat-preferences, made on
    first use), held out by data.valid_files or the last data.valid_fraction of the pairs.
    `train_data` and `tokenizer_for` are jaxlm.data.setup's TrainData and tokenizer finder,
    passed in so that this module does not import the one that calls it."""
    TrainData, _tokenizer = train_data, tokenizer_for  # noqa: N806

    t, d = cfg.train, cfg.data
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    files, valid_files = d.files, d.valid_files
    if not files:  # config allows only data.name=chat-preferences then
        from jaxlm.data import chat_preferences

        made = chat_preferences.ensure()
        files, valid_files = [str(made.train)], [str(made.heldout)]
    train_pairs = read_preferences(pipeline.expand_files(files))
    if valid_files:
        valid_pairs = read_preferences(pipeline.expand_files(valid_files))
    else:
        k = max(1, int(len(train_pairs) * d.valid_fraction))
        if len(train_pairs) <= k:
            raise DataError(f"{len(train_pairs)} preference pair(s) in data.files: too few to "
                            "hold some out; add pairs or set data.valid_files")
        train_pairs, valid_pairs = train_pairs[:-k], train_pairs[-k:]
    tok = _tokenizer(cfg, run_dir, lambda: _texts(train_pairs))
    (train_rows, cut), (valid_rows, _) = (preference_rows(p, tok, t.seq_len)
                                          for p in (train_pairs, valid_pairs))
    description = (f"preference pairs: train={len(train_pairs):,} valid={len(valid_pairs):,}"
                   + (f" ({cut:,} cut to train.seq_len={t.seq_len})" if cut else ""))
    # bytes_per_token 0: the DPO loss is no text likelihood (no perplexity, bits per byte).
    return TrainData(tok, pipeline.RowBatches(train_rows, t.batch_size, seed=cfg.seed, **proc),
                     pipeline.RowBatches(valid_rows, t.batch_size, shuffle=False, **proc),
                     0.0, description)
