"""Tokenizer files for a Hugging Face directory, whichever tokenizer the run used.

A Hugging Face tokenizer's files are copied as they are. The built-in character tokenizer
(data/tokenizer.py) becomes an equivalent `tokenizers` model: one WordLevel token per character,
`<bos>` prepended to every encoding (our generation and evaluation start from <bos>), decoding by
plain concatenation. `AutoTokenizer.from_pretrained(dir)` then gives the ids CharTokenizer gives.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_files(directory: str | Path) -> list[Path]:
    return [Path(directory) / f for f in TOKENIZER_FILES if (Path(directory) / f).exists()]


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..data.tokenizer import BOS_ID, CharTokenizer

    char = CharTokenizer()
    tk = Tokenizer(models.WordLevel(vocab=char.vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                      special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def save_tokenizer(spec: str, out_dir: str | Path) -> list[str]:
    """Write the run's tokenizer (`data.tokenizer`: "char", a local directory or a hub name) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec == "char":
        _char_tokenizer().save_pretrained(str(out))
    elif Path(spec).is_dir() and tokenizer_files(spec):
        for f in tokenizer_files(spec):
            shutil.copy2(f, out / f.name)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(spec).save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)
