"""The `makemost` command: demo, ppl, generate, mode, hso, fewshot, info.

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


def cmd_mode(args) -> dict:
    from makemost_jax.decoding.exact import exact_length_modes, exact_mode
    from makemost_jax.errors import ConfigError

    if args.all_lengths and args.length is not None:
        raise ConfigError("--length and --all-lengths exclude each other; give one (or neither: the unconditional mode)")
    params, tok, load_seconds = _load(args.model, args.dtype)
    if tok.eos_id is None:
        raise InputError(f"the tokenizer of {args.model} has no EOS token; exact search scores outputs ending in EOS")
    settings = {"max_length": args.max_length, "length": args.length, "all_lengths": args.all_lengths,
                "node_budget": args.node_budget, "batch_size": args.batch_size, "children": args.children,
                "order": args.order, "seed_beams": args.seed_beams, "stop_at_max_length": args.stop_at_max_length}
    search = {key: settings[key] for key in ("max_length", "node_budget", "batch_size", "children", "order",
                                              "seed_beams")}
    results = []
    for prompt in args.prompts:
        ids = tok.encode_for_model(prompt)
        if args.all_lengths:
            modes = exact_length_modes(params, ids, eos_id=tok.eos_id, **search)
        else:
            modes = [exact_mode(params, ids, eos_id=tok.eos_id, length=args.length,
                                stop_at_max_length=args.stop_at_max_length, **search)]
        results.append({"prompt": prompt, "modes": [
            {**m.to_dict(), "text": None if m.tokens is None else tok.decode(m.tokens)} for m in modes]})
    if not args.json:
        for r in results:
            print(f"{r['prompt']}")
            print(f"  {'length':>6}  {'log p':>9}  {'proved':>6}  {'nodes':>7}  {'seconds':>7}  output")
            for m in r["modes"]:
                logp = "-" if m["loglik"] is None else f"{m['loglik']:.3f}"
                text = "(none found)" if m["text"] is None else repr(m["text"])
                print(f"  {m['length']:>6}  {logp:>9}  {'yes' if m['proved_optimal'] else 'no':>6}  "
                      f"{m['nodes_expanded']:>7}  {m['seconds']:>7.2f}  {text}")
        print(f"load {load_seconds:.2f} s; " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return {"command": "mode", "model": args.model, "dtype": args.dtype, **settings, "results": results,
            "load_seconds": load_seconds}


def _hso_config(args):
    from makemost_jax.hso import HSOConfig

    return HSOConfig(segment=args.segment, cache_size=args.cache_size, lr=args.lr, beta1=args.beta1,
                     beta2=args.beta2, hso_steps=args.hso_steps, recompute=not args.no_recompute,
                     offsets=args.offsets, sink=args.sink)


def cmd_hso(args) -> dict:
    from makemost_jax.hso import compare_on_tokens

    text = _read_text(args.file)
    params, tok, load_seconds = _load(args.model, args.dtype)
    ids = tok.encode_for_model(text)
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    config = _hso_config(args)
    results = compare_on_tokens(params, ids, config)
    if not args.json:
        print(f"perplexity of {args.file} under {args.model}: {results['hso']['n_tokens']} tokens, segment "
              f"{config.segment}, cache {config.cache_size}, lr {config.lr}, hso_steps {config.hso_steps}")
        print(f"  {'method':34} {'ppl':>9} {'seconds':>8} {'tokens/s':>9}")
        names = {"hso": "HSO", "lr0": "same loop, update off (lr=0)",
                 "sliding": f"sliding window ({config.segment + config.cache_size}, stride {config.segment})"}
        for key, name in names.items():
            r = results[key]
            print(f"  {name:34} {r['ppl']:9.3f} {r['seconds']:8.2f} {r['tokens_per_second']:9.1f}")
        print("  (seconds include compilation)")
    return {"command": "hso", "model": args.model, "file": args.file, "dtype": args.dtype,
            "load_seconds": load_seconds, **results}


def cmd_fewshot(args) -> dict:
    from makemost_jax.hso.fewshot import PromptFormat, fewshot_classify, load_sentiment_sample, load_tfds_task

    if args.task == "sentiment":
        (train, test), fmt = load_sentiment_sample(), PromptFormat()
    else:
        train, test, fmt = load_tfds_task(args.task, args.data_dir, max_test=args.n_test)
    params, tok, load_seconds = _load(args.model, args.dtype)
    result = fewshot_classify(params, tok, train, test[:args.n_test], k=args.k, draws=args.draws, seed=args.seed,
                              hso=_hso_config(args), labels_only=args.labels_only, fmt=fmt)
    summary = result.summary()
    if not args.json:
        print(f"{args.task}, {result.n_test} test inputs, k={result.k}, {len(result.draws)} draws "
              f"(majority class {result.majority_rate:.3f})")
        for name, s in summary.items():
            print(f"  {name:16} accuracy {s['mean']:.3f} +- {s['std']:.3f}  (min {s['min']:.3f}, max {s['max']:.3f})")
    return {"command": "fewshot", "model": args.model, "task": args.task, "lr": args.lr, "hso_steps": args.hso_steps,
            "load_seconds": load_seconds, **result.to_dict()}


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

    p = sub.add_parser("mode", parents=[common, with_model],
                       help="exact mode search: the most likely continuation, proved by branch and bound")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="text to continue (one search each)")
    p.add_argument("--max-length", type=int, default=8, help="longest output in tokens, EOS not counted (default 8)")
    p.add_argument("--length", type=int, default=None, help="the mode among outputs of exactly this many tokens")
    p.add_argument("--all-lengths", action="store_true", help="the mode at every length 0..max-length, in one search")
    p.add_argument("--node-budget", type=int, default=2000,
                   help="stop after expanding this many prefixes (default 2000); the result then is not proved")
    p.add_argument("--batch-size", type=int, default=32, help="prefixes expanded per model call (default 32)")
    p.add_argument("--children", type=int, default=16, help="next tokens taken per expansion (default 16)")
    p.add_argument("--order", choices=["depth", "best"], default="depth", help="expansion order (default depth)")
    p.add_argument("--seed-beams", type=int, default=4, help="beam width of the starting bound (0: none; default 4)")
    p.add_argument("--stop-at-max-length", action="store_true",
                   help="an output that reaches max-length without EOS also counts (unconditional mode)")
    p.set_defaults(run=cmd_mode)

    hso_knobs = argparse.ArgumentParser(add_help=False)
    knobs = hso_knobs.add_argument_group("hidden-state optimisation")
    knobs.add_argument("--segment", type=int, default=128, help="tokens per segment (default 128)")
    knobs.add_argument("--cache-size", type=int, default=384, help="cached past positions (default 384)")
    knobs.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate on the cache (default 1e-2)")
    knobs.add_argument("--beta1", type=float, default=0.9)
    knobs.add_argument("--beta2", type=float, default=0.999)
    knobs.add_argument("--hso-steps", type=int, default=1, help="updates per segment (default 1)")
    knobs.add_argument("--no-recompute", action="store_true",
                       help="append the segment's states as scored, not recomputed from the updated past")
    knobs.add_argument("--offsets", action="store_true", help="optimise additive offsets to the states")
    knobs.add_argument("--sink", type=int, default=0,
                       help="never evict the first N cached tokens (attention sinks; default 0)")

    p = sub.add_parser("hso", parents=[common, with_model, hso_knobs],
                       help="perplexity with hidden-state optimisation, beside lr=0 and the sliding window")
    p.add_argument("file", metavar="FILE", help="UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.set_defaults(run=cmd_hso)

    p = sub.add_parser("fewshot", parents=[common, with_model, hso_knobs],
                       help="few-shot sentiment classification with and without HSO on the demonstrations")
    p.add_argument("--task", choices=["sentiment", "sst2", "ag_news", "trec"], default="sentiment",
                   help="the bundled review sentences (default) or a TFDS task prepared under --data-dir")
    p.add_argument("--data-dir", default=None, help="TFDS data folder (for --task sst2 | ag_news | trec)")
    p.add_argument("--k", type=int, default=4, help="demonstrations per prompt (default 4)")
    p.add_argument("--draws", type=int, default=5, help="random draws of demonstrations (default 5)")
    p.add_argument("--n-test", type=int, default=300, help="test inputs (default 300, all of the bundled sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels-only", action="store_true", help="HSO raises the label tokens' log-probability only")
    p.set_defaults(run=cmd_fewshot)

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
