"""The user's path against HF: `jaxlm.load(HF dir).generate(text)` emits the tokens of HF
`model.generate(**tokenizer(text))`, for GPT-2, Llama, Mixtral, BART, T5 and Marian (greedy; beam
search for the encoder-decoders). Each directory holds a tiny random-weight model and a
tokenizer saved as the Hub ships them: a tokenizer.json whose post-processor template adds
the special tokens (Llama `<s> $A`, BART `<s> $A </s>`, T5 and Marian `$A </s>`) and a
tokenizer_config.json (Llama's with add_bos_token). Llama and BART failed before jaxlm honoured
the template and the config's decoder_start_token_id."""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import jaxlm
from jaxlm.config import ModelConfig
from jaxlm.convert.run import hf_to_run
from jaxlm.data import pipeline
from jaxlm.data.tokenizers import decoder_start_id, load_tokenizer

CORPUS = ["the cat sat on the mat", "a dog ran far and then slept on the red mat",
          "the red cat and the dog sat", "then the cat ran far", "a mat was on the dog"] * 4
TEXTS = ["the cat sat on", "a red dog ran far and"]
NEW = 8
SIDES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
             max_position_embeddings=64, dropout=0.0)


def _bpe(pre_tokenizer, specials: list[str], vocab_size: int, **kw) -> tuple[dict, list]:
    """Vocabulary and merges of a BPE trained on CORPUS (for HF's own tokenizer classes)."""
    tok = Tokenizer(models.BPE(**kw))
    tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(
        pre_tokenizer, pre_tokenizers.ByteLevel) else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def gpt2_tokenizer():
    vocab, merges = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                         ["<|endoftext|>"], 300)
    return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)


def llama_tokenizer():
    vocab, merges = _bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                  split=False),
                         ["<unk>", "<s>", "</s>"], 80, unk_token="<unk>")
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def bart_tokenizer():
    vocab, merges = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                         ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], 300)
    return transformers.BartTokenizer(vocab=vocab, merges=merges)


def t5_tokenizer():
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False))
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def marian_tokenizer():
    """A word-level fast tokenizer (HF's MarianTokenizer is SentencePiece-only) in Marian's
    layout: </s>=0, pad last, EOS appended by the template."""
    words = sorted({w for line in CORPUS for w in line.split()})
    vocab = {t: i for i, t in enumerate(["</s>", "<unk>", *words, "<pad>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 0)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _ids(tok, *names):
    return {f"{n}_token_id": tok.convert_tokens_to_ids(getattr(tok, f"{n}_token"))
            for n in names}


def gpt2_model(tok):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
        **_ids(tok, "bos", "eos")))


def llama_model(tok):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, **_ids(tok, "bos", "eos")))


def mixtral_model(tok):
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        **_ids(tok, "bos", "eos")))


def bart_model(tok):
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=len(tok), **SIDES, **_ids(tok, "bos", "eos", "pad"),
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None))  # BART's: </s>


def t5_model(tok):
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        dropout_rate=0.0, **_ids(tok, "eos", "pad"),
        decoder_start_token_id=tok.pad_token_id))  # T5's: <pad>


def marian_model(tok):
    return transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=len(tok), **SIDES, activation_function="swish", scale_embedding=True,
        **_ids(tok, "eos", "pad"), decoder_start_token_id=tok.pad_token_id,  # Marian's: pad
        forced_eos_token_id=None))


FAMILIES = {"gpt2": (gpt2_tokenizer, gpt2_model), "llama": (llama_tokenizer, llama_model),
            "bart": (bart_tokenizer, bart_model), "t5": (t5_tokenizer, t5_model),
            "marian": (marian_tokenizer, marian_model),
            "mixtral": (llama_tokenizer, mixtral_model)}
SEQ2SEQ = ("bart", "t5", "marian")


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that greedy and beam choices are not near-ties (HF's init is
    tiny); Marian's fixed sinusoidal positions left alone."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "embed_positions" in name and isinstance(model, transformers.MarianMTModel):
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1 or name == "final_logits_bias":
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_dir(request, tmp_path_factory):
    """(name, directory, HF model, HF tokenizer as AutoTokenizer reads it back)."""
    name = request.param
    make_tok, make_model = FAMILIES[name]
    d = tmp_path_factory.mktemp(name)
    tok = make_tok()
    model = randomise(make_model(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    if name in ("llama", "mixtral"):  # as the Hub's Llama tokenizers say beside the template
        path = d / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "add_bos_token": True,
                                    "add_eos_token": False}))
    return name, d, model, transformers.AutoTokenizer.from_pretrained(d)


def hf_generate(model, tok, text: str, beams: int) -> list[int]:
    """The new tokens of HF's plain greedy / beam search on tokenizer(text), up to EOS."""
    enc = tok(text, return_tensors="pt")
    gen = transformers.GenerationConfig(**{
        **model.generation_config.to_dict(), "max_new_tokens": NEW, "num_beams": beams,
        "do_sample": False, "early_stopping": False, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
        "min_length": 0, "max_length": None})
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gen)[0].tolist()
    new = out[1:] if model.config.is_encoder_decoder else out[enc["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    return new[:new.index(eos)] if eos in new else new


def jaxlm_generate(lm, texts: list[str], beams: int) -> tuple[list[str], list[list[int]]]:
    """lm.generate's texts and the ids it decoded them from."""
    seen: list[list[int]] = []
    decode = lm.tokenizer.decode
    lm.tokenizer.decode = lambda ids: seen.append([int(i) for i in ids]) or decode(ids)
    try:
        kw = dict(beams=beams) if beams > 1 else {}
        out = lm.generate(texts, max_new_tokens=NEW, temperature=0.0, **kw)
    finally:
        lm.tokenizer.decode = decode
    return out, seen


def _check(lm, model, tok, beams: int) -> None:
    want = [hf_generate(model, tok, t, beams) for t in TEXTS]
    out, ids = jaxlm_generate(lm, TEXTS, beams)
    assert ids == want, (beams, [tok(t)["input_ids"] for t in TEXTS])
    assert out == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert any(want), "HF generated nothing: the comparison would be empty"


def test_generate_matches_hf_greedy(hf_dir):
    name, d, model, tok = hf_dir
    lm = jaxlm.load(d)
    _check(lm, model, tok, beams=1)
    for text in TEXTS:  # the tokenizer's rules (template, add_bos_token) as HF applies them
        assert lm.tokenizer.encode_input(text, whole=name in SEQ2SEQ) == tok(text)["input_ids"]


def test_generate_matches_hf_beam_search(hf_dir):
    name, d, model, tok = hf_dir
    if name not in SEQ2SEQ:
        pytest.skip("beam search is for encoder-decoder models in jaxlm")
    _check(jaxlm.load(d), model, tok, beams=3)


def test_converted_run_keeps_the_rules(hf_dir, tmp_path):
    """`jaxlm convert` keeps the tokenizer's rules (tokenizer.json's template) and the
    decoder start, so the run encodes as HF does and (BART) generates what HF does."""
    name, d, model, tok = hf_dir
    if name not in ("llama", "bart"):
        pytest.skip("the two whose rules differ from jaxlm's defaults")
    lm = jaxlm.load(hf_to_run(d, tmp_path / "run"))
    for text in TEXTS:
        assert lm.tokenizer.encode_input(text, whole=name == "bart") == tok(text)["input_ids"]
    if name == "bart":
        assert lm.config.model.decoder_start_id == model.config.decoder_start_token_id == 2
        _check(lm, model, tok, beams=1)


def test_pair_rows_read_what_generate_reads(tmp_path):
    """Training rows from pairs use the same rules: BART sources and targets as HF's
    tokenizer(source, text_target=target) with the decoder starting at </s>; a target whose
    rules add no EOS (Llama's <s> $A) still ends in EOS; decoder prompt -> answer rows start
    with Llama's BOS, as generate's prompt (and so eval --task's) does."""
    ref = {}
    for name, make in (("bart", bart_tokenizer), ("llama", llama_tokenizer)):
        make().save_pretrained(tmp_path / name)
        ref[name] = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
    bart, llama = load_tokenizer(tmp_path / "bart"), load_tokenizer(tmp_path / "llama")
    pairs = [("the cat sat on the mat", "a dog ran"), ("then the cat ran far", "the mat")]
    start = decoder_start_id(ModelConfig(decoder_start_id=2), bart)
    rows = pipeline.PairBatches.from_pairs(pairs, bart, 16, 2, start)
    for i, (source, target) in enumerate(pairs):
        want = ref["bart"](source, text_target=target)
        assert rows.src[i][:int(rows.src_mask[i].sum())].tolist() == want["input_ids"]
        assert rows.tgt[i][:int(rows.tgt_mask[i].sum())].tolist() == want["labels"]
    assert rows.start_id == 2
    assert decoder_start_id(ModelConfig(), bart) == bart.bos_id == 0  # a run of its own

    rows = pipeline.PairBatches.from_pairs(pairs, llama, 16, 2, 0)
    assert rows.tgt[0][:int(rows.tgt_mask[0].sum())].tolist() == [
        1, *llama.encode("a dog ran", add_special_tokens=False), 2]
    prompted = pipeline.prompted_rows(pairs, llama, 32)
    context = llama.encode("the cat sat on the mat")  # HF's default: within <s> $A
    assert prompted["inputs"][0][:len(context)].tolist() == context
    assert llama.encode_input(pipeline.answer_prompt(pairs[0][0]))[:len(context)] == context
