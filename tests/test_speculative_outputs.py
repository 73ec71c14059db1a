"""``output_scores`` / ``output_logits``: per sequence, the rows each generated token was chosen from, equal to
``generate``'s ``scores`` (processed, warped when sampling) and ``logits`` (unprocessed)."""

from __future__ import annotations

import pytest
import torch

from distill_ops import SpeculativeDecoder

from .conftest import DEVICE, assert_close
from .test_speculative import DYNAMIC_TREE, STATIC_TREE, make_head, models, prompts, reference_generate
from .test_speculative_batch import left_padded

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

EOS = list(range(0, 256, 9))


def _assert_rows(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal -inf entries, the finite ones within fp32 tolerance (tree attention and a plain forward round
    differently)."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], torch.float32)


@pytest.mark.parametrize("draft_kind", ["lm", "head", "static"])
def test_greedy_scores_and_logits_equal_generate(draft_kind):
    """Greedy, with processors that make scores differ from logits (repetition penalty, n-gram ban, EOS held back
    by min_new_tokens; and the bans alone, which write into the step's own logits tensor), prompts of 1 to 5
    tokens, EOS ending some runs early: one row per new token, equal to ``generate``'s."""
    target, draft = models("llama")
    draft, tree = {"lm": (draft, DYNAMIC_TREE), "head": (make_head(target), DYNAMIC_TREE),
                   "static": (draft, dict(tree=STATIC_TREE))}[draft_kind]
    engine = SpeculativeDecoder(target, draft, impl="torch", **tree)
    options = dict(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=2,
                   eos_token_id=EOS, pad_token_id=0)
    in_place = dict(max_new_tokens=9, no_repeat_ngram_size=1, min_new_tokens=2, eos_token_id=EOS, pad_token_id=0)
    for prompt, options in [(prompt, options) for prompt in prompts(256, [1, 5, 3], seed=3)] + [
            (prompt, in_place) for prompt in prompts(256, [4], seed=4)]:  # bans written into the step's logits
        expected = target.generate(prompt, do_sample=False, output_scores=True, output_logits=True,
                                   return_dict_in_generate=True, **options)
        out = engine.generate(prompt, output_scores=True, output_logits=True, **options)
        assert torch.equal(out.sequences, expected.sequences)
        new = expected.sequences.shape[1] - prompt.shape[1]
        assert len(out.scores) == len(out.logits) == 1 and out.scores[0].shape == (new, 256)
        _assert_rows(out.scores[0], torch.stack(expected.scores)[:, 0])
        _assert_rows(out.logits[0], torch.stack(expected.logits)[:, 0])
        assert not torch.equal(out.scores[0], out.logits[0])
    plain = engine.generate(prompt, max_new_tokens=3)
    assert plain.scores is None and plain.logits is None


@pytest.mark.parametrize("warpers", [dict(top_k=20, top_p=0.8), dict(top_k=20, min_p=0.05)])
def test_sampled_scores_are_generates_warped_rows(warpers):
    """Sampling at temperature 1.3: the row of each sampled token equals the scores ``generate`` reports for the
    next token after that prefix (its processors and warpers: temperature, top-k, top-p, or min-p through the
    engine's warper-list path), and the sampled token is never one the scores rule out."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(256, [4], seed=7)[0]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    out = engine.generate(prompt, max_new_tokens=8, temperature=1.3, generator=generator, repetition_penalty=1.2,
                          output_scores=True, **warpers)
    sequence = out.sequences[0]
    for k in range(sequence.shape[0] - prompt.shape[1]):
        prefix = sequence[: prompt.shape[1] + k][None]
        expected = target.generate(prefix, do_sample=True, max_new_tokens=1, temperature=1.3, repetition_penalty=1.2,
                                   output_scores=True, return_dict_in_generate=True, **warpers).scores[0][0]
        _assert_rows(out.scores[0][k], expected)
        assert torch.isfinite(out.scores[0][k, sequence[prompt.shape[1] + k]])


def test_batch_rows_and_hf_generate():
    """A left-padded batch whose rows end at different steps: each row's scores are those of the sequence decoded
    alone; ``hf_generate(output_scores=True, output_logits=True)`` fills them too."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [2, 6, 4], seed=5)
    ids, mask = left_padded(rows)
    options = dict(max_new_tokens=9, eos_token_id=EOS, pad_token_id=0, output_scores=True, output_logits=True)
    out = engine.hf_generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
    counts = _rows_equal_alone(engine, out, rows, options)
    assert len(set(counts)) > 1  # rows left the batch at different steps


def _rows_equal_alone(engine, out, rows, options):
    """Checks each row's scores and logits in ``out`` against the sequence decoded alone; returns how many steps
    each sequence took alone."""
    counts = []
    for index, row in enumerate(rows):
        alone = engine.generate(row, **options)
        counts.append(alone.scores[0].shape[0])
        _assert_rows(out.scores[index], alone.scores[0])
        _assert_rows(out.logits[index], alone.logits[0])
    return counts


def test_triton_path_and_flags_are_checked():
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="triton", **DYNAMIC_TREE)
    prompt = prompts(256, [5], seed=21)[0]
    expected = target.generate(prompt, do_sample=False, max_new_tokens=6, output_scores=True,
                               return_dict_in_generate=True, repetition_penalty=1.2)
    out = engine.generate(prompt, max_new_tokens=6, output_scores=True, repetition_penalty=1.2)
    _assert_rows(out.scores[0], torch.stack(expected.scores)[:, 0])
    with pytest.raises(TypeError, match="output_scores"):
        engine.generate(prompt, max_new_tokens=2, output_scores="yes")


def test_batch_rows_after_an_earlier_row_left():
    """The first sequence of a batch ends early (an EOS only it emits) while the others go on: each later step's
    rows belong to the sequences still in the batch, so every sequence's scores and logits are still those of the
    sequence decoded alone."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    rows = prompts(256, [4, 2, 7], seed=5)
    eos = reference_generate(target, rows[0], 12)[0, 4 + 2].item()  # row 0's third new token
    ids, mask = left_padded(rows)
    options = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0, output_scores=True, output_logits=True)
    counts = _rows_equal_alone(engine, engine.generate(ids, attention_mask=mask, **options), rows, options)
    assert counts[0] == 3 and counts[1] > 3 and counts[2] > 3  # row 0 left the batch before the others


def test_hf_generate_renormalize_logits_reports_log_probability_scores():
    """``renormalize_logits=True``: generate's last processor log-softmaxes the scores it reports (the tokens are
    unchanged); ``hf_generate`` returned the raw processed rows (logsumexp 5.9, not 0; a review, 2026-12-07)."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    options = dict(max_new_tokens=6, repetition_penalty=1.3, eos_token_id=EOS, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True, renormalize_logits=True)
    for prompt in prompts(256, [1, 4], seed=5):
        expected = target.generate(prompt, do_sample=False, **options)
        out = engine.hf_generate(prompt, **options)
        assert torch.equal(out.sequences, expected.sequences)
        _assert_rows(out.scores[0], torch.stack(expected.scores)[:, 0])
        assert_close(out.scores[0].logsumexp(-1), torch.zeros(out.scores[0].shape[0], device=DEVICE), torch.float32)
