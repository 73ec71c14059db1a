"""Stopping criteria and stop strings in the speculative engine: checked after every new token as ``generate``
checks them, also inside an accepted path."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from distill_ops import SpeculativeDecoder

from .conftest import DEVICE
from .test_speculative import DYNAMIC_TREE, STATIC_TREE, make_head, models, prompts, reference_generate

CHAIN = [[0] * depth for depth in range(1, 6)]


class _LastTokenIs(StoppingCriteria):
    """Stops a sequence whose last token is ``token`` (a bool tensor per row, as transformers' criteria)."""

    def __init__(self, token: int):
        self.token = token
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids[:, -1] == self.token


def _stop_string_tokenizer():
    """A word-level tokenizer over ids ``0 .. 255`` (words ``t0`` ... ``t254``, and ``abcdef`` at 255: the probe
    that transformers' ``StopStringCriteria`` tokenizes to learn each token's text, here `` t17`` for ``t17``)."""
    import transformers
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(255)}
    vocab["abcdef"] = 255
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1",
                                                unk_token="t2")


def _generate(target, prompt, max_new, **kwargs):
    return target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new,
                           pad_token_id=0, **kwargs)


@pytest.mark.parametrize("tree_kind", ["dynamic", "static", "chain"])
@pytest.mark.parametrize("draft_kind", ["lm", "fspad"])
def test_stopping_criteria_and_stop_strings_equal_generate(draft_kind, tree_kind):
    """A criterion on the last token, one on the length (a Python bool), and stop strings of one and of two tokens
    (the text ends with them; as argument and from the generation config): the output stops exactly where
    generate's does. With the target as its own chain draft the stopping token lies inside an accepted path."""
    target, draft_lm = models("llama")
    draft = draft_lm if draft_kind == "lm" else make_head(target)
    if tree_kind == "chain":
        draft = target if draft_kind == "lm" else draft
        tree = dict(tree=CHAIN)
    else:
        tree = dict(tree=STATIC_TREE) if tree_kind == "static" else DYNAMIC_TREE
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    tokenizer = _stop_string_tokenizer()
    inside = 0
    for prompt in prompts(256, [1, 5, 9], seed=13):
        length = prompt.shape[1]
        free = reference_generate(target, prompt, 20, eos_token_id=[])[0, length:].tolist()
        words = tokenizer.convert_ids_to_tokens(free)
        cases = [
            dict(stopping_criteria=[_LastTokenIs(free[6])]),
            dict(stopping_criteria=[lambda ids, scores: ids.shape[1] >= length + 4]),
            dict(stop_strings=words[3]),
            dict(stop_strings=["never", words[7][1:] + " " + words[8]]),  # from inside token 7 to the end of 8
        ]
        for case in cases:
            expected = _generate(target, prompt, 20, eos_token_id=[], tokenizer=tokenizer, **case)
            out = engine.generate(prompt, max_new_tokens=20, eos_token_id=[], tokenizer=tokenizer, **case)
            assert torch.equal(out.sequences, expected), (case, out.sequences, expected)
            assert expected.shape[1] - length < 20  # it did stop early
            # The last step produced tokens past the stopping one: the stop came from inside an accepted path.
            inside += 1 + sum(accepted + 1 for accepted in out.accept_lengths) > out.num_new_tokens
        target.generation_config.stop_strings = words[3]
        try:
            expected = _generate(target, prompt, 20, eos_token_id=[], tokenizer=tokenizer)
            out = engine.generate(prompt, max_new_tokens=20, eos_token_id=[], tokenizer=tokenizer)
        finally:
            target.generation_config.stop_strings = None
        assert torch.equal(out.sequences, expected)
    if tree_kind == "chain" and draft_kind == "lm":
        assert inside >= 6


def test_stopping_criteria_in_a_batch_and_with_eos_and_bad_values():
    """A left-padded batch: each row stops as it would alone (the others go on); a criterion and an EOS in the
    same step: the earlier one wins. Criteria are called once per new token. Bad values are refused before any
    forward."""
    from .test_speculative_batch import left_padded

    target, draft = models("qwen2")
    rows = prompts(320, [3, 9, 1, 6], seed=47)
    ids, mask = left_padded(rows)
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    stop = reference_generate(target, rows[1], 10, eos_token_id=[])[0, 9 + 4].item()  # row 1's 5th new token
    criterion = _LastTokenIs(stop)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[],
                          stopping_criteria=StoppingCriteriaList([criterion]))
    assert criterion.calls >= out.num_new_tokens  # every new token of the longest row at least
    for b, prompt in enumerate(rows):
        alone = _generate(target, prompt, 12, eos_token_id=[], stopping_criteria=[_LastTokenIs(stop)])
        new = alone[0, prompt.shape[1]:]
        assert torch.equal(out.sequences[b, ids.shape[1]: ids.shape[1] + new.shape[0]], new), b
    assert out.sequences[1, ids.shape[1]:].tolist()[4] == stop
    free = reference_generate(target, rows[0], 12, eos_token_id=[])[0, 3:].tolist()
    for eos, criterion_token in ((free[2], free[5]), (free[5], free[2])):
        expected = _generate(target, rows[0], 12, eos_token_id=eos, stopping_criteria=[_LastTokenIs(criterion_token)])
        got = engine.generate(rows[0], max_new_tokens=12, eos_token_id=eos,
                              stopping_criteria=[_LastTokenIs(criterion_token)])
        assert torch.equal(got.sequences, expected) and got.num_new_tokens == 3
    prompt = rows[0]
    bad = [
        (dict(stopping_criteria=_LastTokenIs(3)), TypeError, "stopping_criteria must be a StoppingCriteriaList"),
        (dict(stopping_criteria=[_LastTokenIs(3), 5]), TypeError, "stopping_criteria[1] must be callable"),
        (dict(stop_strings="t5"), ValueError, "stop_strings needs the target's tokenizer: pass tokenizer="),
        # Not a tokenizer (an input-contract audit, 2026-12-07: an AttributeError inside StopStringCriteria).
        (dict(stop_strings="t5", tokenizer=7), TypeError,
         "tokenizer must be the target's transformers tokenizer for stop_strings, got int, which lacks get_vocab()"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=re.escape(message)):
            engine.generate(prompt, max_new_tokens=4, **kwargs)
    target.generation_config.stop_strings = ["t5"]
    try:
        with pytest.raises(ValueError, match=re.escape("target.generation_config.stop_strings needs the target's")):
            engine.generate(prompt, max_new_tokens=4)
    finally:
        target.generation_config.stop_strings = None


def test_sampling_stops_where_the_criteria_say():
    """Sampling: every sampled sequence ends exactly at its first token where the criterion holds (or at the
    budget), never past it, and a run without the criterion draws the same tokens up to there (the criterion does
    not consume randomness)."""
    target, _ = models("llama")
    engine = SpeculativeDecoder(target, target, tree=CHAIN, impl="torch")
    prompt = prompts(256, [4], seed=2)[0]
    stopped = 0
    for seed in range(12):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        full = engine.generate(prompt, max_new_tokens=16, temperature=1.0, top_k=3, eos_token_id=[],
                               generator=generator).sequences[0, 4:].tolist()
        stop = full[3]
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        cut = engine.generate(prompt, max_new_tokens=16, temperature=1.0, top_k=3, eos_token_id=[],
                              generator=generator, stopping_criteria=[_LastTokenIs(stop)]).sequences[0, 4:].tolist()
        first = full.index(stop)
        assert cut == full[: first + 1], (seed, cut, full)
        stopped += first + 1 < 16
    assert stopped == 12
