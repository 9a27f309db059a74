"""Offline pipeline that turns a diffusion LM teacher into a CDLM student (SPEC section 3).

Stages (each a subcommand of `python -m cdlm.training`, each resumable):
  world-data  synthetic task families, tokenizer, prompt JSONL (the small world only)
  teacher     a tiny teacher trained from scratch with the masked-diffusion objective
  collect     naive-policy teacher trajectories (tokens, finalisation steps, hidden states)
  distill     the block-causal LoRA student with the three CDLM losses
  eval        the paper's table: naive teacher, threshold teacher, cut teacher, CDLM student
  world       all of the above, in order, for the bundled small world
"""
