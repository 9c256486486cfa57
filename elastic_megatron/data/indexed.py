"""Real data through megatron-core's indexed (.bin/.idx) datasets.

Why megatron's own classes instead of a custom loader: the same files then work with
upstream Megatron tooling (preprocess_data.py output, blends, cached sample indices),
and sample construction (document shuffling, packing across documents, epoch handling)
is exactly what large runs use.

`build_gpt_datasets` returns GPTDatasets (or BlendedDatasets) whose items have the same
keys and dtypes as SyntheticReasoningDataset:
    tokens int64 [s], labels int64 [s], loss_mask float32 [s], position_ids int64 [s]
We set create_attention_mask=False, so there is NO `attention_mask` key: the model applies
its own causal mask (and Mamba layers do not use one).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .tokenizer import load_tokenizer

Blend = Union[str, Sequence[str], Mapping[str, float]]


def _megatron_legacy_tokenizer_base():
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

    return MegatronLegacyTokenizer


def write_indexed_dataset(token_sequences: Iterable[Sequence[int]], prefix: str, vocab_size: int) -> dict:
    """Write `prefix.bin` / `prefix.idx`, one document (= one sequence) per input sequence.

    The caller appends eod if it wants one. Ids are checked against vocab_size because the
    on-disk dtype is the smallest that fits it (uint16 below 65500) and would silently
    wrap out-of-range ids. Returns {"num_documents", "num_tokens", "dtype"}.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    try:
        for seq in token_sequences:
            arr = np.asarray(seq, dtype=np.int64)  # [len]
            if arr.ndim != 1:
                raise ValueError(f"document {n_docs}: expected a flat list of ids, got shape {arr.shape}")
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(
                    f"document {n_docs}: token id out of range [0, {vocab_size}): "
                    f"min={arr.min()}, max={arr.max()}"
                )
            builder.add_document(arr, [arr.size])
            n_docs += 1
            n_tokens += int(arr.size)
    except BaseException:
        builder.data_file.close()
        os.remove(prefix + ".bin")  # never leave a .bin without its .idx
        raise
    builder.finalize(prefix + ".idx")
    return {"num_documents": n_docs, "num_tokens": n_tokens, "dtype": np.dtype(dtype).name}


def _make_adapter_class():
    """Defined lazily so that importing this module does not import megatron (slow)."""
    base = _megatron_legacy_tokenizer_base()

    class MegatronTokenizerAdapter(base):
        """Our tokenizer behind megatron's tokenizer interface (what GPTDatasetConfig wants).

        GPTDataset uses: vocab_size (on-disk dtype), eod (end of document), pad (padding
        of the last partial sample; must differ from eod/eos or megatron falls back to -1),
        and unique_identifiers (part of the cache key of the sample indices).
        """

        def __init__(self, tokenizer) -> None:
            # Deliberately not calling base.__init__: it only fills unique_identifiers and
            # logs a deprecation warning for the legacy tokenizer system on every build.
            self._tok = tokenizer
            self.unique_identifiers = OrderedDict(
                [("class", type(tokenizer).__name__), ("tokenizer_path", [repr(tokenizer)])]
            )

        def tokenize(self, text: str) -> np.ndarray:
            return np.asarray(self._tok.encode(text), dtype=np.int64)

        def detokenize(self, ids) -> str:
            return self._tok.decode(list(ids))

        @property
        def vocab(self):
            return self._tok.vocab

        @property
        def inv_vocab(self):
            return {i: s for s, i in self._tok.vocab.items()}

        @property
        def vocab_size(self) -> int:
            return self._tok.vocab_size

        @property
        def eod(self) -> int:
            return self._tok.eos_id

        @property
        def eos(self) -> int:
            return self._tok.eos_id

        @property
        def bos(self) -> int:
            return self._tok.bos_id

        @property
        def pad(self) -> int:
            # -1 is megatron's own "no pad token" id (never present in the data).
            return -1 if self._tok.pad_id in (self._tok.eos_id, self._tok.bos_id) else self._tok.pad_id

    return MegatronTokenizerAdapter


_ADAPTER_CLS = None


def megatron_tokenizer(tokenizer):
    """Wrap a CharTokenizer/HFTokenizer (or a spec string) for megatron's dataset configs."""
    global _ADAPTER_CLS
    if _ADAPTER_CLS is None:
        _ADAPTER_CLS = _make_adapter_class()
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tokenizer, _ADAPTER_CLS):
        return tokenizer
    return _ADAPTER_CLS(tokenizer)


def _parse_blend(data: Blend) -> tuple[list[str], Optional[list[float]]]:
    """"p" | ["p1", "p2"] (weights by size) | {"p1": 0.3, "p2": 0.7} -> megatron's blend."""
    if isinstance(data, str):
        prefixes, weights = [data], None
    elif isinstance(data, Mapping):
        prefixes, weights = list(data.keys()), [float(w) for w in data.values()]
    else:
        prefixes, weights = list(data), None
    if not prefixes:
        raise ValueError("no data prefixes given")
    for p in prefixes:
        missing = [p + ext for ext in (".bin", ".idx") if not os.path.exists(p + ext)]
        if missing:
            raise FileNotFoundError(f"indexed dataset files missing: {missing}")
    return prefixes, weights


def _builder_class():
    """Megatron's BlendedMegatronDatasetBuilder, fixed for a single process.

    megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() before writing
    its cached blend indices, which raises when no process group exists (single-process
    CPU runs, tests). Without one we let BlendedDataset keep its indices in memory (cheap:
    one C++ pass); the GPTDatasets below it still use the cache.
    """
    import torch
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *rest, config = args  # BlendedDataset(datasets, weights, size, config)
                config = copy.copy(config)
                config.path_to_cache = None
                args = (*rest, config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return Builder


def _fingerprint(prefixes: Sequence[str]) -> str:
    """Short hash of the data files' identity (path, size, mtime).

    Megatron keys its cached indices by path and arguments only, not by content; putting
    this fingerprint in the default cache path means re-preparing data under the same
    prefix can never reuse stale indices.
    """
    h = hashlib.sha1()
    for p in prefixes:
        st = os.stat(p + ".idx")
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def build_gpt_datasets(
    data: Blend,
    seq_length: int,
    seed: int,
    num_samples: Sequence[Optional[int]],
    tokenizer="char",
    split: str = "98,1,1",
    path_to_cache: Optional[str] = None,
):
    """(train, valid, test) megatron GPT datasets over indexed data; a split may be None.

    data: one prefix, a list of prefixes (weighted by size), or {prefix: weight}.
    num_samples: (train, valid, test) sample counts; megatron makes extra epochs as needed.
        None = one epoch, or, with explicit weights, "not needed" (that split comes back None).
    path_to_cache: where megatron caches sample/shuffle indices (default:
        <dir of first prefix>/index_cache/<fingerprint of the .idx files>). With several
        nodes it must be a directory every rank sees (rank 0 writes, the others read).
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = _parse_blend(data)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    if path_to_cache is None:
        path_to_cache = os.path.join(
            os.path.dirname(os.path.abspath(prefixes[0])), "index_cache", _fingerprint(prefixes)
        )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=path_to_cache,
        mmap_bin_files=True,
        tokenizer=megatron_tokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,  # eod is a real target: the model must learn to stop
        create_attention_mask=False,
    )
    sizes = [0 if n is None and weights is not None else n for n in num_samples]
    builder = _builder_class()(
        GPTDataset, sizes, lambda: True, config  # every rank builds (and caches)
    )
    datasets = builder.build()
    # Weighted blends: megatron needs a size for every split; we built skipped ones empty.
    return tuple(None if n is None and weights is not None else d for d, n in zip(datasets, num_samples))
