"""Unit tests for elastic_megatron.data (CPU only, a few seconds plus megatron's import)."""

import importlib.util
import itertools
import json
import os
import re

import pytest
import torch

from elastic_megatron.data import (
    CharTokenizer,
    DataFormatError,
    SyntheticReasoningDataset,
    build_gpt_datasets,
    extract_answer,
    generate_problems,
    heldout_problems,
    load_tokenizer,
    megatron_tokenizer,
    prepare_data,
    split_of,
    write_indexed_dataset,
    write_synthetic_jsonl,
)
from elastic_megatron.data.tokenizer import CHARS, UNK_CHAR

TOK = CharTokenizer()
SHORT, LONG = (2, 3), (8, 12)
SHORT_CTX, LONG_CTX = 96, 512


# ---------------------------------------------------------------------------------------
# independent checker: recomputes every problem from its prompt alone

STEP_ARITH = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)(?: > ([0-9+\-*]+))?$")
STEP_TAKE = re.compile(r"^(\d) > \[([0-9,]*)\] \[([0-9,]*)\]$")
STEP_SUM = re.compile(r"^(\d+)\+(\d)=(\d+) > \[([0-9,]*)\]$")


def _ints(s):
    return [int(x) for x in s.split(",")] if s else []


def check_problem(text):
    """Assert `text` is a well-formed problem with correct steps; return (answer, n_steps)."""
    prompt, *steps, answer_line = text.split("\n")
    assert answer_line.startswith("a: ")
    answer = answer_line[3:]
    m = re.fullmatch(r"q: ([0-9+\-*]+)=\?", prompt)
    if m:
        expr = m.group(1)
        want = eval(expr)  # only digits and + - * (regex above): Python's precedence
        assert answer == str(want) and 0 <= want <= 99
        n_products = expr.count("*")
        for i, line in enumerate(steps):
            a, op, b, c, rest = STEP_ARITH.fullmatch(line).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and 0 <= c <= 99
            assert (op == "*") == (i < n_products), "products must come first"
            if i < len(steps) - 1:  # the rewrite keeps the value and removes one operation
                assert eval(rest) == want and len(re.findall(r"[+\-*]", rest)) == len(steps) - 1 - i
            else:
                assert rest is None and c == want
        assert len(steps) == len(re.findall(r"[+\-*]", expr))
        return answer, len(steps)

    op, xs = re.fullmatch(r"q: (sort|reverse|cumsum) \[([0-9,]+)\]", prompt).groups()
    xs = _ints(xs)
    want = {"sort": sorted(xs), "reverse": xs[::-1],
            "cumsum": list(itertools.accumulate(xs))}[op]
    assert answer == "[" + ",".join(map(str, want)) + "]"
    assert len(steps) == len(xs) - 1
    for i, line in enumerate(steps):
        if op == "cumsum":
            a, x, c, sums = STEP_SUM.fullmatch(line).groups()
            assert int(a) + int(x) == int(c) and _ints(sums) == want[: i + 2] and int(c) <= 99
        else:
            x, out, rest = STEP_TAKE.fullmatch(line).groups()
            out, rest = _ints(out), _ints(rest)
            assert out == want[: i + 1] and int(x) == out[-1]
            assert sorted(out + rest) == sorted(xs) and len(out) == i + 1
    return answer, len(steps)


def n_tokens(p):
    return len(TOK.encode(p.text)) + 2  # + bos + eos


# ---------------------------------------------------------------------------------------
# tokenizer


def test_char_tokenizer_roundtrip_and_specials():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.unk_id) == (0, 1, 2, 3)
    assert TOK.vocab_size == 4 + len(CHARS) <= 64
    assert TOK.padded_vocab_size(64) == 64 and TOK.padded_vocab_size(8) == 64
    ids = TOK.encode(CHARS)
    assert len(set(ids)) == len(CHARS) and min(ids) >= 4 and max(ids) < TOK.vocab_size
    assert TOK.decode(ids) == CHARS
    assert TOK.decode([TOK.bos_id] + TOK.encode("ab") + [TOK.pad_id] + TOK.encode("c")
                      + [TOK.eos_id] + TOK.encode("zz")) == "abc"
    assert load_tokenizer("char").encode("q: 1+2") == TOK.encode("q: 1+2")


def test_unknown_characters_map_to_unk():
    ids = TOK.encode("a#B~1")
    assert ids[1] == ids[2] == ids[3] == TOK.unk_id and ids[0] != TOK.unk_id
    assert TOK.decode(ids) == f"a{UNK_CHAR * 3}1"


def test_corpus_uses_only_known_characters():
    for p in generate_problems(300, 0, 1, 12):
        assert TOK.unk_id not in TOK.encode(p.text), p.text


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None,
                    reason="transformers is installed")
def test_hf_tokenizer_without_transformers_says_so():
    with pytest.raises(ImportError, match="transformers"):
        load_tokenizer("gpt2")


def test_hf_wrapper_interface_with_a_fake_transformers(monkeypatch):
    import sys
    import types

    class FakeHF:  # words -> ids, eos=5, no bos/pad (like GPT-2)
        eos_token_id, bos_token_id, pad_token_id, unk_token_id = 5, None, None, None
        words = {"<eos>": 5, "hi": 6, "there": 7}

        def __len__(self):
            return 8

        def get_vocab(self):
            return dict(self.words)

        def encode(self, text, add_special_tokens=True):
            return [self.words[w] for w in text.split()]

        def decode(self, ids, skip_special_tokens=False):
            inv = {i: w for w, i in self.words.items()}
            return " ".join(inv[i] for i in ids)

    fake = types.SimpleNamespace(AutoTokenizer=types.SimpleNamespace(from_pretrained=lambda n: FakeHF()))
    monkeypatch.setitem(sys.modules, "transformers", fake)
    tok = load_tokenizer("some/model")
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (5, 5, 5, 8)
    assert tok.padded_vocab_size(64) == 64
    assert tok.encode("hi there") == [6, 7] and tok.decode([6, 7, 5, 6]) == "hi there"
    assert megatron_tokenizer(tok).pad == -1  # pad == eos: megatron's "no pad" id instead


# ---------------------------------------------------------------------------------------
# synthetic problems


def test_generation_is_deterministic_in_the_seed():
    a = generate_problems(50, seed=7, min_steps=2, max_steps=6)
    assert a == generate_problems(50, seed=7, min_steps=2, max_steps=6)
    assert [p.text for p in a] != [p.text for p in generate_problems(50, 8, 2, 6)]
    assert {p.kind for p in a} == {"arith", "list"}


@pytest.mark.parametrize("kind", ["arith", "list"])
@pytest.mark.parametrize("steps", [SHORT, LONG])
def test_steps_are_written_out_and_answers_correct(kind, steps):
    problems = generate_problems(300, 3, *steps, kinds=(kind,))
    for p in problems:
        assert p.solution.endswith(f"a: {p.answer}") and p.text == p.prompt + p.solution
        answer, n = check_problem(p.text)
        assert answer == p.answer and n == p.n_steps and steps[0] <= n <= steps[1]
    assert {p.n_steps for p in problems} == set(range(steps[0], steps[1] + 1))


def test_checker_rejects_wrong_work():
    good = "q: 3+4*2-5=?\n4*2=8 > 3+8-5\n3+8=11 > 11-5\n11-5=6\na: 6"
    assert check_problem(good) == ("6", 3)
    for bad in (good.replace("a: 6", "a: 7"), good.replace("4*2=8 > 3+8-5\n", ""),
                "q: 3+4*2-5=?\n3+4=7 > 7*2-5\n7*2=14 > 14-5\n14-5=9\na: 6"):
        with pytest.raises((AssertionError, AttributeError)):
            check_problem(bad)


def test_heldout_is_disjoint_from_train():
    # 2-step lists are a small space (3 ops x 1000 lists): without the hash split the
    # samples below would overlap heavily.
    train = generate_problems(3000, 0, 2, 2, kinds=("list",), split="train")
    held = heldout_problems(100, seed=0, min_steps=2, max_steps=2, kinds=("list",))
    assert len({p.text for p in held}) == 100
    assert all(split_of(p.prompt) == "test" for p in held)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    valid = generate_problems(500, 0, 2, 2, kinds=("list",), split="valid")
    assert not {p.prompt for p in valid} & ({p.prompt for p in train} | {p.prompt for p in held})
    # and the packed training stream only ever contains train problems
    ds = SyntheticReasoningDataset(SHORT_CTX, 200, seed=0, min_steps=2, max_steps=2, kinds=("list",))
    held_prompts = {p.prompt for p in held}
    for i in range(len(ds)):
        for doc in TOK.decode(ds.window(i)[0][1:]).split("\n"):
            assert doc + "\n" not in held_prompts


def test_short_and_long_lengths_fit_their_contexts():
    short = [n_tokens(p) for p in generate_problems(2000, 1, *SHORT)]
    long = [n_tokens(p) for p in generate_problems(2000, 1, *LONG)]
    assert max(short) <= SHORT_CTX + 1  # a whole short problem fits one short window
    assert min(long) > SHORT_CTX + 1  # every long problem needs the long context ...
    assert max(long) <= LONG_CTX + 1  # ... and fits it
    assert sum(long) / len(long) >= 4 * sum(short) / len(short)


def test_extract_answer():
    for p in generate_problems(100, 2, 1, 6):
        assert extract_answer(p.text) == p.answer
        assert extract_answer(p.prompt) is None
    assert extract_answer("q: 1+1=?\n1+1=2\na: 2\nq: junk\na: 9") == "2"
    assert extract_answer("a: [1,2]  \n") == "[1,2]"
    assert extract_answer("a:\nxa: 3") is None


# ---------------------------------------------------------------------------------------
# packed dataset


def _texts_in_window(ids):
    """Complete `<bos> text <eos>` documents of one window."""
    docs, cur = [], None
    for t in ids:
        if t == TOK.bos_id:
            cur = []
        elif t == TOK.eos_id and cur is not None:
            docs.append(TOK.decode(cur))
            cur = None
        elif cur is not None:
            cur.append(t)
    return docs


def test_packed_sample_format():
    ds = SyntheticReasoningDataset(SHORT_CTX, 64, seed=5, min_steps=2, max_steps=3)
    saw_pad = False
    for i in range(len(ds)):
        x = ds[i]
        assert set(x) == {"tokens", "labels", "loss_mask", "position_ids"}
        for k, dtype in [("tokens", torch.int64), ("labels", torch.int64),
                         ("loss_mask", torch.float32), ("position_ids", torch.int64)]:
            assert x[k].dtype == dtype and x[k].shape == (SHORT_CTX,)
        assert torch.equal(x["labels"][:-1], x["tokens"][1:])
        assert torch.equal(x["position_ids"], torch.arange(SHORT_CTX))
        is_pad = x["labels"] == TOK.pad_id
        assert torch.equal(x["loss_mask"], (~is_pad).float())
        n_real = int(x["loss_mask"].sum())
        assert not is_pad[:n_real].any() and is_pad[n_real:].all()  # padding is a suffix
        saw_pad |= bool(is_pad.any())
        ids, _ = ds.window(i)
        docs = _texts_in_window(ids)
        assert ids[0] == TOK.bos_id and len(docs) >= 1
        assert sum(len(d) + 2 for d in docs) == n_real + 1  # only whole problems, no cut-offs
        for d in docs:
            check_problem(d)
    assert saw_pad
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packed_dataset_is_deterministic():
    def samples(**kw):
        args = dict(seq_length=128, num_samples=8, seed=1, split="train", min_steps=2, max_steps=5)
        ds = SyntheticReasoningDataset(**{**args, **kw})
        return torch.stack([ds[i]["tokens"] for i in range(8)])

    a = samples()
    assert torch.equal(a, samples())
    assert not torch.equal(a, samples(seed=2))
    assert not torch.equal(a, samples(split="valid"))
    assert len({tuple(r.tolist()) for r in a}) == 8  # samples differ from each other


def test_long_problems_in_short_context_are_truncated_not_dropped():
    ds = SyntheticReasoningDataset(64, 4, min_steps=LONG[0], max_steps=LONG[1])
    x = ds[0]
    assert x["loss_mask"].all() and x["tokens"][0] == TOK.bos_id


# ---------------------------------------------------------------------------------------
# indexed data through megatron


def test_prepare_data_roundtrip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    jsonl = write_synthetic_jsonl(str(tmp_path / "s.jsonl"), 40, seed=3, min_steps=2, max_steps=4)
    with open(jsonl, "a") as f:
        f.write("\n")  # blank lines are skipped, not errors
    with open(jsonl) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    stats = prepare_data(jsonl, str(tmp_path / "out" / "s"), show_progress=False)
    assert stats["num_documents"] == 40 and stats["num_blank_lines"] == 1
    assert stats["num_tokens"] == sum(len(t) + 1 for t in texts)
    ds = IndexedDataset(str(tmp_path / "out" / "s"))
    assert len(ds) == 40
    for i, t in enumerate(texts):
        assert ds[i].tolist() == TOK.encode(t) + [TOK.eos_id]
    assert sorted(os.listdir(tmp_path / "out")) == ["s.bin", "s.idx"]


@pytest.mark.parametrize("bad_line,message", [
    ('{"text": "q: 1+1=?"', "invalid JSON"),
    ('{"txt": "q: 1+1=?"}', "missing key 'text'"),
])
def test_prepare_data_bad_line_names_it_and_writes_nothing(tmp_path, bad_line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "fine"}\n' + bad_line + '\n{"text": "x"}\n')
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl:3: {message}"):
        prepare_data(str(src), str(tmp_path / "out" / "d"), show_progress=False)
    assert os.listdir(tmp_path / "out") == []
    # a previous good output under the same prefix survives a failed run untouched
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "ok"}\n')
    prepare_data(str(good), str(tmp_path / "out" / "d"), show_progress=False)
    before = (tmp_path / "out" / "d.bin").read_bytes()
    with pytest.raises(DataFormatError):
        prepare_data(str(src), str(tmp_path / "out" / "d"), show_progress=False)
    assert (tmp_path / "out" / "d.bin").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["d.bin", "d.idx"]


def test_write_indexed_dataset_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_indexed_dataset([[1, 2], [5, 99]], str(tmp_path / "x"), vocab_size=57)
    assert os.listdir(tmp_path) == []


def test_build_gpt_datasets(tmp_path):
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

    adapter = megatron_tokenizer("char")
    assert isinstance(adapter, MegatronLegacyTokenizer)
    assert (adapter.eod, adapter.pad, adapter.vocab_size) == (TOK.eos_id, TOK.pad_id, TOK.vocab_size)

    prefixes = []
    for seed in (0, 1):
        jsonl = write_synthetic_jsonl(str(tmp_path / f"s{seed}.jsonl"), 200, seed=seed)
        prefixes.append(str(tmp_path / f"d{seed}"))
        prepare_data(jsonl, prefixes[-1], show_progress=False)

    seq = 64
    train, valid, test = build_gpt_datasets(prefixes[0], seq, seed=0, num_samples=(50, 5, 5),
                                            tokenizer=TOK, split="90,5,5")
    assert len(train) >= 50 and len(valid) >= 5 and len(test) >= 5
    x = train[0]
    assert set(x) == {"tokens", "labels", "loss_mask", "position_ids"}
    for k in x:
        assert x[k].shape == (seq,)
    assert x["tokens"].dtype == x["labels"].dtype == torch.int64
    assert x["loss_mask"].dtype == torch.float32
    assert torch.equal(x["labels"][:-1], x["tokens"][1:])
    assert "q: " in TOK.decode([t for t in x["tokens"].tolist() if t != TOK.eos_id])
    again = build_gpt_datasets(prefixes[0], seq, 0, (50, 5, 5), tokenizer="char", split="90,5,5")[0]
    assert torch.equal(again[7]["tokens"], train[7]["tokens"])

    blended, valid, test = build_gpt_datasets({prefixes[0]: 0.5, prefixes[1]: 0.5}, seq, seed=0,
                                              num_samples=(40, 4, None), tokenizer=TOK, split="90,5,5")
    assert len(blended) >= 40 and len(valid) >= 4 and test is None
    assert blended[3]["tokens"].shape == (seq,)
