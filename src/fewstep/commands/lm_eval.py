"""`fewstep lm-eval ARGS`: lm-evaluation-harness's command line with the ``fewstep`` model registered.

Everything after ``lm-eval`` goes to lm-eval unchanged (``run`` is implied, ``--model fewstep`` added
when no model is named), except fewstep's own ``--threads N`` (torch's CPU threads; default as every
command's, docs/cli.md); see ``fewstep lm-eval run --help`` for lm-eval's own flags. lm-eval writes its
results under ``--output_path`` as new time-stamped files and never deletes anything.
"""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  fewstep lm-eval --model_args pretrained=/models/LLaDA-8B-Instruct,policy=threshold:0.9,cache=prefix,gen_length=256 \\
      --tasks gsm8k --apply_chat_template --batch_size 8 --output_path runs/lm-eval --log_samples
  accelerate launch -m fewstep.eval.lm_eval --model_args pretrained=/models/LLaDA-8B-Instruct,policy=entropy:0.5 \\
      --tasks gsm8k --apply_chat_template
  fewstep lm-eval --model_args pretrained=/models/LLaDA-8B-Base,mc_num=128 --tasks arc_challenge

model_args of the fewstep model: pretrained, tokenizer, dtype, device (wins over lm-eval's --device), policy
(commas inside the policy spec written as ';' or quoted; unset: the model's decoding.json, else
threshold:0.9), gen_length, block_length, cache, early_stop, cfg_scale, seed, mc_num,
mc_batch_size, check_greedy, add_bos_token, max_length, max_gen_toks, stats_path. generate_until runs
fewstep.generate; loglikelihood is LLaDA's Monte Carlo ELBO estimate (mc_num samples);
loglikelihood_rolling is not supported. See docs/evaluation.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fewstep lm-eval`` passes everything on to lm-eval, options included."""
    parser.epilog = EPILOG
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS", help="lm-eval's arguments")
    # No option of our own: every "--flag" must reach lm-eval, so none is parsed here ("-h" included,
    # handled in run()).
    parser.prefix_chars = "\0"
    parser.set_defaults(lm_eval_help=parser.format_help())


def run(args: argparse.Namespace) -> int:
    """Register the model and run lm-eval's CLI (``fewstep lm-eval [-h]`` alone prints this help)."""
    if not args.lm_eval_args or args.lm_eval_args in (["-h"], ["--help"]):
        print(args.lm_eval_help)
        return 0
    from fewstep.commands.common import apply_threads
    from fewstep.eval.lm_eval.__main__ import main

    rest, threads = _pop_threads(args.lm_eval_args)
    model_args = _value_of(rest, "--model_args")
    if _value_of(rest, "--model") in (None, "fewstep") and model_args is not None:
        from fewstep.eval.lm_eval import FewstepLM

        FewstepLM.check_model_args(model_args)  # fewstep's mistakes in one line, before lm-eval starts
    apply_threads(argparse.Namespace(threads=threads))
    return main(rest)


def _value_of(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``) in lm-eval's arguments, or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.partition("=")[2]
    return None


def _pop_threads(argv: list[str]) -> tuple[list[str], int | None]:
    """fewstep's ``--threads N`` (or ``--threads=N``) taken out of lm-eval's arguments."""
    from fewstep.commands.common import positive_int

    rest, threads, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--threads" or a.startswith("--threads="):
            value = a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                threads = positive_int(value)
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"--threads {exc}") from None
            i += 1 if "=" in a else 2
            continue
        rest.append(a)
        i += 1
    return rest, threads
