"""Tokenizers as HF ships them: chat templates rendered as HF's `apply_chat_template`,
`encode(text, add_special_tokens=...)` with HF's default, and jaxlm's byte and trained-BPE
tokenizers written so that `AutoTokenizer` loads them with the same ids."""

import numpy as np
import pytest
import transformers

from jaxlm.convert.hf_tokenizer import save_for_hf
from jaxlm.data.tokenizers import ByteTokenizer, TokenizerError, load_tokenizer, train_bpe

# Loops, conditions, whitespace control, the special tokens, tojson, raise_exception and the
# generation prompt: what real templates (Llama 3, Qwen, Zephyr) use.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n"
    "<|{{ m['role'] }}|>\n  {{ m['content'] | trim }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief. Ünïcode ok."},
        {"role": "user", "content": " thou art my lord? "},
        {"role": "assistant", "content": "and the king", "name": None},
        {"role": "user", "content": "speak <s> love"}]
TEXTS = ["thou art my lord", "", "  spaces  and\ttabs\n", "café 👍🏽 ünï", "x<s>y</s>z<pad>"]


@pytest.fixture(scope="module")
def corpus_lines():
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "speak", "love"]
    return [" ".join(rng.choice(words, 8)) for _ in range(300)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus_lines):
    """An HF tokenizer directory with a chat template and a BOS template (Llama's <s> $A)."""
    from tokenizers import processors

    bpe = train_bpe(corpus_lines, 300)
    bpe.tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe.tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=TEMPLATE)
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(out)
    return out


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_renders_as_hf(hf_dir, tmp_path, generation_prompt):
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tools = [{"name": "clock", "description": "the time, «now»"}]
    want = ref.apply_chat_template(CHAT, add_generation_prompt=generation_prompt, tools=tools,
                                   tokenize=False)
    want_ids = ref.apply_chat_template(CHAT, add_generation_prompt=generation_prompt,
                                       tools=tools, tokenize=True)["input_ids"]
    tok = load_tokenizer(hf_dir)
    got = tok.apply_chat_template(CHAT, add_generation_prompt=generation_prompt, tools=tools,
                                  tokenize=False)
    assert got == want and got.startswith("<s>") and ("<|assistant|>\n" in got[-15:]) == \
        generation_prompt
    assert tok.apply_chat_template(CHAT, add_generation_prompt=generation_prompt,
                                   tools=tools) == want_ids
    # Saved by jaxlm (a run's tokenizer/) and read back: the same template.
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.apply_chat_template(CHAT, add_generation_prompt=generation_prompt,
                                     tools=tools, tokenize=False) == want


def test_chat_template_errors_are_tokenizer_errors(hf_dir):
    tok = load_tokenizer(hf_dir)
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        ByteTokenizer().apply_chat_template(CHAT)


def test_encode_defaults_to_hf_special_tokens(hf_dir):
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok = load_tokenizer(hf_dir)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text  # HF's default: <s> first
        assert tok.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False), text
    assert tok.encode("thou")[0] == 1 and tok.encode("thou", add_special_tokens=False)[0] != 1


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_exported_tokenizer_loads_in_hf_with_the_same_ids(kind, tmp_path, corpus_lines):
    tok = ByteTokenizer() if kind == "byte" else train_bpe(corpus_lines, 300)
    tok.chat_template = TEMPLATE
    save_for_hf(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id,
                                                                   tok.pad_id)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == hf.encode(text) == ids, text
        assert hf.decode(ids) == tok.decode(ids) == text, text
    assert hf.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(
        CHAT, tokenize=False)
    # jaxlm reads its own files back from the export.
    assert isinstance(load_tokenizer(tmp_path), type(tok))
