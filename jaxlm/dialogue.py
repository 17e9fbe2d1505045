"""Chat with a decoder model through its chat template (jaxlm.data.chat): replies streamed
token by token from a KV cache, the interactive session of `jaxlm chat`, and exact-match
accuracy on held-out conversations (`jaxlm eval --task chat`).

A reply is decoded one token per call against a KV cache of model.max_seq_len slots: the
prompt (the rendered conversation and the generation prompt, left-padded to a multiple of
PROMPT_BUCKET so that a session compiles a few prefills, not one per turn) fills it in one
call, then each new token is one cached step; the reply ends at the template's end-of-turn
token or the tokenizer's EOS. A conversation longer than the model's positions loses its
oldest turns first (the system prompt stays), then its oldest tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import chat
from jaxlm.data.errors import DataError
from jaxlm.families import schema
from jaxlm.generate import generate_ids, sample, unrolled_for_decoding
from jaxlm.models.transformer import init_cache

PROMPT_BUCKET = 32
Messages = list[dict[str, str]]


@partial(jax.jit, static_argnames=("model",))
def _prefill(model: Any, params: Any, prompt_1P: jax.Array, valid_1S: jax.Array
             ) -> tuple[jax.Array, Any, jax.Array]:
    """(last logits [1, V], the cache holding the prompt, the next position [1])."""
    P = prompt_1P.shape[1]
    cache = init_cache(model.cfg, 1, valid_1S.shape[1])
    pos_1P = jnp.maximum(jnp.cumsum(valid_1S[:, :P], axis=1) - 1, 0)
    logits, cache = model.apply({"params": params}, prompt_1P, positions_BT=pos_1P,
                                padding_mask_BT=valid_1S, cache=cache)
    return logits[:, -1], cache, pos_1P[:, -1] + 1


@partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step(model: Any, params: Any, tok_1: jax.Array, pos_1: jax.Array, cache: Any,
          valid_1S: jax.Array) -> tuple[jax.Array, Any]:
    logits, cache = model.apply({"params": params}, tok_1[:, None], positions_BT=pos_1[:, None],
                                padding_mask_BT=valid_1S, cache=cache)
    return logits[:, 0], cache


def check_can_chat(model_cfg: Any) -> None:
    """ConfigError unless the model's family trains on chat data (a decoder)."""
    if "chat" not in schema.DATA_FORMATS.get(model_cfg.family, ()):
        raise ConfigError(f"a {model_cfg.family} model does not chat: chat is for decoder-only "
                          "models (data.format=chat)")


class Replier:
    """Replies of a loaded model (`jaxlm.load`) to conversations, through `template` (None:
    the tokenizer's, else chat.DEFAULT_TEMPLATE)."""

    def __init__(self, lm: Any, template: str | None = None):
        check_can_chat(lm.config.model)
        if lm.tokenizer is None:
            raise ConfigError("this model has no tokenizer, so it cannot render a chat")
        self.tokenizer = lm.tokenizer
        self.template = template or chat.template_of(lm.tokenizer)
        self.model, self.params = unrolled_for_decoding(lm.model, lm.params)
        self.max_len = lm.config.model.max_seq_len
        self.end_id = chat.end_id(self.tokenizer, self.template)  # else the EOS
        self.stop = {i for i in (self.end_id, self.tokenizer.eos_id) if i is not None}

    def room(self, max_new_tokens: int) -> int:
        """The most prompt tokens kept, leaving room for the reply."""
        return self.max_len - min(max_new_tokens, self.max_len // 2)

    def prompt(self, messages: Messages, max_new_tokens: int) -> list[int]:
        """The prompt ids, the oldest turns (then tokens) dropped to fit."""
        kept = list(messages)
        ids = chat.prompt_ids(kept, self.tokenizer, self.template)
        while len(ids) > self.room(max_new_tokens):
            turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
            if not turns:
                break
            del kept[turns[0]]  # the oldest turn, and the replies that followed it
            while turns[0] < len(kept) - 1 and kept[turns[0]]["role"] == "assistant":
                del kept[turns[0]]
            ids = chat.prompt_ids(kept, self.tokenizer, self.template)
        return ids[-self.room(max_new_tokens):]

    def stream_ids(self, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        """The reply's ids one at a time as they are decoded (the end token not yielded)."""
        P = min(-(-len(prompt) // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_len - 1)
        prompt = prompt[-P:]
        buf = np.full((1, P), self.tokenizer.pad_id or 0, np.int32)
        buf[0, P - len(prompt):] = prompt
        valid = np.ones((1, self.max_len), bool)
        valid[0, :P - len(prompt)] = False
        valid = jnp.asarray(valid)
        logits, cache, pos = _prefill(self.model, self.params, jnp.asarray(buf), valid)
        rng = jax.random.PRNGKey(seed)
        for i in range(min(max_new_tokens, self.max_len - P)):
            tok = sample(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
            t = int(tok[0])
            if t in self.stop:
                return
            yield t
            logits, cache = _step(self.model, self.params, tok.astype(jnp.int32), pos + i,
                                  cache, valid)

    def stream(self, messages: Messages, *, max_new_tokens: int, **sampling: Any
               ) -> Iterator[str]:
        """The reply to `messages` as text pieces, each as soon as its bytes decode."""
        ids: list[int] = []
        shown = ""
        for t in self.stream_ids(self.prompt(messages, max_new_tokens),
                                 max_new_tokens=max_new_tokens, **sampling):
            ids.append(t)
            text = self.tokenizer.decode(ids)
            if not text.endswith("\ufffd") and text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(ids)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]


def session(lm: Any, lines: Iterable[str], write: Callable[[str], None], *,
            system: str = "", note: Callable[[str], None] = lambda s: None,
            max_new_tokens: int = 128, **sampling: Any) -> int:
    """An interactive chat: each line is a user turn whose reply is written as it streams
    (then a newline); `/reset` clears the conversation. Returns the turns answered."""
    replier = Replier(lm)
    start: Messages = [{"role": "system", "content": system}] if system else []
    history = list(start)
    turns = 0
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == "/reset":
            history = list(start)
            note("(conversation cleared)")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = ""
        for piece in replier.stream(history, max_new_tokens=max_new_tokens, **sampling):
            write(piece)
            reply += piece
        write("\n")
        history.append({"role": "assistant", "content": reply})
        turns += 1
    return turns


def exact_match(lm: Any, chats: list[Messages], *, max_new_tokens: int = 32,
                batch_size: int = 32) -> tuple[dict[str, float], list[str]]:
    """Greedy replies to each conversation without its last (assistant) turn, compared with
    that turn (both stripped of surrounding whitespace): ({exact_match: 0..100, examples},
    the replies)."""
    if any(c[-1]["role"] != "assistant" for c in chats):
        raise DataError("exact match needs conversations that end with an assistant turn "
                        "(the answer to compare with)")
    replier = Replier(lm)
    tok = replier.tokenizer
    prompts = [replier.prompt(c[:-1], max_new_tokens) for c in chats]
    replies: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out = generate_ids(replier.model, replier.params, prompts[i:i + batch_size],
                           max_new_tokens=max_new_tokens, max_len=replier.max_len,
                           temperature=0.0, eos_id=replier.end_id, pad_id=tok.pad_id or 0)
        for ids in out:
            stops = [k for k, t in enumerate(ids) if t in replier.stop]
            replies.append(tok.decode(ids[:stops[0]] if stops else ids).strip())
    right = sum(r == c[-1]["content"].strip() for r, c in zip(replies, chats, strict=True))
    return {"exact_match": 100.0 * right / max(len(chats), 1), "examples": len(chats)}, replies
