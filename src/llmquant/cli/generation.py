"""The generation subcommands: generate (one prompt streamed, or several as one batch) and chat."""

from __future__ import annotations

import sys
from pathlib import Path

from . import args as A


class _Streamer:
    """Prints generated text as it comes (decoding the whole reply each step, printing only what is new)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""

    def __call__(self, step, tokens):
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def _gen_kwargs(args) -> dict:
    # --temperature 0 means greedy, as in llama.cpp
    sample = args.temperature != 0 and (args.temperature is not None or args.top_k or args.top_p is not None)
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=bool(sample),
        temperature=1.0 if args.temperature is None or not sample else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
        threads=args.threads,
        prefill_bf16=args.prefill_bf16,
    )


def _load_for_generation(args):
    import llmquant
    from ..kernels import set_kernel

    model, tok = llmquant.load_model(args.model)
    if args.kernel:
        set_kernel(model, args.kernel)
    return model, tok


def _print_stats(st) -> None:
    print(
        f"[{st.prompt_tokens} prompt tokens: {st.prefill_tok_s:.1f} tok/s; {st.new_tokens} new: "
        f"{st.decode_tok_s:.1f} tok/s{f' over {st.batch} sequences' if st.batch > 1 else ''}; threads {st.threads}; "
        f"kernels {','.join(st.kernels) or 'float'}]",
        file=sys.stderr,
    )


def cmd_generate(args) -> int:
    import llmquant
    from ..runtime import GenerationStats

    prompts = _prompts(args)
    model, tok = _load_for_generation(args)
    st = GenerationStats()
    stream = None if args.no_stream or len(prompts) > 1 else _Streamer(tok)
    ids = llmquant.generate(model, prompts if len(prompts) > 1 else prompts[0], callback=stream, stats=st,
                            **_gen_kwargs(args))
    if len(prompts) > 1:  # one batch: each continuation after its prompt
        for i, (p, row) in enumerate(zip(prompts, ids)):
            print(f"--- [{i + 1}/{len(prompts)}] {p}")
            print(tok.decode(row, skip_special_tokens=True))
    elif stream is None:
        print(tok.decode(ids[0], skip_special_tokens=True))
    else:
        stream.out.write("\n")
    if args.stats:
        _print_stats(st)
    return 0


def _prompts(args) -> list[str]:
    """The prompts of ``generate``: each --prompt, then the lines of --prompts-file (at least one in all)."""
    from ..errors import GenerationError

    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise GenerationError(f"cannot read --prompts-file {args.prompts_file}: {e}") from e
        prompts += [ln for ln in lines if ln.strip()]
        if not any(ln.strip() for ln in lines):
            raise GenerationError(f"--prompts-file {args.prompts_file} has no prompt (every line is blank)")
    if not prompts:
        raise GenerationError("give the text to continue: --prompt TEXT (repeat it for a batch) or --prompts-file FILE")
    return prompts


def cmd_chat(args) -> int:
    import llmquant
    from ..runtime import GenerationStats, chat_prompt

    model, tok = _load_for_generation(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    kw = _gen_kwargs(args)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stream, st = _Streamer(tok), GenerationStats()
        llmquant.generate(model, chat_prompt(tok, messages), callback=stream, stats=st, **kw)
        print()
        messages.append({"role": "assistant", "content": stream.tok.decode(stream.ids, skip_special_tokens=True)})
        if args.stats:
            _print_stats(st)


def _add_generation_args(g) -> None:
    g.add_argument("--model", help="a folder saved by llmquant, a local HF folder or .gguf (default: SmolLM2-135M)")
    g.add_argument("--max-new-tokens", type=A.positive_int, default=128)
    g.add_argument("--temperature", type=A.float_range(0.0),
                   help="sample at this temperature (default and 0: greedy)")
    g.add_argument("--top-k", type=A.count, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=A.float_range(0.0, 1.0, lo_open=True),
                   help="sample from the smallest set with probability >= p")
    g.add_argument("--seed", type=A.seed, help="random seed for sampling")
    g.add_argument("--threads", type=A.threads, help="CPU threads (torch.set_num_threads); reported with --stats")
    g.add_argument("--kernel", help="force one kernel (e.g. packed_avx2, packed_q8act: int8 activations as llama.cpp, fbgemm_fp16, reference)")
    g.add_argument("--stats", action="store_true", help="print tokens/s and threads to stderr")
    g.add_argument("--prefill-bf16", action="store_true",
                   help="run the prompt's forward under bf16 autocast (faster prefill; decode stays fp32)")
