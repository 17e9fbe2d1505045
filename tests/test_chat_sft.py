"""Chat SFT data: the loss mask of a two-turn conversation equals a hand-built one under
three templates (Llama-3-style, ChatML, one with a system prompt) with an HF BPE tokenizer
built here, and under the default template with the byte tokenizer, with the ids HF's own
apply_chat_template gives; a token straddling scaffolding and content; packing keeps
conversations apart; bad chat files exit 2 with one line; streamed replies equal the
reference decoder's; the synthetic tasks are deterministic with disjoint held-out prompts,
and DPO's synthetic pairs hold out the same prompts."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxlm import config as config_lib
from jaxlm.api import LM
from jaxlm.cli import main
from jaxlm.data import chat, chat_tasks
from jaxlm.data.tokenizers import ByteTokenizer, load_tokenizer
from jaxlm.families.registry import build_model
from jaxlm.generate import generate_ids

SPECIALS = ["<pad>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Zephyr-like turns, a default system prompt when the conversation brings none (as Qwen's).
SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|>\\nBe helpful.' + eos_token + '\\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
TWO_TURNS = [{"role": "user", "content": "What is 2+3?"},
             {"role": "assistant", "content": "5"},
             {"role": "user", "content": "And 4+4?"},
             {"role": "assistant", "content": "It is 8."}]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *TWO_TURNS]
TINY_128 = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
            "model.max_seq_len=128", "train.seq_len=128"]


def _turns(opener, closer, messages, *, after_close="\n"):
    """Hand-written pieces of a conversation: (text, 1 if the loss covers it)."""
    pieces = []
    for m in messages:
        reply = m["role"] == "assistant"
        pieces += [(opener(m["role"]), 0), (m["content"], int(reply)), (closer, int(reply))]
        pieces += [(after_close, 0)] if after_close else []
    return pieces


CASES = {
    "llama3": (LLAMA3, TWO_TURNS, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
               [("<|begin_of_text|>", 0)] + _turns(
                   lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>",
                   TWO_TURNS, after_close="")),
    "chatml": (CHATML, TWO_TURNS, dict(eos_token="<|im_end|>"),
               _turns(lambda r: f"<|im_start|>{r}\n", "<|im_end|>", TWO_TURNS)),
    "system": (SYSTEM, WITH_SYSTEM, dict(bos_token="<s>", eos_token="</s>"),
               _turns(lambda r: f"<|{r}|>\n", "</s>", WITH_SYSTEM)),
    "default-system": (SYSTEM, TWO_TURNS, dict(bos_token="<s>", eos_token="</s>"),
                       [("<|system|>\n", 0), ("Be helpful.", 0), ("</s>", 0), ("\n", 0)]
                       + _turns(lambda r: f"<|{r}|>\n", "</s>", TWO_TURNS)),
}


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained here, every newline a token of its own (so the hand-built
    pieces encode alone as they do in context)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    lines = ["What is 2+3? And 4+4? It is 8. You are terse. Be helpful.",
             "user assistant system header", "It is what it is, and 5 is 2+3."] * 50
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _hf_dir(tmp_path, tok, template, tokens):
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
              "chat_template": template, **tokens}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _expected(tok, pieces):
    ids, mask = [], []
    for text, masked in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [masked] * len(piece)
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_mask_equals_hand_built_mask_under_hf_templates(case, bpe_tokenizer, tmp_path):
    template, messages, tokens, pieces = CASES[case]
    d = _hf_dir(tmp_path, bpe_tokenizer, template, tokens)
    tok = load_tokenizer(d)
    ids, mask = chat.render_chat(messages, tok)
    want_ids, want_mask = _expected(tok, pieces)
    assert ids == want_ids
    assert mask == want_mask
    # The ids are HF's own for this template.
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert ids == list(hf.apply_chat_template(messages, tokenize=True)["input_ids"])
    # Stated plainly: what the loss covers is the replies and their end tokens.
    covered = [hf.decode([i]) for i, m in zip(ids, mask) if m]
    assert "".join(covered) == "5{end}It is 8.{end}".format(end=tokens["eos_token"])


def test_mask_with_the_byte_tokenizer_and_the_default_template():
    tok = ByteTokenizer()
    ids, mask = chat.render_chat(WITH_SYSTEM, tok)
    want_ids, want_mask = [], []
    for text, masked in _turns(lambda r: f"<|im_start|>{r}\n", None, WITH_SYSTEM):
        piece = [tok.eos_id] if text is None else list(text.encode())
        want_ids += piece
        want_mask += [masked] * len(piece)
    assert (ids, mask) == (want_ids, want_mask)
    assert chat.end_id(tok) == tok.eos_id
    # The generation prompt ends where a reply starts.
    prompt = chat.prompt_ids(WITH_SYSTEM[:2], tok)
    assert prompt == ids[:len(prompt)] and bytes(prompt[-22:]) == b"<|im_start|>assistant\n"


def test_a_token_straddling_scaffolding_and_content_counts_as_the_reply():
    """'A:' then 'yes': the merge ':y' crosses the boundary, so the text before the reply
    does not encode to a prefix of the conversation's ids."""
    from tokenizers import AddedToken, Tokenizer, models

    chars = sorted(set("Q:A\nyesno"))
    vocab = {c: i for i, c in enumerate(chars)} | {":y": len(chars)}
    tok = Tokenizer(models.BPE(vocab, [(":", "y")]))
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    from jaxlm.data.tokenizers import HFTokenizer

    t = HFTokenizer(tok, eos_id=tok.token_to_id("</s>"))
    template = ("{% for m in messages %}{{ ('Q:' if m['role'] == 'user' else 'A:') + "
                "m['content'] + eos_token + '\\n' }}{% endfor %}")
    ids, mask = chat.render_chat([{"role": "user", "content": "no"},
                                  {"role": "assistant", "content": "yes"}], t, template)
    tokens = [tok.id_to_token(i) for i in ids]
    assert tokens == ["Q", ":", "n", "o", "</s>", "\n", "A", ":y", "e", "s", "</s>", "\n"]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]


def test_prompt_response_masks_the_response_only(bpe_tokenizer, tmp_path):
    tok = load_tokenizer(_hf_dir(tmp_path, bpe_tokenizer, CHATML, {"eos_token": "<|im_end|>"}))
    ids, mask = chat.render_prompt_response(TWO_TURNS[:3], "It is 8.", tok)
    full_ids, full_mask = chat.render_chat(TWO_TURNS, tok)
    assert ids == full_ids
    last = max(i for i, m in enumerate(full_mask) if m)
    first = last - len(tok.encode("It is 8.", add_special_tokens=False))
    assert mask == [int(first <= i <= last) for i in range(len(ids))]
    assert chat.end_id(tok) == tok.encode("<|im_end|>", add_special_tokens=False)[0]
    one = chat.render_prompt_response("What is 2+3?", "5", tok)
    assert one == chat.render_chat(TWO_TURNS[:2], tok)


def test_packing_keeps_conversations_apart():
    tok = ByteTokenizer()
    chats = [TWO_TURNS[:2], WITH_SYSTEM, TWO_TURNS, [TWO_TURNS[0], TWO_TURNS[1]]]
    encoded = [chat.render_chat(c, tok) for c in chats]
    seq_len = 128
    rows = chat.pack_chats(encoded, seq_len)
    seg, pos = rows["segment_ids"], rows["positions"]
    for k, (ids, mask) in enumerate(encoded, 1):
        n = min(len(ids), seq_len + 1) - 1
        where = seg == k
        assert where.sum() == n and where.any(axis=1).sum() == 1  # whole, in one row
        assert rows["inputs"][where].tolist() == ids[:n]
        assert rows["targets"][where].tolist() == ids[1:n + 1]
        assert rows["loss_mask"][where].tolist() == mask[1:n + 1]
        assert pos[where].tolist() == list(range(n))
    assert (rows["loss_mask"][seg == 0] == 0).all()
    # The model sees each conversation as if alone.
    cfg = config_lib.load("tiny", TINY_128)
    model = build_model(cfg.model)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
    packed = model.apply({"params": params}, jnp.asarray(rows["inputs"]),
                         positions_BT=jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg))
    for k in (1, 2):  # the second cut to a row's length
        ids = encoded[k - 1][0]
        alone = model.apply({"params": params},
                            jnp.asarray([ids[:min(len(ids), seq_len + 1) - 1]]))
        np.testing.assert_allclose(np.asarray(packed)[seg == k], np.asarray(alone[0]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("record, message", [
    ({"conversation": []}, "no 'messages' field"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     "message 1 has role 'bot'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "no assistant turn"),
])
def test_bad_chat_files_exit_2_with_one_line(record, message, tmp_path, capsys):
    good = {"messages": TWO_TURNS[:2]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    run = tmp_path / "run"
    code = main(["train", "data.format=chat", f"data.files={path}", f"run.dir={run}",
                 "model.vocab_size=260", "train.steps=1", "run.quiet=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{path}:2: {message}" in err
    assert not run.exists()


def test_streamed_reply_equals_the_reference_decoder():
    cfg = config_lib.load("tiny", TINY_128)
    model = build_model(cfg.model)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.ones((1, 4), jnp.int32)))["params"]
    from jaxlm.dialogue import Replier

    replier = Replier(LM(cfg, params, ByteTokenizer()))
    prompt = replier.prompt(TWO_TURNS[:3], 40)
    streamed = list(replier.stream_ids(prompt, max_new_tokens=40))
    (want,) = generate_ids(model, params, [prompt], max_new_tokens=40,
                           max_len=cfg.model.max_seq_len,
                           temperature=0.0, eos_id=replier.end_id)
    assert streamed == want and len(streamed) > 1
    pieces = list(replier.stream(TWO_TURNS[:3], max_new_tokens=40))
    assert "".join(pieces) == ByteTokenizer().decode(want)


def test_chat_tasks_are_deterministic_and_heldout_prompts_unseen(tmp_path):
    a = chat_tasks.write(tmp_path / "a", seed=3, train_size=400, heldout_size=50)
    b = chat_tasks.write(tmp_path / "b", seed=3, train_size=400, heldout_size=50)
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.heldout.read_bytes() == b.heldout.read_bytes()
    train, heldout = chat.read_chats([str(a.train)]), chat.read_chats([str(a.heldout)])
    asked = {m["content"] for c in train for m in c if m["role"] == "user"}
    assert len(train) == 400 and len(heldout) == 50
    assert not asked & {m["content"] for c in heldout for m in c if m["role"] == "user"}
    for line in a.heldout.read_text().splitlines():
        row = json.loads(line)
        prompt = row["messages"][-2]["content"]
        task, _, arg = prompt.partition(": ")
        want = {"Reverse": arg[::-1], "Sort": "".join(sorted(arg)), "Uppercase": arg.upper(),
                "Add": str(sum(map(int, arg.split("+")))) if task == "Add" else ""}[task]
        assert row["messages"][-1]["content"] == row["answer"] == want


def test_chat_preferences_hold_out_the_chat_tasks_heldout_prompts(tmp_path):
    """DPO's synthetic pairs: held out on chat-tasks' held-out prompts (so neither SFT nor
    DPO trains on them), chosen the right answer, rejected a wrong one; what
    data.format=preference reads."""
    from jaxlm.data import chat_preferences
    from jaxlm.data.preference import read_preferences

    tasks = chat_tasks.write(tmp_path / "tasks", seed=3, train_size=40, heldout_size=30)
    prefs = chat_preferences.write(tmp_path / "prefs", seed=3, train_size=60, heldout_size=30)
    sft_heldout = chat.read_chats([str(tasks.heldout)])
    heldout = read_preferences([str(prefs.heldout)])
    train = read_preferences([str(prefs.train)])
    assert [p for p, _, _ in heldout] == [c[:-1] for c in sft_heldout]
    assert [c for _, c, _ in heldout] == [c[-1]["content"] for c in sft_heldout]
    asked = {m["content"] for c in sft_heldout for m in c if m["role"] == "user"}
    assert len(train) == 60
    assert not asked & {m["content"] for p, _, _ in train for m in p if m["role"] == "user"}
    assert all(chosen != rejected for _, chosen, rejected in heldout + train)


@pytest.mark.parametrize("argv, needle", [
    (["chat", "--run", "{tmp}/nowhere"], "nowhere"),
    (["prepare", "shakespeare", "--out", "{tmp}/x"], "--out and --seed apply to chat-tasks"),
    (["prepare", "chat-tasks", "--out", "{tmp}/file/x"], "cannot write the chat-tasks files"),
    (["prepare", "chat-preferences", "--out", "{tmp}/file/x"],
     "cannot write the chat-preferences files"),
])
def test_chat_command_errors_are_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
