"""collect's batched decoder is the engine's naive policy, token for token and step for step."""

from __future__ import annotations

import torch

from cdlm import LLM, SamplingParams
from cdlm.models.loader import load_model
from cdlm.tokenizer import Tokenizer
from cdlm.training.data import chat_prompt_ids
from cdlm.training.decode import decode_bidirectional
from cdlm.training.world.tasks import generate


def test_decoder_matches_engine_bidirectional_naive(tiny_teacher_dir):
    model = load_model(tiny_teacher_dir)
    tok = Tokenizer.from_pretrained(tiny_teacher_dir)
    prompts = [chat_prompt_ids(tok, p.prompt) for p in generate("code", "test", 3, seed=0)]
    stop = {model.config.eos_token_id, tok.eot_token_id}
    gen_len, block = 16, 8
    for k in (1, 3):
        res = decode_bidirectional(model, prompts, gen_len, block, stop, tokens_per_step=k,
                                   record_hidden=True)
        llm = LLM(model=str(tiny_teacher_dir), block_size=block)
        outs = llm.generate(prompts, SamplingParams(max_tokens=gen_len, temperature=0.0,
                                                    tokens_per_step=k, skip_special_tokens=False),
                            mode="bidirectional")
        for i, out in enumerate(outs):
            mine = res.tokens[i][:len(out.token_ids)].tolist()
            assert mine == list(out.token_ids)
            assert int(res.num_steps[i]) == out.steps
        # Hidden states are the lm_head inputs: rebuilding logits gives the chosen token.
        decided = res.steps >= 0
        rebuilt = model.logits(res.hidden[decided]).argmax(-1)
        assert torch.equal(rebuilt, res.tokens[decided])
