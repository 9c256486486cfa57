"""An embedded, seed-deterministic synthetic REASONING corpus.

Why: to check that an elastic (nested) model keeps its reasoning ability we need a task
where the answer is only reachable through several written-out steps, that a tiny model
can learn on a CPU/one GPU, and whose answers can be checked exactly. Two kinds:

arith  -- an expression with precedence; every step does ONE operation (products first,
          then left to right) and rewrites what is left:
              q: 3+4*2-5=?
              4*2=8 > 3+8-5
              3+8=11 > 11-5
              11-5=6
              a: 6
          Products use factors 2..9, other terms 1..50, and every running value stays in
          0..99 (no negatives, at most two digits).
list   -- sort / reverse / cumsum of single digits, one element moved or added per step,
          rewriting the partial result every time:
              q: sort [5,2,7]
              2 > [2] [5,7]
              5 > [2,5] [7]
              a: [2,5,7]

`n_steps` = number of operations (arith: operators; list: length - 1). Because each step
rewrites the remaining state, length grows ~quadratically. With the char tokenizer and
<bos>/<eos>: 2-3 steps take 35-96 tokens (mean ~68), so one fits a 96-token context;
8-12 steps take 185-483 tokens (mean ~340), so they need a 512-token context (~5x).

Train / valid / test are disjoint BY CONSTRUCTION: a problem's split is a fixed hash of
its prompt (`split_of`), and each split only ever keeps its own problems. Seeds are
derived from (seed, split, ...) so the splits also draw independent streams.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .tokenizer import CharTokenizer

KINDS = ("arith", "list")
LIST_OPS = ("sort", "reverse", "cumsum")
SPLITS = ("train", "valid", "test")
STEP_RANGES = {"short": (2, 3), "long": (8, 12)}  # suggested (min_steps, max_steps)
_SPLIT_ALIASES = {"heldout": "test", "validation": "valid"}


@dataclass(frozen=True)
class Problem:
    prompt: str  # "q: ...\n"
    solution: str  # written-out steps, ending with the answer line "a: X"
    answer: str  # exactly the X of the answer line
    kind: str = ""
    n_steps: int = 0

    @property
    def text(self) -> str:
        return self.prompt + self.solution


# ----------------------------------------------------------------------------------------
# seeds and splits


def derive_seed(*parts) -> int:
    """Stable 64-bit seed from any parts (independent of PYTHONHASHSEED and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def canonical_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or 'heldout'")
    return split


def split_of(prompt: str) -> str:
    """The split a problem belongs to: 5% test (held-out), 5% valid, 90% train."""
    bucket = int.from_bytes(hashlib.md5(prompt.encode()).digest()[:4], "little") % 20
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


# ----------------------------------------------------------------------------------------
# problem generators


def _fmt(xs: Sequence[int]) -> str:
    return "[" + ",".join(map(str, xs)) + "]"


def _render(terms: list, signs: list[str]) -> str:
    """terms: int or (a, b) product; signs[i] joins terms[i] and terms[i+1]."""
    parts = [t if isinstance(t, int) else f"{t[0]}*{t[1]}" for t in terms]
    out = str(parts[0])
    for sign, part in zip(signs, parts[1:]):
        out += f"{sign}{part}"
    return out


def _value(t) -> int:
    return t if isinstance(t, int) else t[0] * t[1]


def _arith(rng: random.Random, n_steps: int) -> Problem:
    def term(product: bool):
        return (rng.randint(2, 9), rng.randint(2, 9)) if product else rng.randint(1, 50)

    ops_left = n_steps
    first_is_product = ops_left >= 1 and rng.random() < 0.3
    terms, signs = [term(first_is_product)], []
    ops_left -= first_is_product
    total = _value(terms[0])
    while ops_left > 0:
        product = ops_left >= 2 and rng.random() < 0.4
        while True:  # resample until the running value can stay within 0..99
            t = term(product)
            v = _value(t)
            ok = [s for s, r in (("+", total + v), ("-", total - v)) if 0 <= r <= 99]
            if ok:
                break
        sign = rng.choice(ok)
        total = total + v if sign == "+" else total - v
        terms.append(t)
        signs.append(sign)
        ops_left -= 1 + product

    prompt = f"q: {_render(terms, signs)}=?\n"
    steps = []
    for i, t in enumerate(terms):  # products first, left to right
        if not isinstance(t, int):
            terms[i] = t[0] * t[1]
            line = f"{t[0]}*{t[1]}={terms[i]}"
            steps.append(line + (f" > {_render(terms, signs)}" if len(terms) > 1 else ""))
    while signs:  # then fold + and - left to right
        a, sign, b = terms[0], signs[0], terms[1]
        r = a + b if sign == "+" else a - b
        terms, signs = [r] + terms[2:], signs[1:]
        steps.append(f"{a}{sign}{b}={r}" + (f" > {_render(terms, signs)}" if signs else ""))
    answer = str(terms[0])
    assert answer == str(total)
    return Problem(prompt, "".join(s + "\n" for s in steps) + f"a: {answer}", answer, "arith", n_steps)


def _list(rng: random.Random, n_steps: int) -> Problem:
    op = rng.choice(LIST_OPS)
    while True:
        xs = [rng.randint(0, 9) for _ in range(n_steps + 1)]
        if op != "cumsum" or sum(xs) <= 99:  # keep running sums at two digits
            break
    steps = []
    if op == "cumsum":
        sums = [xs[0]]
        for x in xs[1:]:
            sums.append(sums[-1] + x)
            steps.append(f"{sums[-2]}+{x}={sums[-1]} > {_fmt(sums)}")
        result = sums
    else:  # sort takes the minimum, reverse takes the last element
        out, rest = [], list(xs)
        for _ in range(n_steps):
            x = min(rest) if op == "sort" else rest[-1]
            del rest[rest.index(x) if op == "sort" else -1]
            out.append(x)
            steps.append(f"{x} > {_fmt(out)} {_fmt(rest)}")
        result = out + rest
    answer = _fmt(result)
    solution = "".join(s + "\n" for s in steps) + f"a: {answer}"
    return Problem(f"q: {op} {_fmt(xs)}\n", solution, answer, "list", n_steps)


_GENERATORS = {"arith": _arith, "list": _list}


def _check_args(min_steps: int, max_steps: int, kinds: Sequence[str]) -> None:
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    bad = [k for k in kinds if k not in _GENERATORS]
    if not kinds or bad:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")


def _draw(rng, min_steps, max_steps, kinds, split: str | None, max_tries: int = 10_000) -> Problem:
    """One random problem, rejection-sampled to belong to `split` (None: any split)."""
    for _ in range(max_tries):
        p = _GENERATORS[rng.choice(kinds)](rng, rng.randint(min_steps, max_steps))
        if split is None or split_of(p.prompt) == split:
            return p
    raise RuntimeError(f"could not draw a {split!r} problem in {max_tries} tries")


def generate_problems(
    n: int,
    seed: int,
    min_steps: int = 2,
    max_steps: int = 3,
    kinds: Sequence[str] = KINDS,
    split: str | None = None,
) -> list[Problem]:
    """n problems, deterministic in all arguments. With `split`, only that split's problems."""
    kinds = tuple(kinds)
    _check_args(min_steps, max_steps, kinds)
    split = None if split is None else canonical_split(split)
    rng = random.Random(derive_seed("problems", seed, split or "any", min_steps, max_steps, kinds))
    return [_draw(rng, min_steps, max_steps, kinds, split) for _ in range(n)]


def heldout_problems(
    n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 3, kinds: Sequence[str] = KINDS
) -> list[Problem]:
    """n DISTINCT test-split problems (never seen in training) for exact-answer accuracy."""
    kinds = tuple(kinds)
    _check_args(min_steps, max_steps, kinds)
    rng = random.Random(derive_seed("heldout", seed, min_steps, max_steps, kinds))
    seen, out = set(), []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        p = _draw(rng, min_steps, max_steps, kinds, "test")
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct held-out problems exist for these settings")
    return out


_ANSWER_RE = re.compile(r"^a:[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)


def extract_answer(generated_text: str) -> str | None:
    """The X of the first "a: X" line, or None if the model never wrote one."""
    m = _ANSWER_RE.search(generated_text)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------
# packed torch dataset


class SyntheticReasoningDataset(Dataset):
    """Fixed-length LM samples in megatron's GPT batch format, generated on the fly.

    Sample `idx` is a pure function of (seed, split, idx, seq_length, min/max_steps, kinds):
    whole problems `<bos> text <eos>` are packed greedily into seq_length + 1 tokens and the
    tail is padded. A problem longer than the window (only if the context is too short for
    max_steps) is truncated. No state, so any worker can produce any index.

    Returns dict with
        tokens       int64  [s]  window[:-1]
        labels       int64  [s]  window[1:]
        loss_mask    float32[s]  1.0 where the label is a real token, 0.0 on padding
        position_ids int64  [s]  0..s-1 (not reset at document boundaries, like GPTDataset
                                 with reset_position_ids=False)
    """

    def __init__(
        self,
        seq_length: int,
        num_samples: int,
        seed: int = 1234,
        split: str = "train",
        min_steps: int = 2,
        max_steps: int = 3,
        kinds: Sequence[str] = KINDS,
        tokenizer=None,
    ) -> None:
        if seq_length < 2 or num_samples < 0:
            raise ValueError(f"bad seq_length={seq_length} or num_samples={num_samples}")
        self.kinds = tuple(kinds)
        _check_args(min_steps, max_steps, self.kinds)
        self.seq_length, self.num_samples, self.seed = seq_length, num_samples, seed
        self.split = canonical_split(split)
        self.min_steps, self.max_steps = min_steps, max_steps
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer()

    def __len__(self) -> int:
        return self.num_samples

    def window(self, idx: int) -> tuple[list[int], int]:
        """(seq_length + 1 token ids, number of real (non-pad) tokens) for sample idx."""
        tok, size = self.tokenizer, self.seq_length + 1
        rng = random.Random(
            derive_seed("sample", self.seed, self.split, idx, self.seq_length,
                        self.min_steps, self.max_steps, self.kinds)
        )
        buf: list[int] = []
        while len(buf) < size:
            p = _draw(rng, self.min_steps, self.max_steps, self.kinds, self.split)
            ids = [tok.bos_id] + tok.encode(p.text) + [tok.eos_id]
            if buf and len(buf) + len(ids) > size:
                break  # next problem does not fit whole: pad instead of cutting it
            buf.extend(ids[: size - len(buf)])
        n_real = len(buf)
        return buf + [tok.pad_id] * (size - n_real), n_real

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not -self.num_samples <= idx < self.num_samples:
            raise IndexError(f"index {idx} out of range for {self.num_samples} samples")
        idx %= self.num_samples
        ids, n_real = self.window(idx)
        window = torch.tensor(ids, dtype=torch.long)  # [s+1]
        s = self.seq_length
        loss_mask = (torch.arange(s) + 1 < n_real).float()  # label j is window[j+1]
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(s, dtype=torch.long),
        }
