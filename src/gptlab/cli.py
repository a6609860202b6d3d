"""The `gptlab` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from gptlab.errors import GptlabError, Interrupted


def _close_option(args: argparse.Namespace, extra: list[str]) -> None:
    """An unknown `--flag` near one the command has is a typo (`--dirty`: `--allow-dirty`); a config key written
    `--key value` is nanoGPT's `--key=value` missing its `=`."""
    import difflib

    from gptlab.config import all_keys
    from gptlab.config_names import NANOGPT_TRANSLATED

    names = {k.split(".")[1] for k in all_keys()} | set(NANOGPT_TRANSLATED)
    for item in extra:
        if not item.startswith("--") or "=" in item:
            continue
        name = item[2:].replace("-", "_")
        if hasattr(args, "args") and (name in names or name in all_keys()):  # a command that takes overrides
            raise GptlabError(f"unknown option '{item}'", f"overrides are written with '=': {item}=VALUE")
        close = difflib.get_close_matches(item, getattr(args, "options", ()), n=1, cutoff=0.6)
        if close and len(name) > 3:  # shorter ones match anything
            raise GptlabError(f"unknown option '{item}'", f"did you mean '{close[0]}'?")


def _reject_extra(extra: list[str], command: str) -> None:
    """Arguments argparse left over are options this command does not have."""
    if extra:
        raise GptlabError(f"unknown option '{extra[0]}'", f"see `gptlab {command} --help`")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """`--threads N`, which `main` applies before the command runs (gptlab/threads.py)."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: all cores, fewer while timing shows that other work on the "
                   "machine makes them slower)")  # fmt: skip


def _switch(text: str) -> bool:
    """A flag's optional true/false value (`--compile=false`, as nanoGPT's sample.py writes it)."""
    if text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false (put the run directory before --compile)")


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    """`--compile` and `--quantize`, the decode step's speed-ups (sample and serve)."""
    compiled = "decode through torch.compile: 10-40 s to compile, then ~2-3x faster steps on a CPU"
    p.add_argument("--compile", nargs="?", const=True, default=False, type=_switch, metavar="BOOL", help=compiled)
    int8 = "int8: CPU inference with int8 weights, a quarter of fp32's bytes (docs/decoding.md)"
    p.add_argument("--quantize", choices=["int8"], help=int8)


def _split_config_and_overrides(items: list[str], extra: list[str]) -> tuple[str | None, list[str]]:
    """First positional ending in .yaml/.yml (or a nanoGPT config .py) is the config; `key=value` and
    `--key=value` are overrides."""
    config, overrides = None, []
    for item in items:
        if "=" not in item and item.endswith((".yaml", ".yml", ".py")) and config is None:
            config = item
        elif "=" in item:
            overrides.append(item)
        else:
            raise GptlabError(
                f"unexpected argument '{item}'", "give a .yaml (or nanoGPT .py) config and key=value overrides"
            )
    for item in extra:  # argparse leaves --key=value here, and any key=value that follows one
        if "=" not in item:
            raise GptlabError(f"unknown option '{item}'", "see `gptlab --help`; overrides are written key=value")
        overrides.append(item)
    return config, overrides


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.config import load_config
    from gptlab.data.shards import prepare

    path, overrides = _split_config_and_overrides(args.args, extra)
    flags = {"errors": args.errors, "dtype": args.dtype, "workers": args.workers}
    overrides += [f"data.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(path, overrides)
    if cfg.task.name != "none":  # a synthetic task writes its own examples
        from gptlab.data.tasks import prepare_task

        result = prepare_task(cfg.task, cfg.data.dir, overwrite=args.overwrite)
    else:
        result = prepare(cfg.data, overwrite=args.overwrite, quiet=args.quiet)
    m = result.meta
    state = "up to date" if result.skipped else "prepared"
    if "examples" in m:
        where = " + ".join(f"{e['count']:,} {split}" for split, e in m["examples"].items()) + " examples"
    else:
        where = f"in {len(m['shards']['train']) + len(m['shards']['val'])} shard(s)"
    print(f"{state}: {result.dir} ({m['train_tokens']:,} train + {m['val_tokens']:,} val tokens {where}, "
          f"vocab {m['vocab_size']})")  # fmt: skip
    return 0


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _sigterm_interrupts() -> list:
    """Make SIGTERM raise Interrupted as Ctrl-C raises KeyboardInterrupt; returns [the handler replaced], or []
    off the main thread (where handlers cannot be set)."""
    try:
        return [signal.signal(signal.SIGTERM, _raise_interrupted)]
    except ValueError:
        return []


def cmd_tokenizer_train(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.data.tokenizer_setup import train_tokenizer

    _reject_extra(extra, "tokenizer train")
    if args.max_words < 1:
        raise GptlabError(
            f"--max-words must be at least 1, got {args.max_words}", "use at least 1; the default is 1,000,000"
        )
    specials = args.special if args.special is not None else ["<|endoftext|>"]
    path = train_tokenizer(
        args.kind, args.paths, args.out, vocab_size=args.vocab_size, specials=specials,
        text_field=args.text_field, errors=args.errors, quiet=args.quiet, max_words=args.max_words,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def cmd_data_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.data.inspect import inspect_data

    _reject_extra(extra, "data inspect")
    if args.windows < 0 or args.tokens < 1:
        raise GptlabError("--windows must be 0 or more and --tokens at least 1", "e.g. --windows 3 --tokens 64")
    print(inspect_data(args.dir, windows=args.windows, window_tokens=args.tokens, seed=args.seed))
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.config import load_config, older_run_overrides, read_run_config
    from gptlab.train.trainer import Trainer

    if args.help_config:
        return cmd_config_keys(argparse.Namespace(prefix=None), [])
    path, overrides = _split_config_and_overrides(args.args, extra)
    if args.checkpoint != "latest" and not args.resume:
        raise GptlabError(f"--checkpoint {args.checkpoint} is given without --resume", "add --resume RUN_DIR")
    if args.resume:
        if path is not None:
            raise GptlabError("--resume takes its config from the run directory", "drop the .yaml argument")
        path = str(Path(args.resume) / "config.yaml")
        if not Path(path).is_file():
            raise GptlabError(f"no run to resume in '{args.resume}' (config.yaml missing)", "check the path")
        read_run_config(path)  # a damaged config.yaml is named as the run's, not as a config file given
        older = older_run_overrides(path)  # before the user's, which win
        if older and not any(o.lstrip("-").startswith(("train.eval_interval=", "eval_interval=")) for o in overrides):
            print(
                "this run was started before epoch mode evaluated inside epochs: it goes on evaluating at each "
                "epoch's end (train.eval_interval=N evaluates every N steps into each epoch)",
                file=sys.stderr,
            )
        overrides = [*older, *overrides, f"train.out_dir={args.resume}"]
    cfg = load_config(path, overrides)
    if args.nproc is not None:  # start the ranks through torchrun; each runs this command without --nproc
        from gptlab.train.distributed import launch
        from gptlab.train.trainer import check_world

        check_world(cfg.train, args.nproc)  # a batch the ranks cannot share is refused before any starts
        again = ["--resume", args.resume, "--checkpoint", args.checkpoint] if args.resume else []
        switches = (("--overwrite", args.overwrite), ("--quiet", args.quiet), ("--allow-dirty", args.allow_dirty))
        again += [flag for flag, on in switches if on]
        again += ["--threads", str(args.threads)] if args.threads is not None else []
        return launch(args.nproc, [*(["--debug"] if args.debug else []), "train", *args.args, *extra, *again])
    if cfg.train.backend == "jax":
        from gptlab.jax.train import JaxTrainer as Trainer  # noqa: N814 - the same interface
    trainer = Trainer(
        cfg, resume=bool(args.resume), overwrite=args.overwrite, quiet=args.quiet, allow_dirty=args.allow_dirty,
        checkpoint=args.checkpoint,
    ).fit()  # fmt: skip
    if trainer.interrupted is not None:
        if not trainer.dist.is_main:  # rank 0 alone reports it: torchrun would stop the others at a rank's failure
            return 0
        return _report_interrupted(trainer.run_dir, trainer.step, trainer.dist.world, trainer.interrupted)
    if trainer.dist.is_main:
        last = trainer.history[-1] if trainer.history else None
        summary = f", val loss {last['val_loss']:.4f}" if last else ""
        print(f"trained {trainer.step} steps into {trainer.run_dir}{summary}")
    return 0


def _report_interrupted(run_dir: Path, step: int, world: int, signum: int) -> int:
    """The last line of a run Ctrl-C or SIGTERM stopped, and its exit code (128 + the signal), so scripts see it."""
    from gptlab.train.checkpoint import read_pointer

    latest = read_pointer(run_dir / "checkpoints" / "latest")
    if latest is None:
        sys.stderr.write(f"interrupted at step {step}: nothing saved yet (start it again with --overwrite)\n")
    else:
        nproc = f" --nproc {world}" if world > 1 else ""
        sys.stderr.write(f"interrupted at step {step}: saved checkpoint {run_dir / 'checkpoints' / latest}; "
                         f"resume with gptlab train --resume {run_dir}{nproc}\n")  # fmt: skip
    return 128 + signum


def cmd_sample(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.chat import end_token_ids, load_chat_template
    from gptlab.config import check_sampling
    from gptlab.generate import Generator, SamplingParams, prompt_text
    from gptlab.train.checkpoint import load_run
    from gptlab.train.trainer import select_device, select_dtype

    _nanogpt_sample_flags(args, extra)
    if args.backend == "jax":  # the weights go to JAX from the CPU
        from gptlab.jax.generate import JaxGenerator

        if args.compile or args.quantize:
            raise GptlabError("--compile and --quantize are for the PyTorch backend", "drop them, or --backend torch")
        cfg, model, tokenizer = load_run(args.run_dir, args.checkpoint, "cpu")
        gen = JaxGenerator.from_torch(model, tokenizer, args.device, args.dtype)
    else:
        from gptlab.decode import check_compile
        from gptlab.quantize import check_quantize, quantize_int8

        device = select_device(args.device)
        check_quantize(args.quantize, device)
        if args.compile:
            check_compile(device)
        cfg, model, tokenizer = load_run(args.run_dir, args.checkpoint, device)
        model = model.to(select_dtype(args.dtype, device))
        gen = Generator(quantize_int8(model) if args.quantize else model, tokenizer, compile=args.compile)
    s = cfg.sample
    gen.end_ids = end_token_ids(tokenizer, load_chat_template(args.run_dir, tokenizer), s.end_tokens)
    start = prompt_text(args.start if args.start is not None else s.start)
    allow_special = args.allow_special if args.allow_special is not None else s.allow_special
    ids = tokenizer.encode(start, allow_special=allow_special)  # by default a typed `<|endoftext|>` is just text
    if not ids:
        raise GptlabError("the prompt is empty", "give --start some text")
    if len(ids) > model.cfg.block_size and not args.truncate:
        raise GptlabError(
            f"the prompt has {len(ids)} tokens, more than the context of {model.cfg.block_size}",
            "shorten --start, or pass --truncate to keep its end",
        )

    def pick(flag: object, default: object) -> object:
        return flag if flag is not None else default

    n, max_new = pick(args.num_samples, s.num_samples), pick(args.max_new_tokens, s.max_new_tokens)
    params = SamplingParams(
        pick(args.temperature, s.temperature), pick(args.top_k, s.top_k), pick(args.top_p, s.top_p),
        pick(args.min_p, s.min_p), pick(args.repetition_penalty, s.repetition_penalty), pick(args.seed, s.seed),
    )  # fmt: skip
    check_sampling(n, max_new, params.temperature, params.top_k, params.top_p, True, params.min_p,
                   params.repetition_penalty)  # fmt: skip
    stop = pick(args.stop, list(s.stop))
    if n == 1:  # one sample streams to the terminal as it is made
        print(start, end="", flush=True)
        for piece in gen.stream(ids, max_new, params, stop=stop, truncate=args.truncate):
            print(piece, end="", flush=True)
        print()
        return 0
    for i, text in enumerate(gen.texts(ids, n, max_new, params, stop=stop, truncate=args.truncate)):
        if i:
            print("-" * 40)
        print(start + text)
    return 0


def _nanogpt_sample_flags(args: argparse.Namespace, extra: list[str]) -> None:
    """nanoGPT's sample.py flags, `--flag=value` or `flag=value` (`--out_dir=RUN`, `--init_from=resume`), set as
    `gptlab sample`'s own options on `args`, or refused naming the gptlab way."""
    from gptlab.config_names import NANOGPT_SAMPLE, nanogpt_sample

    items, run_dirs, flags = [*extra], [], {}
    if args.run_dir is not None:  # argparse takes the first `flag=value` for the run directory
        items.insert(0, args.run_dir)
    for item in items:
        name, sep, value = item.removeprefix("--").partition("=")
        name = name.replace("-", "_")
        if sep and name in NANOGPT_SAMPLE:
            translated = nanogpt_sample(name, value, item)
            run_dirs += [translated.pop("run_dir")] if "run_dir" in translated else []
            flags.update(translated)
        elif not item.startswith("-") and (item is args.run_dir or not sep):
            run_dirs.append(item)
        else:
            _reject_extra([item], "sample")
    if len(run_dirs) != 1:
        raise GptlabError(
            "give one run directory" if run_dirs else "no run directory given",
            "write gptlab sample RUN_DIR, or nanoGPT's --out_dir=RUN_DIR",
        )
    args.run_dir = run_dirs[0]
    if flags:  # argparse converts and checks the values as if they had been typed as gptlab's flags
        typed = build_parser().parse_args(["sample", "RUN", *(f"--{k}={v}" for k, v in flags.items())])
        for dest in flags:
            setattr(args, dest, getattr(typed, dest))


def cmd_config_keys(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.config import SECTION_CLASSES
    from gptlab.config_names import describe_keys

    _reject_extra(extra, "config keys")
    try:
        print(describe_keys(SECTION_CLASSES, args.prefix))
    except BrokenPipeError:  # `gptlab config keys | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from gptlab.evaluate import evaluate_run

    _reject_extra(extra, "eval")
    report = evaluate_run(
        args.run_dir, data=args.data, split=args.split, hellaswag=args.hellaswag, max_tokens=args.max_tokens,
        batch_size=args.batch_size, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
        quiet=args.json,
    )  # fmt: skip
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    _reject_extra(extra, "export")
    if args.format == "gguf":
        from gptlab.interop.gguf import GGUF_FILE, MODELFILE, export_gguf

        out = export_gguf(args.run_dir, args.out_dir, args.checkpoint, args.dtype or "f32")
        print(f"exported {args.run_dir} to {out / GGUF_FILE} (llama.cpp: llama-cli -m {out / GGUF_FILE}; "
              f"Ollama: ollama create NAME -f {out / MODELFILE})")  # fmt: skip
        return 0
    if args.dtype is not None:
        raise GptlabError("--dtype is for --format gguf", "drop --dtype, or add --format gguf")
    from gptlab.interop.runs import export

    out = export(args.run_dir, args.out_dir, args.checkpoint)
    print(f"exported {args.run_dir} to {out} (transformers: AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


def cmd_import_hf(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.interop.runs import import_hf

    _reject_extra(extra, "import hf")
    out = import_hf(args.source, args.out_dir, overwrite=args.overwrite)
    print(f"imported {args.source} into {out} (gptlab sample {out})")
    return 0


def cmd_import_nanogpt(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.interop.nanogpt import import_nanogpt

    _reject_extra(extra, "import nanogpt")
    out = import_nanogpt(args.ckpt, args.out_dir, data_dir=args.data, overwrite=args.overwrite)
    print(f"imported {args.ckpt} into {out} (gptlab sample {out})")
    return 0


def cmd_import_nanogpt_data(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.interop.nanogpt import import_nanogpt_data

    _reject_extra(extra, "import nanogpt-data")
    out = import_nanogpt_data(args.data_dir, args.out_dir, overwrite=args.overwrite)
    print(f"converted {args.data_dir} into {out} (train on it with data.dir={out})")
    return 0


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    _reject_extra(extra, "serve")
    try:
        from gptlab.serve import serve
    except ImportError as e:
        raise GptlabError(f"serving needs FastAPI and uvicorn ({e})", "pip install 'gptlab[serve]'") from e
    serve(
        args.run_dir, args.host, args.port, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
        max_batch=args.max_batch, model_name=args.model_name, compile=args.compile, quantize=args.quantize,
    )  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.config import load_config
    from gptlab.train.bench import bench

    path, overrides = _split_config_and_overrides(args.args, extra)
    if args.steps < 1 or args.warmup < 0 or args.vocab_size < 0:
        raise GptlabError("--steps must be at least 1, --warmup and --vocab-size at least 0", "e.g. --steps 20")
    cfg = load_config(path, overrides)
    print(bench(cfg, steps=args.steps, warmup=args.warmup, vocab_size=args.vocab_size))
    return 0


def cmd_find_lr(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.config import load_config
    from gptlab.plot import check_output
    from gptlab.train.lr_finder import find_lr

    path, overrides = _split_config_and_overrides(args.args, extra)
    cfg, out = load_config(path, overrides), check_output(args.out)
    result = find_lr(cfg, args.start_lr, args.end_lr, args.steps, quiet=args.quiet)
    use = f"train.lr={result.suggestion:.1e}"
    if cfg.train.optimizer == "muon":  # Muon's rate moved with the swept one
        use += f" train.muon_lr={result.suggestion * cfg.train.muon_lr / cfg.train.lr:.1e}"
    print(f"suggested learning rate: {result.suggestion:.1e} ({result.why})")
    print(f"train with it: {use}")
    print(f"wrote {result.plot(out)}")
    return 0


def cmd_plot(args: argparse.Namespace, extra: list[str]) -> int:
    from gptlab.plot import plot_runs

    _reject_extra(extra, "plot")
    print(f"wrote {plot_runs(args.run_dirs, args.out)}")
    return 0


def add_tracking_commands(sub: argparse._SubParsersAction, with_config: Callable) -> None:
    """`gptlab find-lr` and `gptlab plot`."""
    p = sub.add_parser("find-lr", help="sweep the learning rate exponentially for a few hundred steps, suggest one")
    with_config(p)
    p.add_argument("--start-lr", "--start_lr", type=float, default=1e-7, dest="start_lr", help="first rate (1e-7)")
    p.add_argument("--end-lr", "--end_lr", type=float, default=10.0, dest="end_lr", help="last rate (10)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (fewer when the loss blows up)")
    p.add_argument("--out", default="lr_find.png", help="the PNG of loss against rate (default lr_find.png)")
    p.set_defaults(func=cmd_find_lr)

    p = sub.add_parser("plot", help="draw loss, evaluation metrics and learning rate of runs into a PNG")
    # nargs="*": none given is plot_runs' one-line error, not argparse's two-line usage
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories (train.out_dir)")
    p.add_argument("--out", default="plot.png", help="the PNG to write (default plot.png)")
    p.set_defaults(func=cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description="Train, sample and benchmark GPT models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="a YAML preset (or a nanoGPT "
                       "config/*.py), then dotted overrides; the keys: gptlab config keys")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bars or tables")

    p = sub.add_parser("prepare", help="tokenize data.source into token shards in data.dir (resumes when cut short)")
    with_config(p)
    p.add_argument("--overwrite", action="store_true", help="replace data prepared from another source")
    p.add_argument("--errors", choices=["strict", "replace"], help="non-UTF-8 bytes: an error (default) or U+FFFD")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], help="force the token array type")
    p.add_argument("--workers", type=int, help="encoding processes (default: one per CPU core)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a tokenizer on text and write DIR/tokenizer.json (transformers loads it)")
    p.add_argument(
        "paths", nargs="*", metavar="PATH", help="text files, folders or globs (gpt2: the vocab/merges folder)"
    )
    p.add_argument("--kind", required=True, help="char, bpe, wordpiece or gpt2")
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=8192, dest="vocab_size")
    p.add_argument(
        "--special", action="append", metavar="TOKEN", help="a special token (repeat for more; default <|endoftext|>)"
    )
    p.add_argument(
        "--max-words", "--max_words", type=int, default=1_000_000, dest="max_words",
        help="bpe/wordpiece: distinct words kept in memory while counting (the rarest are dropped beyond it)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    p.add_argument("--text-field", default="text", dest="text_field", help="the text field of .jsonl/.parquet")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="non-UTF-8 bytes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="prepared-data tools")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="shard stats and a few decoded windows of a prepared folder")
    p.add_argument("dir", help="the prepared folder (data.dir)")
    p.add_argument("--windows", type=int, default=3, help="random train windows to decode")
    p.add_argument("--tokens", type=int, default=64, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("train", help="train a model: gptlab train configs/shakespeare-char.yaml train.max_iters=100")
    with_config(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from a checkpoint (--checkpoint)")
    p.add_argument(
        "--checkpoint", default="latest", metavar="NAME",
        help="with --resume: latest (default), best or step_N; the run's later checkpoints and metrics are moved to "
        "RUN_DIR/set_aside/after_step_N, never deleted",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--allow-dirty", action="store_true", help="train even if train.require_clean_git finds changes")
    p.add_argument("--nproc", type=int, metavar="N", help="train on N local ranks (processes) through torchrun")
    p.add_argument("--help-config", action="store_true", help="list every config key: type, default, doc")
    add_threads_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained run")
    # nargs="?": nanoGPT's --out_dir=RUN names it too; no run is _nanogpt_sample_flags' one-line error
    p.add_argument("run_dir", nargs="?", help="the run directory (train.out_dir)")
    p.add_argument("--start", help="prompt text, or FILE:prompt.txt (default: the config's sample.start)")
    p.add_argument(
        "--allow-special", "--allow_special", action=argparse.BooleanOptionalAction, dest="allow_special",
        help="special tokens' text in the prompt (<|endoftext|>) gets their ids (default: sample.allow_special, "
        "false: plain text)",
    )  # fmt: skip
    p.add_argument("--num-samples", "--num_samples", type=int, dest="num_samples")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, dest="max_new_tokens")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", "--top_k", type=int, dest="top_k")
    p.add_argument("--top-p", "--top_p", type=float, dest="top_p")
    p.add_argument("--min-p", "--min_p", type=float, dest="min_p")
    p.add_argument("--repetition-penalty", "--repetition_penalty", type=float, dest="repetition_penalty")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeat for more)")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint", default="best", help="best (default), latest, or a folder such as step_500")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (PyTorch only)")
    p.add_argument(
        "--backend",
        choices=["torch", "jax"],
        default="torch",
        help="sample with PyTorch (default) or the JAX model (pip install gptlab[jax])",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto: bf16 on CUDA, fp32 elsewhere",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    add_decode_flags(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss, perplexity, bits-per-byte and HellaSwag accuracy of a trained run")
    p.add_argument("run_dir", help="the run directory (train.out_dir)")
    p.add_argument("--data", metavar="PATH",
                   help="a text file or prepared folder (default: the run's data unless only --hellaswag)")  # fmt: skip
    p.add_argument("--split", choices=["val", "train"], default="val", help="the split of a prepared folder")
    p.add_argument("--hellaswag", nargs="?", const="val", metavar="PATH",
                   help="score a HellaSwag .jsonl (no PATH: the official val set, downloaded once)")  # fmt: skip
    p.add_argument("--max-tokens", "--max_tokens", type=int, dest="max_tokens", help="score at most N tokens")
    p.add_argument("--batch-size", "--batch_size", type=int, default=8, dest="batch_size", help="rows per forward")
    p.add_argument("--checkpoint", default="best", help="best (default), latest, or a folder such as step_500")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast precision (auto: bf16 on CUDA, fp32 elsewhere); losses are fp32")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_threads_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run as a Hugging Face folder, or a GGUF file for llama.cpp and Ollama")
    p.add_argument("run_dir", help="the run directory (train.out_dir)")
    p.add_argument("out_dir", help="a new or empty folder (hf: config.json, model.safetensors and the tokenizer; "
                   "gguf: model.gguf and an Ollama Modelfile)")  # fmt: skip
    p.add_argument("--checkpoint", default="best", help="best (default), latest, or a folder such as step_500")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf (default, transformers) or gguf")
    p.add_argument("--dtype", default=None, help="gguf only: f32 (default), f16 or q8_0")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="make a run directory from another tool's model")
    imp = p.add_subparsers(dest="import_command", required=True)
    p = imp.add_parser("hf", help="a Hugging Face GPT-2 or Llama model (hub name or local folder)")
    p.add_argument("source", help="a hub name such as gpt2, or a folder with config.json, weights and tokenizer")
    p.add_argument("out_dir", help="the run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace what out_dir holds")
    p.set_defaults(func=cmd_import_hf)
    p = imp.add_parser("nanogpt", help="a nanoGPT ckpt.pt (its tokenizer: --data's meta.pkl, else GPT-2's BPE)")
    p.add_argument("ckpt", help="the ckpt.pt nanoGPT's train.py wrote")
    p.add_argument("out_dir", help="the run directory to write")
    p.add_argument("--data", metavar="DIR", help="the nanoGPT data folder it was trained on (its meta.pkl)")
    p.add_argument("--overwrite", action="store_true", help="replace what out_dir holds")
    p.set_defaults(func=cmd_import_nanogpt)
    p = imp.add_parser("nanogpt-data", help="a nanoGPT data folder (train.bin, val.bin, meta.pkl) as prepared data")
    p.add_argument("data_dir", help="the nanoGPT data folder")
    p.add_argument("out_dir", help="the prepared data folder to write (data.dir)")
    p.add_argument("--overwrite", action="store_true", help="replace what out_dir holds")
    p.set_defaults(func=cmd_import_nanogpt_data)

    p = sub.add_parser("serve", help="serve a trained run over HTTP: an OpenAI-compatible API and a web page")
    p.add_argument("run_dir", help="the run directory (train.out_dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--checkpoint", default="best", help="best (default), latest, or a folder such as step_500")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument(
        "--dtype", default="auto", help="auto: bf16 on CUDA, fp32 elsewhere",
        choices=["auto", "float32", "bfloat16", "float16"],
    )  # fmt: skip
    p.add_argument("--max-batch", "--max_batch", type=int, default=32, dest="max_batch",
                   help="requests decoded together; more wait in a queue")  # fmt: skip
    p.add_argument("--model-name", "--model_name", dest="model_name",
                   help="the model id clients send (default: the run directory's name)")  # fmt: skip
    add_decode_flags(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="time training steps on synthetic data and report MFU")
    with_config(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=0, dest="vocab_size")
    add_threads_flag(p)
    p.set_defaults(func=cmd_bench)
    add_tracking_commands(sub, with_config)

    p = sub.add_parser("config", help="config tools")
    config = p.add_subparsers(dest="config_command", required=True)
    p = config.add_parser("keys", help="every config key with its type, default and doc")
    p.add_argument("prefix", nargs="?", metavar="SECTION|KEY", help="only this section (train, model, ...) or key")
    p.set_defaults(func=cmd_config_keys)
    for leaf in _leaf_parsers(parser):  # each command's own flags, for "did you mean" on a misspelt one
        leaf.set_defaults(options=[o for a in leaf._actions for o in a.option_strings if o.startswith("--")])
    return parser


def _leaf_parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (those without subcommands of their own)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return [leaf for a in subs for child in a.choices.values() for leaf in _leaf_parsers(child)] if subs else [p]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gptlab` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # prepare (its worker pool shut down) and train (while it starts; fit() saves a checkpoint) stop on SIGTERM as on
    # Ctrl-C, exit code 143; torchrun's ranks keep dying of the SIGTERM it sends them when a rank failed
    stoppable = args.func in (cmd_prepare, cmd_train) and "RANK" not in os.environ
    replaced = _sigterm_interrupts() if stoppable else []
    try:
        if hasattr(args, "threads"):  # the commands that run a model; torch is imported from here on
            from gptlab import threads

            # serve's main thread must not start an OpenMP pool (serve.py): its engine thread applies the count
            threads.use(args.threads, here=args.command != "serve")
        _close_option(args, extra)
        return args.func(args, extra)
    except GptlabError as e:
        if args.debug:
            raise
        rank = int(os.environ.get("RANK", "0"))  # under torchrun every rank may fail: say which one did
        sys.stderr.write(f"error: {f'[rank {rank}] ' if rank else ''}{e}\n")  # one write: ranks share the stream
        if "RANK" in os.environ:  # torchrun stops the others when one exits: finish exiting with this code
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return e.exit_code  # 2, or 3 for a rank that lost the others (train/distributed.py)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside fit() (or a second one in it): stopped at once
        print("interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 128 + signal.SIGINT)
    finally:
        for handler in replaced:  # main() called from Python leaves the process's handler as it was
            signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
