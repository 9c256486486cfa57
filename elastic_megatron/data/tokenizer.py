"""Tokenizers with one tiny shared interface.

Why a character tokenizer: the synthetic reasoning corpus (see synthetic.py) only uses
a few dozen characters, and a toy model learns arithmetic far more easily when every
digit is its own token. The vocabulary is a fixed literal (never built from data), so
token ids are identical on every machine and for every seed -- checkpoints and
.bin/.idx files stay compatible.

Every tokenizer here exposes:
    vocab_size, padded_vocab_size(multiple), encode(str) -> list[int],
    decode(list[int]) -> str, pad_id, bos_id, eos_id, unk_id, vocab (str -> id).
"""

from __future__ import annotations

import math
import os

# Special ids come first so they are stable no matter how the character set evolves.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# Everything the synthetic corpus can emit (asserted in the tests), plus a little slack.
CHARS = "\n " + "0123456789" + "abcdefghijklmnopqrstuvwxyz" + "=+-*/()[],:;.?>"

UNK_CHAR = "\ufffd"  # what decode() prints for <unk>; not in CHARS, so never ambiguous


def _round_up(n: int, multiple: int) -> int:
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    return int(math.ceil(n / multiple) * multiple)


class CharTokenizer:
    """Deterministic character-level tokenizer: 4 specials + 53 characters = 57 ids."""

    def __init__(self) -> None:
        self._itos: list[str] = list(SPECIAL_TOKENS) + list(CHARS)
        self._stoi: dict[str, int] = {s: i for i, s in enumerate(self._itos)}
        assert len(self._stoi) == len(self._itos), "duplicate character in CHARS"

    # -- sizes ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """Embedding rows to allocate: vocab_size rounded up (tensor-parallel friendly)."""
        return _round_up(self.vocab_size, multiple)

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._stoi)

    # -- special ids ---------------------------------------------------------------------
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    # -- conversion ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """One id per character; characters outside the vocabulary become unk."""
        get = self._stoi.get
        return [get(c, UNK_ID) for c in text]

    def decode(self, ids) -> str:
        """Inverse of encode: stops at the first eos, skips pad/bos, shows unk as U+FFFD."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            if i == UNK_ID or not 0 <= i < len(self._itos):
                out.append(UNK_CHAR)
            else:
                out.append(self._itos[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """Thin wrapper giving a HuggingFace tokenizer the same interface as CharTokenizer.

    `transformers` is an optional dependency, imported only here.
    """

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"Tokenizer spec {name_or_path!r} needs the HuggingFace `transformers` package, "
                "which is not installed. Install it (pip install 'elastic-megatron[hf]') "
                "or use tokenizer 'char'."
            ) from e
        self.name = name_or_path
        # a path (not a hub id such as "org/name") that does not exist: say so instead of a hub lookup
        looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
        if looks_local and not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"tokenizer '{name_or_path}': no such directory; give a local Hugging Face "
                                    "tokenizer directory (tokenizer.json / tokenizer_config.json) or 'char'")
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        if self.tok.eos_token_id is None:
            raise ValueError(f"HF tokenizer {name_or_path!r} has no eos token; cannot mark ends")
        self.eos_id = int(self.tok.eos_token_id)
        # Many HF tokenizers (GPT-2, ...) lack bos/pad; fall back to eos, which is harmless
        # because our datasets mask padding by position, not by id.
        self.bos_id = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else self.eos_id
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
        unk = self.tok.unk_token_id
        self.unk_id = int(unk) if unk is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.tok)  # includes added tokens, unlike tok.vocab_size

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return _round_up(self.vocab_size, multiple)

    @property
    def vocab(self) -> dict[str, int]:
        return self.tok.get_vocab()

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str = "char"):
    """"char" -> CharTokenizer; anything else is a HF name or path -> HFTokenizer."""
    if spec is None or spec == "char":
        return CharTokenizer()
    return HFTokenizer(spec)
