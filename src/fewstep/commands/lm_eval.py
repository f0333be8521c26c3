"""`fewstep lm-eval ARGS`: lm-evaluation-harness's command line with the ``fewstep`` model registered.

Everything after ``lm-eval`` goes to lm-eval unchanged (``run`` is implied, ``--model fewstep`` added
when no model is named); see ``fewstep lm-eval run --help`` for lm-eval's own flags.
"""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  fewstep lm-eval --model_args pretrained=/models/LLaDA-8B-Instruct,policy=threshold:0.9,cache=dual,gen_length=256 \\
      --tasks gsm8k --apply_chat_template --batch_size 8 --output_path runs/lm-eval --log_samples
  accelerate launch -m fewstep.eval.lm_eval --model_args pretrained=/models/LLaDA-8B-Instruct,policy=entropy:0.5 \\
      --tasks gsm8k --apply_chat_template
  fewstep lm-eval --model_args pretrained=/models/LLaDA-8B-Base,mc_num=128 --tasks arc_challenge

model_args of the fewstep model: pretrained, tokenizer, dtype, device, policy (commas inside the policy
spec written as ';' or quoted), gen_length, block_length, cache, early_stop, cfg_scale, seed, mc_num,
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
    from fewstep.eval.lm_eval.__main__ import main

    return main(args.lm_eval_args)
