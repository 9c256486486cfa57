"""Data for elastic_megatron: tokenizers, the synthetic reasoning corpus, megatron indexed data.

Importing this package is cheap; megatron-core is only imported when indexed data is used.
"""

from .indexed import build_gpt_datasets, megatron_tokenizer, write_indexed_dataset
from .prepare import DataFormatError, prepare_data, write_synthetic_jsonl
from .synthetic import (
    KINDS,
    SPLITS,
    STEP_RANGES,
    Problem,
    SyntheticReasoningDataset,
    extract_answer,
    generate_problems,
    heldout_problems,
    split_of,
)
from .tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "CharTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "KINDS",
    "SPLITS",
    "STEP_RANGES",
    "Problem",
    "SyntheticReasoningDataset",
    "extract_answer",
    "generate_problems",
    "heldout_problems",
    "split_of",
    "write_indexed_dataset",
    "build_gpt_datasets",
    "megatron_tokenizer",
    "DataFormatError",
    "prepare_data",
    "write_synthetic_jsonl",
]
