"""Chat data for supervised fine-tuning: conversations (`messages`: system, user and
assistant turns) rendered by a chat template into token ids and a loss mask that covers
exactly the assistant's tokens, each assistant turn's content and its end token, never the
template's scaffolding, the system prompt or the user's text; conversations packed whole
into rows with segment ids, so attention and the loss never cross them.

The template is the tokenizer's (tokenizer_config.json's `chat_template`, rendered as HF
does: jaxlm.data.chat_template), else DEFAULT_TEMPLATE: ChatML with the tokenizer's EOS
closing each turn (`<|im_start|>role\\ncontent</s>\\n`; ChatML exactly for a tokenizer
whose EOS is <|im_end|>).

How the mask is found, for any Jinja template: the conversation is rendered whole and
encoded once (the ids HF's `apply_chat_template(tokenize=True)` gives). Each assistant
turn's content is located in that text after the rendering of the messages before it with
the generation prompt, when that rendering is a prefix of the whole (else after the
previous message's content: templates may trim content or rewrite earlier turns). A
character boundary becomes a token index by encoding the text up to it and taking the
longest common prefix with the conversation's ids: exact where the boundary falls between
tokens (the prefix property holds, the usual case); where one token straddles it (a merge
across scaffolding and content) that token counts as the assistant's, since it must be
generated to produce the content. The turn's end token is the first token after its
content (<|im_end|>, <|eot_id|>, </s>)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxlm.data import chat_template, pipeline
from jaxlm.data.errors import DataError

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]

# ChatML, each turn closed by the tokenizer's EOS (a real id, so generation stops on it).
DEFAULT_TEMPLATE = (
    "{% set end = eos_token if eos_token is defined else '<|im_end|>' %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + end + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, else DEFAULT_TEMPLATE."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE


# ---------------------------------------------------------------- reading

def check_messages(record: Any, where: str) -> Messages:
    """The conversation of one JSON record ({"messages": [{"role", "content"}, ...]}) as
    plain {role, content} dicts; DataError naming `where` if it is not one a model can
    train on (no messages, a role other than system/user/assistant, no assistant turn)."""
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: no 'messages' field (data.format=chat reads JSON lines "
                        'of {"messages": [{"role": ..., "content": ...}, ...]})')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{role, content} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {k} needs a string 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {k} has role {m.get('role')!r}; use "
                            f"{', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    return out


def read_chats(files: Sequence[str]) -> list[Messages]:
    """The conversations of chat JSON lines files (local or cloud), in order; a bad line
    is a DataError naming its file and line."""
    return pipeline.read_json_lines(list(files), check_messages, "conversations")


# ---------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=16)
def _written_specials(tokenizer: Any) -> tuple[re.Pattern | None, dict[str, int]]:
    """Special-token strings (its <s>, </s>, ...) that the tokenizer's own encode() keeps
    as text (the byte tokenizer, split_special_tokens): a template writing them means the
    token."""
    found = {}
    for key, text in tokenizer.special_tokens_map().items():
        i = getattr(tokenizer, key.removesuffix("_token") + "_id", None)
        if text and i is not None and tokenizer.encode(text, add_special_tokens=False) != [i]:
            found[text] = i
    if not found:
        return None, {}
    alternatives = sorted(found, key=len, reverse=True)  # the longest match first
    return re.compile("|".join(map(re.escape, alternatives))), found


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """The ids of a template's output: its text without added special tokens, and the
    special-token strings it writes as their ids."""
    pattern, ids = _written_specials(tokenizer)
    if pattern is None:
        return tokenizer.encode(text, add_special_tokens=False)
    out: list[int] = []
    at = 0
    for m in pattern.finditer(text):
        if m.start() > at:
            out += tokenizer.encode(text[at:m.start()], add_special_tokens=False)
        out.append(ids[m.group()])
        at = m.end()
    if at < len(text):
        out += tokenizer.encode(text[at:], add_special_tokens=False)
    return out


def _render(tokenizer: Any, template: str, messages: Messages,
            generation_prompt: bool = False) -> str:
    try:
        return chat_template.render(template, messages,
                                    special_tokens=tokenizer.special_tokens_map(),
                                    add_generation_prompt=generation_prompt)
    except chat_template.ChatTemplateError as e:
        raise DataError(str(e)) from None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(differ[0]) if len(differ) else n


def _content_span(text: str, content: str, start: int, anchored: bool
                  ) -> tuple[int, int] | None:
    """Where `content` (as given, else trimmed, as templates often write it) is written
    in `text` from `start`; an empty content sits at `start` only if that is anchored."""
    for needle in (content, content.strip()):
        if needle and (at := text.find(needle, start)) >= 0:
            return at, at + len(needle)
    return (start, start) if anchored and not content.strip() else None


def turn_spans(messages: Messages, tokenizer: Any, template: str | None = None,
               train: Callable[[int], bool] | None = None
               ) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of the rendered conversation, [(first, end)] per assistant turn i with
    train(i) (default: all)): tokens first..end-1 hold the turn's content and ids[end] is
    its end token (end == len(ids) when the template writes nothing after it)."""
    template = template or template_of(tokenizer)
    text = _render(tokenizer, template, messages)
    ids = encode_rendered(tokenizer, text)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        start, anchored = cursor, False
        if m["role"] == "assistant":
            try:
                prefix = _render(tokenizer, template, messages[:i], generation_prompt=True)
            except DataError:  # e.g. a template that needs a user turn first
                prefix = None
            if prefix is not None and text.startswith(prefix) and len(prefix) >= cursor:
                start, anchored = len(prefix), True
        span = _content_span(text, m["content"], start, anchored)
        wanted = m["role"] == "assistant" and (train is None or train(i))
        if span is None:
            if wanted:
                raise DataError(f"the chat template does not write assistant message {i}'s "
                                f"content ({m['content'][:40]!r}) as given")
            continue
        cursor = span[1]
        if wanted:
            first = _common_prefix(encode_rendered(tokenizer, text[:span[0]]), ids)
            end = _common_prefix(encode_rendered(tokenizer, text[:span[1]]), ids)
            spans.append((first, max(end, first)))
    return ids, spans


def _masked(ids: list[int], spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    mask = np.zeros(len(ids), np.int32)
    for first, end in spans:
        mask[first:end + 1] = 1  # the content and its end token
    return ids, mask.tolist()


def render_chat(messages: Messages, tokenizer: Any, template: str | None = None
                ) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation through the chat template (None: template_of the
    tokenizer); mask[i] = 1 exactly on the assistant turns' content tokens and each
    one's end token."""
    return _masked(*turn_spans(messages, tokenizer, template))


def render_prompt_response(prompt: str | Messages, response: str, tokenizer: Any,
                           template: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of `prompt` (one user turn, or messages) answered by `response`: the ids
    render_chat gives for the whole, the mask on the response's content and end token only."""
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else list(prompt)) + [{"role": "assistant", "content": response}]
    messages = check_messages({"messages": messages}, "the prompt and response")
    last = len(messages) - 1
    return _masked(*turn_spans(messages, tokenizer, template, train=lambda i: i == last))


def prompt_ids(messages: Messages, tokenizer: Any, template: str | None = None) -> list[int]:
    """The ids a model reads before its next reply: the messages and the generation prompt."""
    text = _render(tokenizer, template or template_of(tokenizer), messages,
                   generation_prompt=True)
    return encode_rendered(tokenizer, text)


def end_id(tokenizer: Any, template: str | None = None) -> int | None:
    """The token that ends an assistant turn under the template (what generation stops
    on); the tokenizer's EOS when the template writes none."""
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    ids, spans = turn_spans(probe, tokenizer, template)
    end = spans[-1][1]
    return ids[end] if end < len(ids) else tokenizer.eos_id


# ---------------------------------------------------------------- packing

OPEN_ROWS = 16  # rows a conversation may still join (first fit over the newest ones)

def pack_chats(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int
               ) -> dict[str, np.ndarray]:
    """Rows of `seq_len` next-token pairs holding whole conversations ((ids, mask) each).
    A conversation of n tokens gives n - 1 pairs (one longer than seq_len + 1 tokens keeps
    its first seq_len + 1), the loss mask of a pair being its target's mask. Each
    conversation goes into the first of the newest OPEN_ROWS rows with room for it, else a
    new row (first fit over a window: deterministic, linear time); segment ids are 1 + the
    conversation's index, positions restart at each; the rest of a row is padding
    (segment 0, loss mask 0). Returns inputs, targets, segment_ids, positions [R, seq_len]
    int32 and loss_mask float32."""
    rows: list[list[tuple[int, int, int]]] = []  # (conversation, offset, pairs)
    used: list[int] = []
    for k, (ids, _) in enumerate(encoded):
        n = min(len(ids), seq_len + 1) - 1
        if n <= 0:
            continue
        r = next((r for r in range(max(len(rows) - OPEN_ROWS, 0), len(rows))
                  if used[r] + n <= seq_len), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append((k, used[r], n))
        used[r] += n
    if not rows:
        raise DataError("no conversation has two tokens to pack")
    shape = (len(rows), seq_len)
    out = {k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids")}
    out["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()
    out["loss_mask"] = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        for k, at, n in row:
            ids = np.asarray(encoded[k][0][:n + 1], np.int32)
            mask = np.asarray(encoded[k][1][:n + 1], np.float32)
            where = (r, slice(at, at + n))
            out["inputs"][where], out["targets"][where] = ids[:-1], ids[1:]
            out["segment_ids"][where] = k + 1
            out["positions"][where] = np.arange(n)
            out["loss_mask"][where] = mask[1:]
        end = row[-1][1] + row[-1][2]
        out["positions"][r, end:] = np.arange(seq_len - end)  # padding: a segment of its own
    return out


def chat_rows(chats: Sequence[Messages], tokenizer: Any, seq_len: int,
              template: str | None = None) -> tuple[dict[str, np.ndarray], int]:
    """(packed rows of the conversations, how many were left out because no assistant
    token fits in their first seq_len + 1 tokens)."""
    encoded = [render_chat(c, tokenizer, template) for c in chats]
    kept = [(ids, mask) for ids, mask in encoded if any(mask[1:seq_len + 1])]
    if not kept:
        raise DataError(f"no conversation has an assistant token within its first "
                        f"train.seq_len={seq_len} tokens; raise train.seq_len")
    return pack_chats(kept, seq_len), len(encoded) - len(kept)
