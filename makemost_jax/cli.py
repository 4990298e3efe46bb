"""The `makemost` command: demo, ppl, generate, cbs-train, mode, hso, fewshot, recurrence, report, info, convert.

MODEL is a Hugging Face checkpoint folder, a .gguf file, a hub id (with a network), or
"default" / "-" for the embedded SmolLM2-135M-Instruct. Every command prints a
readable table, or exactly one JSON object on stdout with --json. Errors in the input
print one `error: ...` line on stderr and exit with status 2; progress bars go to stderr.

Example:
    $ makemost ppl default book.txt --context 512 --stride 256 --json
    {"command": "ppl", "model": "default", "ppl": 14.2, ...}
    $ makemost generate default "The capital of France is" --max-new-tokens 8
    $ makemost convert default --to hf smollm2-hf --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

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


def _search_settings(args) -> dict:
    """The generate settings that apply to args.search (default: greedy, or sample when --temperature > 0)."""
    from makemost_jax.errors import ConfigError

    search = args.search or ("sample" if args.temperature > 0 else "greedy")
    if (search == "sample") != (args.temperature > 0):
        raise ConfigError(f"--search {search} with --temperature {args.temperature}: sampling needs a temperature "
                          "> 0, the other searches take none")
    if search == "cbs" and not args.classifier:
        raise ConfigError("--search cbs needs --classifier DIR (a head written by makemost cbs-train)")
    if args.classifier and search != "cbs":
        raise ConfigError(f"--classifier applies to --search cbs, not {search}")
    if args.attribute and search not in ("beam", "cbs"):
        raise ConfigError(f"--attribute applies to --search beam or cbs, not {search}")
    settings = {"search": search, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if search in ("beam", "cbs"):
        settings.update(beams=args.beams, length_penalty=args.length_penalty, attribute=args.attribute)
    if search == "cbs":
        settings.update(classifier=args.classifier, weight=args.weight, prefilter=args.prefilter)
    if search == "exact":
        settings.update(node_budget=args.node_budget)
    return settings


def cmd_generate(args) -> dict:
    from makemost_jax.decoding.attributes import parse_attribute
    from makemost_jax.decoding.classifier import load_classifier, search_text

    settings = _search_settings(args)
    params, tok, load_seconds = _load(args.model, args.dtype)
    options = {k: v for k, v in settings.items() if k not in ("search", "max_new_tokens", "attribute", "classifier")}
    if settings.get("attribute"):
        options["attribute"] = parse_attribute(settings["attribute"])
    if settings.get("classifier"):
        options["classifier"] = load_classifier(settings["classifier"], params)
    texts = [tok.user_turn(p) for p in args.prompts] if args.chat else args.prompts
    t0 = time.perf_counter()
    generations = search_text(params, tok, texts, search=settings["search"], max_new_tokens=args.max_new_tokens,
                              **options)
    seconds = time.perf_counter() - t0
    for g, prompt in zip(generations, args.prompts):
        g["prompt"] = prompt  # the text as given, without the chat template
    settings["chat"] = args.chat
    if not args.json:
        for g in generations:
            if g["completion"] is None:
                print(f"{g['prompt']}\u2192(no output found)")
                continue
            print(f"{g['prompt']}\u2192{g['completion']}")
            print(f"  ({g['n_new_tokens']} tokens, log p = {g['logprob']:.2f})")
        print(f"{seconds:.2f} s (compilation included), load {load_seconds:.2f} s; "
              + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return {"command": "generate", "model": args.model, "dtype": args.dtype, **settings,
            "generations": generations, "seconds": seconds, "load_seconds": load_seconds}


def _prompt_lines(path: str | None) -> list[str]:
    if path is None:
        return []
    return [line.replace("\\n", "\n") for line in _read_text(path).splitlines() if line.strip()]


def cmd_cbs_train(args) -> dict:
    from makemost_jax.decoding.attributes import parse_attribute
    from makemost_jax.decoding.classifier import check_output_dir, fit_classifier, save_classifier
    from makemost_jax.training import TrainConfig

    attribute = parse_attribute(args.attribute)
    check_output_dir(args.out, args.overwrite)  # before the expensive part
    plain, chat = _prompt_lines(args.prompts), _prompt_lines(args.chat_prompts)
    if not plain and not chat:
        raise InputError("give prompts to sample from: --prompts FILE and/or --chat-prompts FILE (one per line)")
    params, tok, load_seconds = _load(args.model, args.dtype)
    if tok.eos_id is None:
        raise InputError(f"the tokenizer of {args.model} has no EOS token; the samples' lengths need one")
    ids = [tok.encode_for_model(t) for t in plain + [tok.user_turn(m) for m in chat]]
    settings = {"attribute": attribute.name, "samples_per_prompt": args.samples_per_prompt,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "hidden_layer": args.hidden_layer, "mlp_width": args.mlp_width,
                "train_embeddings": not args.freeze_embeddings, "steps": args.steps,
                "learning_rate": args.learning_rate, "batch_size": args.batch_size, "held_out": args.held_out,
                "seed": args.seed}
    t0 = time.perf_counter()
    config = TrainConfig(steps=args.steps, learning_rate=args.learning_rate, warmup_steps=min(20, args.steps // 10),
                         seed=args.seed, progress=not args.json)
    head, report = fit_classifier(params, ids, attribute, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                  hidden_layer=args.hidden_layer, mlp_width=args.mlp_width,
                                  train_embeddings=not args.freeze_embeddings,
                                  samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, held_out=args.held_out,
                                  train_config=config, batch_size=args.batch_size, seed=args.seed,
                                  progress=not args.json)
    seconds = time.perf_counter() - t0
    save_classifier(head, args.out, overwrite=args.overwrite, metadata={
        "model": args.model, "prompts": len(plain), "chat_prompts": len(chat), **settings, "report": report})
    if not args.json:
        held, eos = report["held_out"] or {}, report["held_out_eos"] or {}
        _print_table(f"attribute classifier for {attribute.name} on {args.model}, saved in {args.out}", {
            "prompts": f"{len(plain)} plain, {len(chat)} chat",
            "samples": f"{report['samples']} ({report['positive_samples']:.1%} with the attribute)",
            "training loss": f"{report['first_loss']:.4f} -> {report['last_loss']:.4f} ({args.steps} steps)",
            "held-out accuracy": (f"{held['accuracy']:.4f} (majority class {held['majority']:.4f}, "
                                  f"{held['rows']} prefix rows)") if held else "-",
            "held-out loss": (f"{held['loss']:.4f} (constant guess {held['constant_loss']:.4f})") if held else "-",
            "held-out EOS rows": (f"accuracy {eos['accuracy']:.4f}, loss {eos['loss']:.4f} (constant guess "
                                  f"{eos['constant_loss']:.4f})") if eos else "-",
            "seconds": f"{seconds:.1f} (load {load_seconds:.1f})"})
    return {"command": "cbs-train", "model": args.model, "out": args.out, "prompts": len(plain),
            "chat_prompts": len(chat), **settings, "report": report, "seconds": seconds,
            "load_seconds": load_seconds}


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


# Params held per layer compile about 8 s longer and run each HSO segment 10-12% faster (SmolLM2-135M, 2 cores):
# on 16,385 tokens (128 segments) the two took 108.7 and 106.9 s, so texts of twice that get them.
PER_LAYER_HSO_SEGMENTS = 256


def cmd_hso(args) -> dict:
    from makemost_jax.hso import compare_on_tokens
    from makemost_jax.models import per_layer

    text = _read_text(args.file)
    params, tok, load_seconds = _load(args.model, args.dtype)
    ids = tok.encode_for_model(text)
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    config = _hso_config(args)
    if len(ids) > PER_LAYER_HSO_SEGMENTS * config.segment:
        params, _ = per_layer(params)
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
    from makemost_jax.errors import MakemostError
    from makemost_jax.loading import load_tokenizer, model_summary
    from makemost_jax.models.registry import family_of

    args.model = args.model_option or args.model
    params, _, load_seconds = _load(args.model, args.dtype, tokenizer=False)
    summary = model_summary(params)
    summary["gguf_architecture"] = family_of(params.config.hf_model_type).gguf
    try:
        tok = load_tokenizer(args.model)
        summary["tokenizer"] = f"{tok.name or type(tok.backend).__name__}, {tok.vocab_size} ids"
    except MakemostError as e:  # a checkpoint without tokenizer files still describes its model
        summary["tokenizer"] = f"none found ({str(e).splitlines()[0][:80]})"
    if not args.json:
        _print_table(f"model {args.model}", {**summary, "load seconds": load_seconds})
    return {"command": "info", "model": args.model, **summary, "load_seconds": load_seconds}


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(text: str) -> int:
    """Bytes of a size such as "2GB" (10**9 bytes, as Hugging Face counts), "512MiB" or "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS or int(float(match.group(1)) * _SIZE_UNITS[unit]) < 1:
        raise InputError(f"--max-shard-size {text!r} is not a size; write it like 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def cmd_convert(args) -> dict:
    import jax

    from makemost_jax.checkpoints.export import DEFAULT_MAX_SHARD_BYTES, save_hf, save_orbax

    if args.to == "orbax" and args.max_shard_size is not None:
        raise InputError("--max-shard-size applies to --to hf; an Orbax checkpoint has no shard files to size")
    max_shard_bytes = DEFAULT_MAX_SHARD_BYTES if args.max_shard_size is None else _parse_size(args.max_shard_size)
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"{args.out!r} is a file; give a folder to write the converted model in")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{args.out!r} exists and is not empty; choose a new folder or pass --overwrite")
    params, _, load_seconds = _load(args.source, args.dtype, tokenizer=False)
    t0 = time.perf_counter()
    if args.to == "hf":
        save_hf(params, out, max_shard_bytes)
    else:
        save_orbax(params, out)
    seconds = time.perf_counter() - t0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    report = {"command": "convert", "source": args.source, "to": args.to, "out": str(out),
              "model_type": params.config.hf_model_type, "dtype": str(params.dtype),
              "n_params": sum(int(x.size) for x in jax.tree.leaves(params.weights)),
              "files": [str(p.relative_to(out)) for p in files], "bytes": sum(p.stat().st_size for p in files),
              "seconds": seconds, "load_seconds": load_seconds}
    if not args.json:
        shown = report["files"] if args.to == "hf" else [f"{len(files)} files (Orbax)"]
        _print_table(f"{args.source} as {'a Hugging Face folder' if args.to == 'hf' else 'an Orbax checkpoint'} "
                     f"in {out}", {
                         "model type": report["model_type"], "parameters": f"{report['n_params']:,}",
                         "dtype": report["dtype"], "files": ", ".join(shown),
                         "size": f"{report['bytes'] / 1e6:.1f} MB",
                         "seconds": f"{seconds:.2f} (load {load_seconds:.2f})"})
    return report


def cmd_report(args) -> dict:
    from makemost_jax.report import write_report

    path, rows = write_report(args.results, args.out)
    if not args.json:
        print(f"{len(rows)} results from {args.results} written to {path}")
    return {"command": "report", "out": str(path), "rows": [dataclasses.asdict(r) for r in rows]}


def _recurrence_config(args):
    from makemost_jax.recurrence import RecurrenceConfig

    return RecurrenceConfig(num_memory=args.num_memory, read_layer=args.read_layer, inject_layer=args.inject_layer)


def cmd_recurrence_train(args) -> dict:
    import jax

    from makemost_jax.data import DocumentContiguousBatches, TextFiles
    from makemost_jax.recurrence import check_window, init_memory_module, save_module, train_recurrence
    from makemost_jax.training import TrainConfig

    params, tok, load_seconds = _load(args.model, args.dtype)
    window = check_window(params, args.window)
    module = init_memory_module(_recurrence_config(args), params.config, jax.random.key(args.seed))
    data = DocumentContiguousBatches(TextFiles(args.data), tok, batch_size=args.batch_size,
                                     window=window * args.windows, seed=args.seed)
    config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=min(args.steps // 10, 100),
                         seed=args.seed, progress=not args.json, log_every=max(args.steps // 20, 1),
                         checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every)
    t0 = time.perf_counter()
    run = train_recurrence(params, data, window, config, module=module, finetune=args.finetune)
    seconds = time.perf_counter() - t0
    path = save_module(args.out, run.module, lm=run.lm if args.finetune else None)
    losses = [r["loss"] for r in run.history["train"]]
    report = {"command": "recurrence train", "model": args.model, "data": args.data, "module": path,
              "window": window, "windows": args.windows, "batch_size": args.batch_size, "steps": len(losses),
              "finetune": args.finetune, "module_parameters": run.module.num_parameters,
              "config": dataclasses.asdict(run.module.config), "first_loss": losses[0],
              "last_loss": losses[-1], "seconds": seconds, "load_seconds": load_seconds}
    if not args.json:
        _print_table(f"recurrence module for {args.model} trained on {args.data}", {
            "saved to": path, "parameters": run.module.num_parameters,
            "windows": f"{args.windows} x {window} tokens per sequence, batch {args.batch_size}",
            "steps": len(losses), "loss": f"{losses[0]:.4f} -> {losses[-1]:.4f}",
            "seconds": f"{seconds:.1f} (load {load_seconds:.2f})"})
    return report


def cmd_recurrence_eval(args) -> dict:
    from makemost_jax.data import TextFiles
    from makemost_jax.recurrence import evaluate_sliding, evaluate_windows, load_module

    params, tok, load_seconds = _load(args.model, args.dtype)
    module, params = load_module(args.module, params)
    docs = [tok.encode_for_model(record["text"]) for record in TextFiles(args.file)]
    results = {"recurrence": evaluate_windows(params, docs, args.window, module, batch_size=args.batch_size,
                                              progress=not args.json),
               "disjoint": evaluate_windows(params, docs, args.window, batch_size=args.batch_size)}
    if args.stride:
        results["sliding"] = evaluate_sliding(params, docs, args.window, args.stride, batch_size=args.batch_size)
    if not args.json:
        first = results["recurrence"]
        print(f"perplexity of {args.file} ({first.n_documents} documents, {first.n_tokens} tokens) under "
              f"{args.model}, window {args.window}")
        for name, r in results.items():
            label = f"sliding (stride {r.stride})" if name == "sliding" else name
            print(f"  {label:22} {r.ppl:10.4f}  ({r.seconds:.2f} s)")
    return {"command": "recurrence eval", "model": args.model, "file": args.file, "module": args.module,
            "window": args.window, "load_seconds": load_seconds,
            **{name: r.to_dict() for name, r in results.items()}}


def cmd_nar_train(args) -> dict:
    import jax

    import makemost_jax as mm
    from makemost_jax import nar
    from makemost_jax.training import TrainConfig

    folder = nar.resolve_mlm(args.model)
    t0 = time.perf_counter()
    mlm, tok = mm.load(folder, dtype=args.dtype), mm.load_tokenizer(folder)
    load_seconds = time.perf_counter() - t0
    config = nar.seq2seq_config(mlm, tok, args.max_source, args.max_target, autoregressive=args.autoregressive)
    params = nar.init_seq2seq(mlm, config, jax.random.key(args.seed), random_init=args.random_init)
    train = nar.encode_pairs(tok, nar.read_pairs(args.data, args.source_key, args.target_key), config)
    valid = None
    if args.valid:
        held_out = nar.encode_pairs(tok, nar.read_pairs(args.valid, args.source_key, args.target_key), config)
        valid = nar.fixed_batches(held_out, args.batch_size)
    train_config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=min(args.steps // 10, 100),
                               seed=args.seed, progress=not args.json, log_every=max(args.steps // 20, 1),
                               eval_every=max(args.steps // 4, 1) if valid else 0,
                               checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every)
    t0 = time.perf_counter()
    params, history = nar.train_seq2seq(params, nar.PairBatches(train, args.batch_size, seed=args.seed),
                                        train_config, nar.SundaeConfig(corruption=args.corruption), valid=valid)
    seconds = time.perf_counter() - t0
    path = nar.save_seq2seq(args.out, params, tokenizer_source=folder)
    losses = [r["loss"] for r in history["train"]]
    report = {"command": "nar train", "model": args.model, "data": args.data, "out": path,
              "autoregressive": args.autoregressive, "random_init": args.random_init, "pairs": len(train["index"]),
              "steps": len(losses), "batch_size": args.batch_size, "first_loss": losses[0], "last_loss": losses[-1],
              "valid_loss": [r["loss"] for r in history["eval"]], "seconds": seconds, "load_seconds": load_seconds}
    if not args.json:
        _print_table(f"{'AR' if args.autoregressive else 'NAR'} seq2seq from {args.model} trained on {args.data}", {
            "saved to": path, "pairs": len(train["index"]), "steps": len(losses),
            "loss": f"{losses[0]:.4f} -> {losses[-1]:.4f}",
            "valid loss": ", ".join(f"{v:.4f}" for v in report["valid_loss"]) or "-",
            "seconds": f"{seconds:.1f} (load {load_seconds:.2f})"})
    return report


def cmd_nar_translate(args) -> dict:
    import makemost_jax as mm
    from makemost_jax import nar

    params, tok_source = nar.load_seq2seq(args.checkpoint)
    tok = mm.load_tokenizer(args.tokenizer or tok_source)
    if args.file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    decode = nar.DecodeConfig(steps=args.steps, temperature=args.temperature, remask=args.remask, init=args.init,
                              length_candidates=args.length_candidates)
    t0 = time.perf_counter()
    outputs = nar.translate(params, tok, lines, decode, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    report = {"command": "nar translate", "checkpoint": args.checkpoint, "outputs": outputs, "seconds": seconds}
    if args.references:
        with open(args.references, encoding="utf-8") as f:
            refs = f.read().splitlines()
        report["bleu"] = nar.bleu(outputs, nar.normalise_references(tok, refs[:len(outputs)]))
    if not args.json:
        print("\n".join(outputs))
        if "bleu" in report:
            print(f"BLEU {report['bleu']:.2f}", file=sys.stderr)
    return report


def _read_lines(path: str) -> list[str]:
    """Non-empty-checked lines of a UTF-8 file, or of stdin for "-"."""
    text = sys.stdin.read() if path == "-" else _read_text(path)
    lines = text.splitlines()
    if not lines:
        raise InputError(f"{'stdin' if path == '-' else path} has no lines to translate")
    return lines


def cmd_translate(args) -> dict:
    from makemost_jax.decoding.attributes import parse_attribute
    from makemost_jax.decoding.classifier import load_classifier
    from makemost_jax.seq2seq.translate import score_translations, translate

    lines = _read_lines(args.file)
    references = _read_lines(args.references) if args.references else None
    if references is not None and len(references) != len(lines):
        raise InputError(f"{args.references} has {len(references)} lines but {args.file} has {len(lines)}; "
                         "give one reference per source line")
    params, tok, load_seconds = _load(args.model, args.dtype)
    options = dict(search=args.search, beams=args.beams, max_new_tokens=args.max_new_tokens,
                   length_penalty=args.length_penalty, weight=args.weight, prefilter=args.prefilter,
                   node_budget=args.node_budget, batch_size=args.batch_size)
    attribute = parse_attribute(args.attribute) if args.attribute else None
    classifier = load_classifier(args.classifier, params) if args.classifier else None
    t0 = time.perf_counter()
    rows = translate(params, tok, lines, attribute=attribute, classifier=classifier, **options)
    seconds = time.perf_counter() - t0
    report = {"command": "translate", "model": args.model, "dtype": args.dtype, **options,
              "attribute": args.attribute, "classifier": args.classifier, "translations": rows, "seconds": seconds,
              "load_seconds": load_seconds}
    if references is not None:
        report["scores"] = score_translations([r["translation"] for r in rows], references)
    if not args.json:
        for row in rows:
            print("(no translation found)" if row["translation"] is None else row["translation"])
        if "scores" in report:
            s = report["scores"]
            print(f"BLEU {s['bleu']:.2f}  chrF {s['chrf']:.2f}  length ratio {s['length_ratio']:.3f}", file=sys.stderr)
        print(f"{len(rows)} lines in {seconds:.2f} s (compilation included), load {load_seconds:.2f} s",
              file=sys.stderr)
    return report


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
    p.add_argument("--search", choices=["greedy", "sample", "beam", "cbs", "exact"], default=None,
                   help="decoding: greedy (default), sample (the default when --temperature > 0), beam search, "
                        "conditional beam search (needs --classifier), exact mode search")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--beams", type=int, default=4, help="beam width for beam and cbs (default 4)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="beam/cbs: rank finished outputs by log p / n ** this (default 0: the mode)")
    p.add_argument("--attribute", default=None, metavar="SPEC",
                   help="beam/cbs: keep only outputs with this attribute (min-length:L, max-length:L, non-empty, "
                        "no-repeat-ngram:N, no-prompt-copy[:SPAN], non-degenerate, joined by +); cbs default: the "
                        "classifier's")
    p.add_argument("--classifier", default=None, metavar="DIR",
                   help="cbs: a head written by makemost cbs-train, or 'default' (bundled, min-length:8, for the "
                        "embedded model)")
    p.add_argument("--weight", type=float, default=1.0, help="cbs: weight of log q(attribute) (default 1)")
    p.add_argument("--prefilter", type=int, default=None,
                   help="cbs: candidate tokens per beam scored by the classifier (default 4 x beams)")
    p.add_argument("--node-budget", type=int, default=2000, help="exact: prefixes to expand at most (default 2000)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("cbs-train", parents=[common, with_model],
                       help="train the attribute classifier of conditional beam search on the model's own samples")
    p.add_argument("--attribute", required=True, metavar="SPEC",
                   help="what the outputs must satisfy: min-length:L, max-length:L (ends with EOS within L tokens), "
                        "non-empty, no-repeat-ngram:N, no-prompt-copy[:SPAN], non-degenerate, joined by +")
    p.add_argument("--prompts", metavar="FILE", help="prompts to sample from, one per line (\\n = newline)")
    p.add_argument("--chat-prompts", metavar="FILE",
                   help="user messages, one per line, each wrapped in the chat template")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the classifier (Orbax)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--samples-per-prompt", type=int, default=16, help="(default 16)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="sample length limit (default 24)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1 = off)")
    p.add_argument("--hidden-layer", type=int, default=-1, help="hidden state the head reads (default -1: last)")
    p.add_argument("--mlp-width", type=int, default=256, help="(default 256)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="use the model's embedding table as it is (not trained, not saved: a small head)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="(default 3e-4)")
    p.add_argument("--batch-size", type=int, default=256, help="prefix rows per step (default 256)")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of samples held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_cbs_train)

    p = sub.add_parser("mode", parents=[common, with_model],
                       help="exact mode search: the most likely continuation, proved by branch and bound")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="text to continue (one search each)")
    p.add_argument("--max-length", type=int, default=8, help="longest output in tokens, EOS not counted (default 8)")
    p.add_argument("--length", type=int, default=None, help="the mode among outputs of exactly this many tokens")
    p.add_argument("--all-lengths", action="store_true", help="the mode at every length 0..max-length, in one search")
    p.add_argument("--node-budget", type=int, default=2000,
                   help="stop after expanding this many prefixes (default 2000); the result then is not proved")
    p.add_argument("--batch-size", type=int, default=32, help="prefixes expanded per model call (default 32)")
    p.add_argument("--children", type=int, default=64,
                   help="next tokens passed on per expansion (default 64: a frontier wide enough to fill a batch)")
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
    knobs.add_argument("--sink", type=int, default=4,
                       help="never evict the first N cached tokens (attention sinks; default 4, as measured "
                            "best across domains; 0 is METHODS.md's protocol)")

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

    p = sub.add_parser("recurrence", help="recurrence memory module: train it, evaluate it on long text")
    rsub = p.add_subparsers(dest="recurrence_command", metavar="ACTION", required=True)
    r = rsub.add_parser("train", parents=[common, with_model], help="train a memory module on text (LM frozen)")
    r.add_argument("data", metavar="DATA", help="text file, folder of .txt files or glob; each file a document")
    r.add_argument("--out", required=True, help="folder to write the trained module to (Orbax)")
    r.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    r.add_argument("--windows", type=int, default=4, help="windows per training sequence (default 4)")
    r.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    r.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    r.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    r.add_argument("--num-memory", type=int, default=4, help="memory vectors (default 4)")
    r.add_argument("--read-layer", type=int, default=None, help="hidden state pooled (default: middle layer)")
    r.add_argument("--inject-layer", type=int, default=0, help="first layer that reads the memory (default 0)")
    r.add_argument("--finetune", action="store_true", help="train the LM too (its weights are saved with the module)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--checkpoint-dir", default=None, help="resumable training checkpoints (module + optimizer)")
    r.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: only at the end)")
    r.set_defaults(run=cmd_recurrence_train)
    r = rsub.add_parser("eval", parents=[common, with_model],
                        help="perplexity with the memory beside disjoint and sliding windows")
    r.add_argument("file", metavar="FILE", help="text file, folder of .txt files or glob; each file a document")
    r.add_argument("--module", required=True, help="folder written by `makemost recurrence train`")
    r.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    r.add_argument("--stride", type=int, default=None, help="also score a sliding window with this stride")
    r.add_argument("--batch-size", type=int, default=8, help="documents per batch (default 8)")
    r.set_defaults(run=cmd_recurrence_eval)

    p = sub.add_parser("report", parents=[common],
                       help="rebuild docs/RESULTS.md from the benchmark and experiment results files")
    p.add_argument("--results", default="benchmarks/results", help="folder of results JSON files")
    p.add_argument("--out", default="docs/RESULTS.md", help="Markdown file to write")
    p.set_defaults(run=cmd_report)
    p = sub.add_parser("nar", help="MLM-initialised non-autoregressive seq2seq: train, translate")
    nsub = p.add_subparsers(dest="nar_command", metavar="ACTION", required=True)
    r = nsub.add_parser("train", parents=[common], help="train a NAR (SUNDAE) or AR seq2seq model from a masked LM")
    r.add_argument("model", metavar="MODEL", help="BERT-family checkpoint folder, or 'minilm' (all-MiniLM-L6-v2)")
    r.add_argument("data", metavar="DATA", help="JSONL parallel corpus (e.g. makemost_jax/assets/bible_kjv_web_train.jsonl)")
    r.add_argument("--out", required=True, help="folder to write the trained model to (Orbax)")
    r.add_argument("--valid", default=None, help="JSONL held-out pairs for the validation loss")
    r.add_argument("--source-key", default="kjv", help="source field of the records (default kjv)")
    r.add_argument("--target-key", default="web", help="target field of the records (default web)")
    r.add_argument("--max-source", type=int, default=48, help="source tokens incl. [CLS]/[SEP] (default 48)")
    r.add_argument("--max-target", type=int, default=48, help="target tokens (default 48)")
    r.add_argument("--batch-size", type=int, default=16, help="pairs per step (default 16)")
    r.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    r.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    r.add_argument("--corruption", choices=["uniform", "bert"], default="uniform", help="SUNDAE corruption")
    r.add_argument("--autoregressive", action="store_true", help="train the AR baseline instead")
    r.add_argument("--random-init", action="store_true", help="random weights instead of the MLM's")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--checkpoint-dir", default=None, help="resumable training checkpoints")
    r.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: only at the end)")
    r.set_defaults(run=cmd_nar_train)
    r = nsub.add_parser("translate", parents=[common], help="decode source lines with a trained model")
    r.add_argument("checkpoint", metavar="CHECKPOINT", help="folder written by `makemost nar train --out`")
    r.add_argument("file", metavar="FILE", help="source text, one input per line ('-': stdin)")
    r.add_argument("--references", default=None, help="reference lines: also print BLEU (sacrebleu)")
    r.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one recorded at training)")
    r.add_argument("--steps", type=int, default=10, help="NAR refinement steps (default 10)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = argmax (default)")
    r.add_argument("--remask", action="store_true", help="mask-predict re-masking of the least confident tokens")
    r.add_argument("--init", choices=["random", "mask"], default="random", help="initial tokens (default random)")
    r.add_argument("--length-candidates", type=int, default=1, help="top-n predicted lengths tried (default 1)")
    r.add_argument("--batch-size", type=int, default=32, help="sources per batch (default 32)")
    r.set_defaults(run=cmd_nar_translate)

    p = sub.add_parser("translate", parents=[common],
                       help="translate lines with an encoder-decoder (T5, BART, Marian) and any search")
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="source lines (default '-': stdin)")
    p.add_argument("--model", required=True, metavar="PATH", help="encoder-decoder checkpoint folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--search", choices=["greedy", "beam", "cbs", "exact", "length-modes"], default="beam",
                   help="default beam")
    p.add_argument("--beams", type=int, default=5, help="beam / cbs width (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="longest translation in tokens; the exact searches' max_length (default 128)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam / cbs: 0 ranks by log p (default)")
    p.add_argument("--attribute", default=None, help="beam / cbs: exact filter of finished outputs, e.g. min-length:5")
    p.add_argument("--classifier", default=None, help="cbs: a head written by makemost cbs-train")
    p.add_argument("--weight", type=float, default=1.0, help="cbs: weight of the head's term (default 1)")
    p.add_argument("--prefilter", type=int, default=None, help="cbs: candidates per beam (default 4 x beams)")
    p.add_argument("--node-budget", type=int, default=2000, help="exact searches: expansions per line (default 2000)")
    p.add_argument("--batch-size", type=int, default=16, help="lines per batch (default 16)")
    p.add_argument("--references", default=None, help="reference lines: also report BLEU and chrF (sacrebleu)")
    p.set_defaults(run=cmd_translate)

    p = sub.add_parser("convert", parents=[common],
                       help="write a model as a Hugging Face folder (sharded safetensors) or an Orbax checkpoint")
    p.add_argument("source", metavar="SOURCE", help=DEFAULT_MODEL_HELP)
    p.add_argument("--to", required=True, choices=["hf", "orbax"], help="output format")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype (default: the checkpoint's own)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="--to hf: largest weight file, e.g. 2GB or 500MiB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="write into an OUT that is not empty")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("info", parents=[common], help="family, size, context, attention pattern and tokenizer")
    p.add_argument("model", metavar="MODEL", nargs="?", default="default", help=DEFAULT_MODEL_HELP)
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype (default float32)")
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
