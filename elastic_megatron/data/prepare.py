"""JSONL -> megatron .bin/.idx, and a sample JSONL from the synthetic corpus.

Why write to a temporary prefix and rename at the end: a crash or a bad line halfway
through a large file must not leave a half-written .bin/.idx pair that later trains on
garbage (or silently replaces a good one). Either the full output appears, or nothing.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

from tqdm import tqdm

from .indexed import write_indexed_dataset
from .synthetic import KINDS, generate_problems
from .tokenizer import load_tokenizer


class DataFormatError(ValueError):
    """A JSONL line that cannot be used; the message names the file and line number."""


def _iter_texts(path: str, text_key: str, stats: dict, show_progress: bool) -> Iterator[str]:
    """Yield the `text_key` string of every non-blank line, failing loudly on bad lines."""
    with open(path, "rb") as f, tqdm(
        total=os.path.getsize(path), unit="B", unit_scale=True,
        desc=f"tokenizing {os.path.basename(path)}", disable=not show_progress,
    ) as bar:
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                stats["num_blank_lines"] += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if text_key not in obj:
                raise DataFormatError(f"{where}: missing key {text_key!r} (keys: {sorted(obj)})")
            text = obj[text_key]
            if not isinstance(text, str):
                raise DataFormatError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
            stats["num_chars"] += len(text)
            yield text


def _remove_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def prepare_data(
    input_jsonl: str,
    output_prefix: str,
    tokenizer_spec: str = "char",
    text_key: str = "text",
    append_eod: bool = True,
    show_progress: bool = True,
    prepend_bos: bool = False,
) -> dict:
    """Tokenize a JSONL file (one object per line, text under `text_key`) into
    `output_prefix.bin/.idx`, one document per line (+ eos as end-of-document).
    prepend_bos=True gives the `<bos> text <eos>` layout of SyntheticReasoningDataset;
    the default follows megatron's convention (documents separated by eod only).

    Blank lines are skipped; any other unusable line, or a file without a single document,
    raises DataFormatError naming it, and then no output file is left behind. Returns statistics about what was written.
    """
    if not os.path.isfile(input_jsonl):
        raise DataFormatError(f"input '{input_jsonl}' not found; give a JSONL file with one {{\"text\": ...}} "
                              "object per line")
    tok = load_tokenizer(tokenizer_spec)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    stats = {"num_chars": 0, "num_blank_lines": 0}

    def documents():
        for text in _iter_texts(input_jsonl, text_key, stats, show_progress):
            ids = ([tok.bos_id] if prepend_bos else []) + tok.encode(text)
            if append_eod:
                ids.append(tok.eos_id)
            yield ids

    try:
        written = write_indexed_dataset(documents(), tmp, tok.vocab_size)
        if written["num_documents"] == 0:
            raise DataFormatError(f"{input_jsonl}: no documents (the file is empty or only blank lines); "
                                  f"give a JSONL with one {{\"{text_key}\": ...}} object per line")
        # .bin first: megatron opens a dataset through its .idx, which appears last.
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    except BaseException:
        _remove_quietly(tmp + ".bin", tmp + ".idx")
        raise
    return {
        **written,
        **stats,
        "vocab_size": tok.vocab_size,
        "tokenizer": tokenizer_spec,
        "bin_path": output_prefix + ".bin",
        "idx_path": output_prefix + ".idx",
    }


def write_synthetic_jsonl(
    path: str,
    n: int,
    seed: int = 1234,
    min_steps: int = 2,
    max_steps: int = 3,
    kinds: Sequence[str] = KINDS,
    split: str = "train",
) -> str:
    """Write n synthetic problems of `split` as JSONL ({"text", "prompt", "answer", "kind",
    "n_steps"} per line), atomically. Returns the path."""
    problems = generate_problems(n, seed, min_steps, max_steps, kinds=kinds, split=split)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in problems:
                row = {"text": p.text, "prompt": p.prompt, "answer": p.answer,
                       "kind": p.kind, "n_steps": p.n_steps}
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path
