"""Config -> (train, valid) datasets, whichever source the run uses."""

from __future__ import annotations

from ..config import RunConfig


def _blend(paths: list[str]):
    """["a"] -> "a"; ["0.7", "a", "0.3", "b"] -> {"a": 0.7, "b": 0.3} (megatron's weighted blend)."""
    if len(paths) > 1 and all(_is_number(p) for p in paths[0::2]):
        return {path: float(w) for w, path in zip(paths[0::2], paths[1::2])}
    return paths[0] if len(paths) == 1 else list(paths)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def build_datasets(cfg: RunConfig, tokenizer, num_train: int, num_valid: int = 4096):
    """Datasets yielding dicts of tokens/labels/loss_mask/position_ids of length data.seq_length."""
    d, seed = cfg.data, cfg.train.seed
    if d.source == "synthetic":
        from .synthetic import SyntheticReasoningDataset

        make = lambda split, n: SyntheticReasoningDataset(  # noqa: E731
            seq_length=d.seq_length, num_samples=n, seed=seed, split=split,
            min_steps=d.min_steps, max_steps=d.max_steps, tokenizer=tokenizer)
        return make("train", num_train), make("valid", num_valid)
    from .indexed import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(_blend(d.paths), d.seq_length, seed, (num_train, num_valid, None),
                                         tokenizer=tokenizer, split=d.split)
    return train, valid
