"""The `makemost` command: demo, ppl, generate, info.

MODEL is a Hugging Face checkpoint folder, a .gguf file, a hub id (with a network), or
"default" / "-" for the embedded SmolLM2-135M-Instruct. Every command prints a
readable table, or exactly one JSON object on stdout with --json. Errors in the input
print one `error: ...` line on stderr and exit with status 2; progress bars go to stderr.

Example:
    $ makemost ppl default book.txt --context 512 --stride 256 --json
    {"command": "ppl", "model": "default", "ppl": 14.2, ...}
    $ makemost generate default "The capital of France is" --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from makemost_jax.errors import InputError, MakemostError

DEFAULT_MODEL_HELP = 'checkpoint folder, .gguf file, hub id, or "default" / "-" for the embedded SmolLM2-135M'


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"text file {path!r} does not exist; give the path of a UTF-8 text file")
    except IsADirectoryError:
        raise InputError(f"{path!r} is a folder; give the path of a UTF-8 text file")
    except UnicodeDecodeError as e:
        raise InputError(f"text file {path!r} is not UTF-8 ({e.reason} at byte {e.start}); "
                         "convert it, e.g. with iconv -t utf-8")


def _load(model: str, dtype: str, tokenizer: bool = True):
    """(params, tokenizer or None, load seconds)."""
    import makemost_jax as mm

    t0 = time.perf_counter()
    params = mm.load(model, dtype=dtype)
    tok = mm.load_tokenizer(model) if tokenizer else None
    return params, tok, time.perf_counter() - t0


def _print_table(title: str, rows: dict):
    print(title)
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        print(f"  {key:<{width}}  {value}")


def cmd_demo(args) -> dict:
    from makemost_jax.demo import run_demo

    return {"command": "demo", **run_demo(json=args.json)}


def cmd_ppl(args) -> dict:
    from makemost_jax.perplexity import perplexity_of_text

    text = _read_text(args.file)
    params, tok, load_seconds = _load(args.model, args.dtype)
    result = perplexity_of_text(params, tok, text, context=args.context, stride=args.stride,
                                batch_size=args.batch_size, progress=not args.json)
    report = {"command": "ppl", "model": args.model, "file": args.file, "dtype": args.dtype,
              "n_characters": len(text), "load_seconds": load_seconds, **result.to_dict()}
    if not args.json:
        _print_table(f"perplexity of {args.file} under {args.model}", {
            "tokens scored": result.n_tokens, "words": result.n_words,
            "ppl per token": result.ppl, "ppl per word": result.word_ppl,
            "bits per token": result.bits_per_token, "NLL (nats)": result.nll_sum,
            "windows": f"{result.n_windows} (context {result.context}, stride {result.stride}, "
                       f"batch {result.batch_size})",
            "seconds": f"{result.seconds:.2f} (load {load_seconds:.2f})",
            "tokens per second": result.tokens_per_second})
    return report


def cmd_generate(args) -> dict:
    from makemost_jax.decoding import generate_text

    params, tok, load_seconds = _load(args.model, args.dtype)
    t0 = time.perf_counter()
    generations = generate_text(params, tok, args.prompts, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed)
    seconds = time.perf_counter() - t0
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if not args.json:
        for g in generations:
            print(f"{g['prompt']}\u2192{g['completion']}")
            print(f"  ({g['n_new_tokens']} tokens, log p = {g['logprob']:.2f})")
        print(f"{seconds:.2f} s (compilation included), load {load_seconds:.2f} s; "
              + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return {"command": "generate", "model": args.model, "dtype": args.dtype, **settings,
            "generations": generations, "seconds": seconds, "load_seconds": load_seconds}


def cmd_info(args) -> dict:
    from makemost_jax.loading import model_summary

    params, _, load_seconds = _load(args.model, args.dtype, tokenizer=False)
    summary = model_summary(params)
    if not args.json:
        _print_table(f"model {args.model}", {**summary, "load seconds": load_seconds})
    return {"command": "info", "model": args.model, **summary, "load_seconds": load_seconds}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `makemost` (exposed for docs and tests).

    Example:
        >>> build_parser().parse_args(["ppl", "default", "a.txt", "--stride", "256"]).stride
        256
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    multi = common.add_argument_group("multi-host (jax.distributed)")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process job first (TPU pods and SLURM are detected automatically)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    multi.add_argument("--num-processes", type=int, help="number of processes in the job")
    multi.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes-1")
    with_model = argparse.ArgumentParser(add_help=False)
    with_model.add_argument("model", metavar="MODEL", help=DEFAULT_MODEL_HELP)
    with_model.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                            help="parameter dtype (default float32)")

    parser = argparse.ArgumentParser(prog="makemost", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", parents=[common], help="tour of the embedded model: perplexity and generation")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("ppl", parents=[common, with_model], help="perplexity of a text file")
    p.add_argument("file", metavar="FILE", help="UTF-8 text file")
    p.add_argument("--context", type=int, default=None,
                   help="input tokens per window (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="step between windows (default: context, i.e. disjoint windows)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    p.set_defaults(run=cmd_ppl)

    p = sub.add_parser("generate", parents=[common, with_model], help="continue prompts")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="text to continue (batched)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("info", parents=[common, with_model], help="architecture and size of a model")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `makemost` with `argv` (default: sys.argv[1:]); returns the exit status.

    Example:
        >>> # main(["info", "default", "--json"])  # prints one JSON object, returns 0
    """
    args = build_parser().parse_args(argv)
    try:
        if args.distributed:
            from makemost_jax.training import maybe_initialize_distributed

            maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=True)
        report = args.run(args)
    except MakemostError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
