"""transformers' other sampling warpers (min_p, typical_p, epsilon_cutoff, eta_cutoff) in the speculative engine:
sampling stays lossless with generate's own warper list applied at every tree node."""

from __future__ import annotations

import re

import pytest
import torch
from transformers.generation import logits_process as processors

from distill_ops import SpeculativeDecoder

from .conftest import DEVICE
from .test_speculative import (
    DYNAMIC_TREE,
    _sequence_distribution,
    _sequence_sampling_pvalue,
    models,
    prompts,
    reference_generate,
)


def _warped(warpers):
    """``_sequence_distribution``'s ``process``: generate's warper list on one row (temperature included: the
    distribution is then taken at temperature 1 without top-k)."""
    def process(logits, held, step):
        return warpers(torch.empty(1, 0, dtype=torch.int64), logits.float()[None].clone())[0]
    return process


@pytest.mark.parametrize("case", ["min_p", "typical_eta_from_config"])
def test_sampling_with_warpers_is_lossless_chi_square(case):
    """The first three sampled tokens follow generate's distribution with the warpers (exact, by enumeration of
    the target's warped distributions): ``min_p`` as an argument, with the target as its own draft (whole paths
    accepted, the third token from an accepted draft's row); ``typical_p`` + ``eta_cutoff`` + top-k + top-p read
    from the generation config, with a draft LM. The same run without the warpers is rejected."""
    target, draft_lm = models("llama")
    vocab = target.config.vocab_size
    prompt = prompts(256, [2], seed=36)[0]
    if case == "min_p":
        temperature, top_k, top_p, options, config = 1.3, None, None, dict(min_p=0.25), {}
        warpers = [processors.TemperatureLogitsWarper(1.3), processors.MinPLogitsWarper(0.25)]
        engine = SpeculativeDecoder(target, target, depth=2, topk=3, num_nodes=6, impl="torch")
    else:
        temperature, top_k, top_p, options = 0.8, 6, 0.95, {}
        config = dict(typical_p=0.6, eta_cutoff=0.05)
        warpers = [processors.TemperatureLogitsWarper(0.8), processors.TopKLogitsWarper(6),
                   processors.TopPLogitsWarper(0.95), processors.TypicalLogitsWarper(0.6),
                   processors.EtaLogitsWarper(0.05)]
        engine = SpeculativeDecoder(target, draft_lm, impl="torch", **DYNAMIC_TREE)
    expected = _sequence_distribution(target, prompt, 3, 1.0, vocab, _warped(processors.LogitsProcessorList(warpers)))
    assert len(expected) < 150  # the warpers cut the distribution (else the chi-square test would be weak)
    before = {name: getattr(target.generation_config, name) for name in config}
    for name, value in config.items():
        setattr(target.generation_config, name, value)
    try:
        pvalue = _sequence_sampling_pvalue(engine, prompt, expected, 300, temperature, top_k, 0, top_p=top_p,
                                           **options)
    finally:
        for name, value in before.items():
            setattr(target.generation_config, name, value)
    assert pvalue > 1e-3
    unwarped = _sequence_sampling_pvalue(engine, prompt, expected, 150, temperature, top_k, 1, top_p=top_p)
    assert unwarped < 1e-3


def test_warpers_leave_greedy_alone_and_bad_values_are_refused():
    """Greedy decoding ignores the warpers (as generate with do_sample=False); out-of-range values, as arguments
    or in the generation config, are a ValueError naming them, before any forward."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(256, [5], seed=4)[0]
    target.generation_config.min_p = 0.3
    try:
        assert torch.equal(engine.generate(prompt, max_new_tokens=8).sequences, reference_generate(target, prompt, 8))
    finally:
        target.generation_config.min_p = None
    generator = torch.Generator(device=DEVICE)
    sampling = dict(temperature=1.0, generator=generator, max_new_tokens=3)
    bad = [
        (dict(min_p=1.5), "min_p must be in [0.0, 1.0]"),
        (dict(typical_p=0.0), "typical_p must be in (0.0, 1.0]"),
        (dict(epsilon_cutoff=1.0), "epsilon_cutoff must be in [0.0, 1.0)"),
        (dict(top_h=-0.5), "top_h must be in (0.0, 1.0]"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.generate(prompt, **sampling, **kwargs)
    target.generation_config.eta_cutoff = 2.0
    try:
        with pytest.raises(ValueError, match=re.escape("target.generation_config.eta_cutoff must be in")):
            engine.generate(prompt, **sampling)
    finally:
        target.generation_config.eta_cutoff = None
