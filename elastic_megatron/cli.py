"""`elastic-megatron` command line: one subcommand per job, one config tree for all of them.

    elastic-megatron train --config configs/tiny.yaml train.steps=100 parallel.tensor=2
    torchrun --standalone --nproc_per_node=4 -m elastic_megatron.cli train parallel.tensor=2 parallel.pipeline=2
    elastic-megatron prepare-data --input docs.jsonl --output data/docs --tokenizer char

Dotted `key=value` overrides follow the YAML. A config or input error prints one line (once, by
rank 0 under torchrun) and every process exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML file or preset name from configs/ (default: the embedded tiny model)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3 parallel.tensor=2")


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)  # fail fast, before megatron's slow import
    from .train.loop import train

    result = train(cfg)
    if _rank() == 0:
        print(f"trained {result.steps} steps ({result.params:,} parameters); "
              f"final loss {result.losses[-1] if result.losses else float('nan'):.4f}")
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics:    {result.metrics}")
    return 0


def cmd_prepare_data(args) -> int:
    from .data.prepare import prepare_data

    stats = prepare_data(args.input, args.output, tokenizer_spec=args.tokenizer, text_key=args.text_key,
                         show_progress=sys.stderr.isatty())
    print(f"wrote {stats['num_documents']:,} documents, {stats['num_tokens']:,} tokens ({stats['dtype']}, "
          f"vocab {stats['vocab_size']:,}) to {stats['bin_path']} and {stats['idx_path']}")
    return 0


def cmd_importance(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from .elastic.jobs import importance_job

    result = importance_job(cfg)
    if _rank() == 0:
        print(f"importance scores: {result['importance']}")
        print(f"layer order (most important first): {result['layer_order']}")
        print(f"sorted parent: {result['sorted_checkpoint']} (config {result['config']})")
    return 0


def cmd_slice(args) -> int:
    cfg = _export_config(args) if args.checkpoint else load_config(args.config, args.overrides)
    from .elastic.jobs import slice_job

    rows = slice_job(cfg, args.budget, args.out, args.router)
    for r in rows:
        print(f"{r['budget']:>8}  target {r['target']:>14,.0f}  params {r['params']:>14,}  "
              f"pattern {r['pattern']}  -> {r['path']}")
    return 0


def cmd_elastic(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from .train.elastic_loop import elastic_train

    result = elastic_train(cfg)  # the depth ranking comes from elastic.importance_path
    if _rank() == 0:
        print(f"elastic training done: final loss {result.losses[-1]:.4f}")
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics:    {result.metrics}")
    return 0


def cmd_plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from .data.tokenizer import load_tokenizer
    from .model.hybrid import padded_vocab_size
    from .plan import format_plan, parse_bytes, plan_both_recompute

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    mem, overhead = parse_bytes(args.gpu_memory), parse_bytes(args.overhead, "--overhead")
    # padded for the largest TP the plan tries (TP stays inside a node)
    vocab = padded_vocab_size(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, args.gpus_per_node)
    rows = plan_both_recompute(cfg, vocab, mem, args.nodes, args.gpus_per_node, overhead)
    print(format_plan(rows, mem, cfg.parallel.sequence_parallel))
    fits: dict[tuple, bool] = {}  # (tp, pp, dp, distributed optimizer, train.recompute) -> every phase fits
    for r in rows:
        k = (r["tp"], r["pp"], r["dp"], r["distributed_optimizer"], r["run_recompute"])
        fits[k] = fits.get(k, True) and r["fits"]
    every = [k for k, ok in fits.items() if ok]
    if every:
        tp, pp, dp, do, rc = min(every, key=lambda k: (k[0] * k[1], not k[3], k[4] != "none"))
        own = [f"{st.name}: {st.recompute}" for st in cfg.curriculum if st.recompute and st.recompute != rc]
        print(f"fits every phase: {len(every)} of {len(fits)} layouts; e.g. TP {tp} x PP {pp} x DP {dp}, "
              f"distributed optimizer {'on' if do else 'off'}, recompute {rc}"
              + (f" (stage {', '.join(own)})" if own else ""))
    else:
        print(f"no layout fits every phase in {mem / 2**30:.0f} GiB per GPU on {args.nodes} x {args.gpus_per_node} GPUs")
    return 0


def cmd_import_hf(args) -> int:
    from .formats.hf_jobs import import_config, import_hf_job

    import_config(args.hf_dir, args.out, args.config, args.overrides)  # fail fast, before megatron's import
    r = import_hf_job(args.hf_dir, args.out, args.config, args.overrides)
    if _rank() == 0:
        tied = " (tied embeddings: the output layer starts as a copy of the input one)" if r["tied"] else ""
        print(f"imported {r['params']:,} parameters, pattern {r['pattern']}{tied}")
        print(f"parent checkpoint: {r['checkpoint']}")
        print(f"config: {r['config']} (give it to train / importance / elastic-train with --config)")
    return 0


def _export_config(args):
    from .formats.hf_jobs import resolve_export_config

    if not args.checkpoint and not args.config:
        raise ConfigError("give --checkpoint (an elastic-train, sorted or imported run / checkpoint) or --config")
    return resolve_export_config(args.config, args.checkpoint, args.overrides)


def cmd_export_hf(args) -> int:
    from .formats.hf_jobs import export_hf_job
    from .plan import parse_bytes

    cfg = _export_config(args)
    rows = export_hf_job(cfg, args.budget, args.out, args.router, args.dtype, parse_bytes(args.max_shard_size, "--max-shard-size"))
    for r in rows:
        print(f"{r['budget']:>8}  params {r['params']:>14,}  exported {r['exported_params']:>14,}  "
              f"{r['format']}  -> {r['path']}")
    return 0


def cmd_generate(args) -> int:
    from .generate import generate_elastic, generate_hf, is_hf_dir

    prompts = args.prompt or []
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT")
    if args.max_new < 1:
        raise ConfigError(f"--max-new {args.max_new}: give a positive number of tokens")
    if args.checkpoint and is_hf_dir(args.checkpoint):
        texts = generate_hf(args.checkpoint, prompts, args.max_new)
    else:
        cfg = _export_config(args)
        texts = generate_elastic(cfg, args.budget or cfg.elastic.budgets[0], prompts, args.max_new, args.router)
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}")
    return 0


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"serve needs FastAPI and uvicorn ({exc}); pip install 'elastic-megatron[serve]'") from None
    from .serve.app import serve

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give a TCP port (0-65535)")
    serve(_export_config(args), args.budget, args.host, args.port, args.router, args.answer_switch)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, args.overrides, n_short=args.short_problems, n_long=args.long_problems,
                      train_parent=args.train_parent)
    print(f"report: {args.out}/report.md, {args.out}/report.json, {args.out}/quality_vs_params.png")
    return 0 if report["nested"] else 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other bad input (exit 2), naming where
    the full usage is, instead of the usage block followed by the error."""

    def error(self, message: str):
        print(f"elastic-megatron: error: {message} (see '{self.prog} -h')", file=sys.stderr, flush=True)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elastic-megatron", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the warnings megatron prints where Transformer Engine / Apex are absent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the hybrid parent (torchrun for several processes)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("prepare-data", help="tokenize JSONL into megatron .bin/.idx files")
    p.add_argument("--input", required=True, help="JSONL file, one {\"text\": ...} object per line")
    p.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--tokenizer", default="char", help="char (built-in) or a Hugging Face tokenizer name/path")
    p.add_argument("--text-key", default="text", help="JSON key holding the document text")
    p.set_defaults(func=cmd_prepare_data)
    p = sub.add_parser("importance", help="score channels/heads/layers of a parent and write it sorted")
    _add_config_args(p)
    p.set_defaults(func=cmd_importance)
    p = sub.add_parser("plan", help="per-GPU memory of parent training and each elastic stage, per layout")
    _add_config_args(p)
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB or 141GB")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP stays inside a node)")
    p.add_argument("--overhead", default="3GB", help="CUDA context, NCCL and allocator allowance per GPU")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("demo", help="the main job: parent -> importance -> elastic training -> 3 sliced models")
    p.add_argument("--out", default="demo_out", help="output directory (a trained parent there is reused)")
    p.add_argument("--short-problems", type=int, default=256, help="held-out short problems per evaluation")
    p.add_argument("--long-problems", type=int, default=64, help="held-out long problems per evaluation")
    p.add_argument("--train-parent", action="store_true",
                   help="train the parent here (~6-8 min on 2 cores) even where the shipped one, trained by the "
                        "same recipe, would do (any override of a model, data or train field trains it anyway)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the demo config, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("elastic-train", help="train the sorted parent's nested family (router + KD + curriculum)")
    _add_config_args(p)
    p.set_defaults(func=cmd_elastic)
    p = sub.add_parser("slice", help="cut budgets out of a sorted parent into standalone checkpoints")
    p.add_argument("--checkpoint", default="", help="elastic-train / sorted run or checkpoint; its config is read "
                                                    "from it (instead of --config + checkpoint.load)")
    _add_config_args(p)
    p.add_argument("--budget", action="append", default=[],
                   help="budget to cut (repeatable): a parameter count like 2.5M / 6B or a fraction like 0.5; "
                        "default: elastic.budgets")
    p.add_argument("--out", required=True, help="output directory (one sub-directory per budget)")
    p.add_argument("--router", default="", help="a saved router (torch.save'd RouterSet); default: fit one to "
                                                 "the budgets with the budget loss alone")
    p.set_defaults(func=cmd_slice)
    p = sub.add_parser("import-hf", help="a Hugging Face NemotronH checkpoint -> our config + dist checkpoint")
    p.add_argument("hf_dir", help="Hugging Face model directory: config.json, *.safetensors, tokenizer files")
    p.add_argument("--out", required=True, help="run directory to create (config.yaml, parent/, tokenizer/)")
    _add_config_args(p)
    p.set_defaults(func=cmd_import_hf)
    for name, helptext, func in (("export-hf", "write budgets as Hugging Face directories (transformers, vLLM)",
                                  cmd_export_hf),
                                 ("generate", "greedy generation from one budget of an elastic checkpoint, or "
                                              "from an exported Hugging Face directory", cmd_generate)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", default="", help="run directory or checkpoint (its config is read from it)"
                       + ("" if name == "export-hf" else "; or an exported Hugging Face directory"))
        _add_config_args(p)
        p.add_argument("--router", default="", help="a saved router (torch.save'd RouterSet)")
        if name == "export-hf":
            p.add_argument("--budget", action="append", default=[],
                           help="budget to export (repeatable): 6B, 0.5, 1.0 (the full model); default: elastic.budgets")
            p.add_argument("--out", required=True, help="output directory (one sub-directory per budget)")
            p.add_argument("--dtype", default="auto", help="auto (the imported parent's, else the run's), float32, "
                                                           "bfloat16, float16")
            p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB")
        else:
            p.add_argument("--budget", default="", help="budget to cut (default: the first of elastic.budgets)")
            p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
            p.add_argument("--max-new", type=int, default=64, help="largest number of new tokens")
        p.set_defaults(func=func)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for every budget of one checkpoint "
                                     "(one set of weights, the budget chosen per request)")
    p.add_argument("--checkpoint", default="", help="elastic-train / sorted run or checkpoint (its config is read from it)")
    _add_config_args(p)
    p.add_argument("--budget", action="append", default=[],
                   help="budget to serve (repeatable): 6B, 0.5, ...; default: elastic.budgets. The full model is "
                        "always served")
    p.add_argument("--router", default="", help="a saved router (torch.save'd RouterSet)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one, printed at start)")
    p.add_argument("--answer-switch", default="a:", help="the text where a budget_schedule request switches from "
                                                         "its think budget to its answer budget (default: the "
                                                         "demo corpus's answer line)")
    p.set_defaults(func=cmd_serve)
    return parser


# What megatron says on every import where Transformer Engine and Apex are missing (any CPU box):
# true, expected there, and eight lines that bury the one line a user needs. `--verbose` shows them.
# The deprecation megatron's own checkpoint loader trips in torch is likewise nothing a user can act on.
_CPU_ONLY_WARNINGS = (r"Transformer Engine and Apex are not installed", r"full scope is deprecated",
                      r"`load_state_dict` is deprecated")


def _quiet_cpu_warnings() -> None:
    import warnings

    # transformers' notes that mamba-ssm / causal-conv1d are absent (their pure-torch paths are
    # exact) and its weight-loading progress bar, likewise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    for text in _CPU_ONLY_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def _demo_thread_policy(command: str) -> None:
    """The demo's OpenMP threads spin between parallel regions instead of going to sleep, unless
    OMP_WAIT_POLICY is set. A sliced subnet's step is many short ops, and a worker that went to sleep
    between two of them comes back late: on an idle 2-core box the small stage's steps took 0.85x as
    long, with the same losses bit for bit; the parent's (larger ops) 0.99x, within noise
    (benchmarks/cpu_threads.py, docs/performance.md). libgomp reads the variable once, when
    torch loads it, hence here. Only the demo (a batch job for a box of its own): a spinning worker
    takes a core from anything else running, and would take one from an idle `serve` for good. On a
    box shared with other busy processes set OMP_WAIT_POLICY=PASSIVE (README)."""
    if command == "demo":
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")


def _rank() -> int:
    """This process's global rank: torchrun's RANK (set before any process group exists), else 0."""
    return int(os.environ.get("RANK", "0"))


def _exit_with_peers(code: int, timeout_s: float = 30.0) -> None:
    """Under torchrun, end this failed rank only once every rank has failed too (or after `timeout_s`),
    all at the same moment and with `code`: torchrun stops the remaining workers with SIGTERM as soon
    as it sees one exit, so a rank that is merely slower would otherwise end by signal. Counted on
    torchrun's own store (the agent's, reachable before any process group). Returns when not under
    torchrun (or no store answers); otherwise does not return."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import signal
    import time
    from datetime import timedelta

    import torch.distributed as dist

    # from here on torchrun's SIGTERM (sent when a peer is seen exiting first) ends us with `code` too
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    key = f"elastic_megatron/input_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timedelta(seconds=timeout_s))
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # no store to agree on: exit now
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # at once: no interpreter teardown between the ranks' exits


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse cannot take positionals on both sides of an option (import-hf DIR --out X a.b=1):
    # dotted overrides it left over join the others; anything else is still an error
    bad = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    _demo_thread_policy(args.command)  # before anything imports torch (and with it libgomp)
    if not args.verbose:
        _quiet_cpu_warnings()
    from .compat.backends import BackendUnavailable
    from .data.prepare import DataFormatError
    from .train.preemption import Preempted

    try:
        return args.func(args)
    except Preempted as exc:  # checkpointed at a step boundary: not success, so afterok chains wait
        if _rank() == 0:
            print(f"elastic-megatron: {exc}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C outside a training step loop, or twice inside one
        if _rank() == 0:
            print("elastic-megatron: interrupted (SIGINT); complete checkpoints are kept, an unfinished save "
                  "is removed when the command is run again", file=sys.stderr, flush=True)
        return 130
    except (ConfigError, DataFormatError, FileNotFoundError, BackendUnavailable) as exc:  # CheckpointError is a ConfigError
        # Every rank meets the same config or input, so every rank fails alike: rank 0 says it
        # once and all of them exit 2 (torchrun then adds its own summary of the failed ranks).
        if _rank() == 0:
            print(f"elastic-megatron: error: {exc}", file=sys.stderr, flush=True)
        _exit_with_peers(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
