"""``SpeculativeDecoder.hf_generate``: the engine called as ``target.generate`` is, options resolved as
transformers resolves them (a ``GenerationConfig`` and keyword overrides over the target's config and the global
defaults), and ``generate(generation_config=...)``, which reads the options it is not given from that config."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from distill_ops import SpeculativeDecoder

from .conftest import DEVICE, word_tokenizer
from .test_speculative import DYNAMIC_TREE, models, prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def _engine(impl: str = "torch") -> SpeculativeDecoder:
    target, draft = models("llama")
    return SpeculativeDecoder(target, draft, impl=impl, **DYNAMIC_TREE)


@pytest.mark.parametrize("options", [
    {},  # generate's default: 20 new tokens
    dict(max_new_tokens=7),
    dict(max_length=9),  # the prompt counts
    dict(max_length=30, max_new_tokens=4),  # max_new_tokens wins
    dict(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(max_new_tokens=6, eos_token_id=list(range(0, 256, 3)), min_new_tokens=3, pad_token_id=0),
    dict(max_new_tokens=6, eos_token_id=list(range(0, 256, 3)), min_length=8, pad_token_id=0),
    # min_new_tokens wins over min_length (the EOS may come after 1 new token, not at 30 tokens)
    dict(max_new_tokens=6, eos_token_id=list(range(0, 256, 3)), min_length=30, min_new_tokens=1, pad_token_id=0),
    dict(max_new_tokens=5, top_k=3, temperature=0.5, top_p=0.5),  # sampling fields: ignored when greedy
])
def test_greedy_options_resolve_as_generate(options):
    """Keyword options over the target's (empty) generation config: the same sequences as ``target.generate``."""
    engine = _engine()
    for prompt in prompts(256, [1, 5], seed=4):
        expected = engine.target.generate(prompt, **options)
        assert torch.equal(engine.hf_generate(prompt, **options).sequences, expected), options


def test_generation_config_object_and_the_targets_config():
    """A ``GenerationConfig`` given to both; fields of the target's own config fill what it leaves unset, and
    keywords override both. ``generate(generation_config=...)`` reads its unset options from the given config
    instead of the target's."""
    engine = _engine()
    target = engine.target
    prompt = prompts(256, [6], seed=9)[0]
    given = GenerationConfig(max_new_tokens=8, repetition_penalty=1.4)
    plain = target.generate(prompt, generation_config=given)
    assert torch.equal(engine.hf_generate(prompt, given).sequences, plain)
    target.generation_config.suppress_tokens = [int(plain[0, 6])]  # the first new token: the output changes
    try:
        for options in ({}, dict(suppress_tokens=[]), dict(max_new_tokens=3)):
            expected = target.generate(prompt, generation_config=given, **options)
            assert torch.equal(engine.hf_generate(prompt, given, **options).sequences, expected), options
        unpenalized = engine.hf_generate(prompt, max_new_tokens=8).sequences
        assert torch.equal(unpenalized, target.generate(prompt, max_new_tokens=8))
        # generate() with a given config: its repetition penalty and no suppressed tokens, not the target's
        own = engine.generate(prompt, max_new_tokens=8, generation_config=GenerationConfig(repetition_penalty=1.4))
        assert torch.equal(own.sequences, plain)
        assert not torch.equal(own.sequences, target.generate(prompt, max_new_tokens=8, repetition_penalty=1.4))
    finally:
        target.generation_config.suppress_tokens = None


def test_tokenizer_batch_with_attention_mask_and_bos_start():
    """``**tokenizer(texts)`` of a left-padded batch (``input_ids`` and ``attention_mask`` keywords), and no prompt
    at all (``bos_token_id``: a batch of one, as ``generate`` starts)."""
    engine = _engine()
    tokenizer = word_tokenizer(256)
    tokenizer.padding_side = "left"
    batch = tokenizer(["t5 t9 t30 t77", "t3 t200"], padding=True, return_tensors="pt").to(DEVICE)
    expected = engine.target.generate(**batch, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(engine.hf_generate(**batch, max_new_tokens=6, pad_token_id=0).sequences, expected)
    expected = engine.target.generate(bos_token_id=7, max_new_tokens=5)
    assert torch.equal(engine.hf_generate(bos_token_id=7, max_new_tokens=5).sequences, expected)


def test_generate_warns_when_a_padded_prompt_comes_without_its_mask():
    """``generate`` reads every position as a token without an ``attention_mask`` (documented), where transformers'
    ``generate`` masks the prompt's pad tokens out: a left-padded batch without its mask warns and names the way out
    (it diverged from ``target.generate`` silently); with the mask, or through ``hf_generate``, it equals
    ``target.generate`` and does not warn. No pad id in the prompt, or a pad id that is an EOS id: no warning."""
    import warnings

    engine = _engine()
    tokenizer = word_tokenizer(256)
    tokenizer.padding_side = "left"
    batch = tokenizer(["t5 t9 t30 t77", "t3 t200"], padding=True, return_tensors="pt").to(DEVICE)
    assert (batch["input_ids"] == 0).any()
    with pytest.warns(UserWarning, match="input_ids hold pad_token_id 0 and no attention_mask was given"):
        engine.generate(batch["input_ids"], max_new_tokens=4, pad_token_id=0, eos_token_id=[])
    expected = engine.target.generate(**batch, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = engine.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                                 pad_token_id=0, eos_token_id=[])
        assert torch.equal(masked.sequences, expected)
        assert torch.equal(engine.hf_generate(**batch, max_new_tokens=4, pad_token_id=0, eos_token_id=None).sequences,
                           expected)
        engine.generate(batch["input_ids"][:1], max_new_tokens=2, pad_token_id=0, eos_token_id=[])  # no pad in it
        engine.generate(batch["input_ids"], max_new_tokens=2, pad_token_id=0, eos_token_id=[0])  # pad is an EOS


def test_generate_warns_when_filters_come_without_a_temperature():
    """``top_k`` / ``top_p`` only filter when sampling (documented): greedy ``generate`` with them warns, as
    transformers' ``generate`` does for sampling fields without ``do_sample``, and still decodes greedily. No
    warning when sampling, without the filters, for the no-op values (``top_k=0``, ``top_p=1``), or through
    ``hf_generate``, which resolves greedy decoding itself."""
    import warnings

    engine = _engine()
    prompt = prompts(256, [5], seed=44)[0]
    greedy = engine.generate(prompt, max_new_tokens=4, eos_token_id=[]).sequences
    for filters in (dict(top_k=5), dict(top_p=0.5), dict(top_k=3, top_p=0.9)):
        with pytest.warns(UserWarning, match="only filter when sampling: temperature=0 decodes greedily"):
            out = engine.generate(prompt, max_new_tokens=4, eos_token_id=[], **filters)
        assert torch.equal(out.sequences, greedy), filters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for filters in (dict(top_k=0), dict(top_p=1.0), dict(top_k=None, top_p=None)):
            engine.generate(prompt, max_new_tokens=2, eos_token_id=[], **filters)
        engine.generate(prompt, max_new_tokens=2, eos_token_id=[], temperature=1.0, top_k=5, top_p=0.5,
                        generator=torch.Generator(DEVICE).manual_seed(0))
        engine.hf_generate(prompt, max_new_tokens=2, do_sample=False, top_k=5, top_p=0.5, eos_token_id=None)


def test_sampling_maps_do_sample_and_the_global_defaults():
    """``do_sample=True`` samples with the config's temperature, ``top_k`` (transformers' default 50 when unset)
    and ``top_p``: the same tokens as ``generate`` given those values and the same generator state, and not those
    of a run without the default top-k (which the flat temperature makes matter). ``num_return_sequences``
    repeats each prompt, adjacent."""
    engine = _engine()
    first, second = prompts(256, [3, 3], seed=12)
    ids = torch.cat([first, second])

    def generator():
        return torch.Generator(device=DEVICE).manual_seed(5)

    options = dict(max_new_tokens=6, temperature=6.0)
    ours = engine.hf_generate(ids, do_sample=True, generator=generator(), **options).sequences
    assert torch.equal(ours, engine.generate(ids, top_k=50, generator=generator(), **options).sequences)
    assert not torch.equal(ours, engine.generate(ids, generator=generator(), **options).sequences)
    ours = engine.hf_generate(ids, do_sample=True, top_k=0, top_p=0.9, num_return_sequences=3, generator=generator(),
                              **options).sequences
    repeated = ids.repeat_interleave(3, dim=0)
    assert torch.equal(ours[:, :3], repeated)
    assert torch.equal(ours, engine.generate(repeated, top_p=0.9, generator=generator(), **options).sequences)
    # temperature 1 (the default) and top_p 1 are no warpers
    ours = engine.hf_generate(ids, do_sample=True, max_new_tokens=4, top_p=1.0, generator=generator()).sequences
    assert torch.equal(ours, engine.generate(ids, max_new_tokens=4, temperature=1.0, top_k=50,
                                             generator=generator()).sequences)


def test_max_time_and_stopping_criteria():
    """``max_time`` adds transformers' ``MaxTimeCriteria`` (0 seconds: one new token, as ``generate``), next to the
    caller's criteria."""
    engine = _engine()
    prompt = prompts(256, [4], seed=3)[0]
    expected = engine.target.generate(prompt, max_new_tokens=8, max_time=0.0)
    assert expected.shape[1] == 5
    assert torch.equal(engine.hf_generate(prompt, max_new_tokens=8, max_time=0.0).sequences, expected)

    def stop_at_seven(input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 7, dtype=torch.bool, device=input_ids.device)

    out = engine.hf_generate(prompt, max_new_tokens=8, stopping_criteria=[stop_at_seven]).sequences
    assert torch.equal(out, engine.target.generate(prompt, max_new_tokens=8)[:, :7])


@pytest.mark.parametrize("options, error, match", [
    (dict(num_beams=2), ValueError, "beam_search"),
    (dict(output_attentions=True, return_dict_in_generate=True), ValueError, "output_attentions"),
    (dict(token_type_ids=torch.zeros(1, 4, dtype=torch.int64)), ValueError, "token_type_ids"),
    (dict(assistant_model=object(), negative_prompt_ids=torch.zeros(1, 2, dtype=torch.int64), synced_gpus=None),
     ValueError, "take assistant_model, negative_prompt_ids: neither"),  # None: generate's default, ignored
    (dict(max_length=3), ValueError, "max_length is 3"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    # A str temperature was a TypeError from a comparison; a negative top_p decoded greedily where generate's
    # TopPLogitsWarper refuses it (an audit of bad inputs).
    (dict(do_sample=True, temperature="1"), TypeError, "generation_config.temperature must be a Python int or float"),
    (dict(do_sample=True, top_p=-0.5), ValueError, r"generation_config.top_p must be in \[0.0, inf\), got -0.5"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
    (dict(repetition_penalty=-1.0), ValueError, "repetition_penalty"),
    (dict(generation_config={"max_new_tokens": 3}), TypeError, "GenerationConfig"),
    (dict(input_ids=torch.zeros(1, 4, dtype=torch.int64)), ValueError, "both"),
    (dict(inputs=None, bos_token_id=None), ValueError, "bos_token_id"),
])
def test_refusals_name_the_option(options, error, match):
    """Options the engine cannot honour, or bad values, are refused naming them, before any forward."""
    engine = _engine()
    prompt = prompts(256, [4], seed=3)[0]
    calls = []
    handle = engine.target.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        inputs = options.pop("inputs", prompt)
        with pytest.raises(error, match=match):
            engine.hf_generate(inputs, **options)
    finally:
        handle.remove()
    assert not calls


def test_generate_generation_config_argument_is_checked_and_named():
    """``generate(generation_config=...)``: not a ``GenerationConfig`` is a ``TypeError``; a bad field value is a
    ``ValueError`` naming ``generation_config.<field>`` (not the target's); beam search in it is refused."""
    engine = _engine()
    prompt = prompts(256, [4], seed=3)[0]
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig"):
        engine.generate(prompt, max_new_tokens=2, generation_config=dict(repetition_penalty=1.2))
    config = GenerationConfig()
    config.repetition_penalty = -2.0
    with pytest.raises(ValueError, match=r"^generation_config\.repetition_penalty"):
        engine.generate(prompt, max_new_tokens=2, generation_config=config)
    with pytest.raises(ValueError, match=r"generation_config sets num_beams=3"):
        engine.generate(prompt, max_new_tokens=2, generation_config=GenerationConfig(num_beams=3))


def test_triton_path():
    """The same resolution on the Triton kernels (interpreter on CPU)."""
    engine = _engine("triton")
    prompt = prompts(256, [5], seed=21)[0]
    options = dict(max_new_tokens=6, repetition_penalty=1.2)
    assert torch.equal(engine.hf_generate(prompt, **options).sequences, engine.target.generate(prompt, **options))


def test_review_cases_resolve_as_generate():
    """Cases a review found: a pad token in a prompt given without a mask (generate masks it out); integral float
    lengths; the values generate skips rather than refuses (epsilon / eta cutoffs outside (0, 1), typical_p >= 1,
    n-gram sizes below 1, negative EOS ids, suppressed ids outside the vocabulary)."""
    engine = _engine()
    target = engine.target
    prompt = prompts(256, [5], seed=4)[0]
    padded = torch.cat([torch.full((1, 2), 7, device=DEVICE), prompt], dim=1)
    for options in (dict(pad_token_id=7), dict(pad_token_id=7, eos_token_id=[7, 9])):
        expected = target.generate(padded, max_new_tokens=6, **options)
        assert torch.equal(engine.hf_generate(padded, max_new_tokens=6, **options).sequences, expected), options
    with pytest.raises(ValueError, match="holds pad_token_id 7 between tokens"):
        engine.hf_generate(torch.cat([prompt, padded], dim=1), max_new_tokens=2, pad_token_id=7)
    for options in (dict(max_length=9.0), dict(max_new_tokens=4.0, min_new_tokens=2, eos_token_id=[3, 5]),
                    dict(no_repeat_ngram_size=-1, encoder_no_repeat_ngram_size=0, suppress_tokens=[300, 4],
                         eos_token_id=[-1, 11], max_new_tokens=6),
                    dict(epsilon_cutoff=1.0, eta_cutoff=-0.1, typical_p=1.5, max_new_tokens=5)):
        expected = target.generate(prompt, **options)
        assert torch.equal(engine.hf_generate(prompt, **options).sequences, expected), options


def test_review_cases_when_sampling():
    """``temperature=None`` samples at temperature 1 (no warper), as generate; ``top_p=0`` keeps the one most
    likely token (generate's top-p keeps at least one): the greedy sequence; skipped cutoffs do not refuse."""
    engine = _engine()
    prompt = prompts(256, [3], seed=6)[0]

    def generator():
        return torch.Generator(device=DEVICE).manual_seed(11)

    ours = engine.hf_generate(prompt, do_sample=True, temperature=None, max_new_tokens=6, epsilon_cutoff=1.0,
                              generator=generator()).sequences
    assert torch.equal(ours, engine.generate(prompt, temperature=1.0, top_k=50, max_new_tokens=6,
                                             generator=generator()).sequences)
    greedy = engine.target.generate(prompt, max_new_tokens=6)
    assert torch.equal(engine.hf_generate(prompt, do_sample=True, top_p=0.0, temperature=3.0, max_new_tokens=6,
                                          generator=generator()).sequences, greedy)


def test_callers_criteria_replace_the_configs_of_their_type():
    """As generate merges them: a caller's ``MaxLengthCriteria`` / ``MaxTimeCriteria`` / ``StopStringCriteria``
    replaces the one generate builds from ``max_length`` / ``max_time`` / ``stop_strings``; an
    ``EosTokenCriteria`` (which would replace the EOS rule) is refused."""
    from transformers import StoppingCriteriaList
    from transformers.generation import EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria

    engine = _engine()
    target = engine.target
    prompt = prompts(256, [5], seed=4)[0]
    for criteria, options in (([MaxLengthCriteria(max_length=12)], dict(max_new_tokens=4)),
                              ([MaxLengthCriteria(max_length=8)], dict(max_new_tokens=6)),
                              ([MaxTimeCriteria(100.0)], dict(max_new_tokens=4, max_time=0.0))):
        expected = target.generate(prompt, stopping_criteria=StoppingCriteriaList(criteria), **options)
        ours = engine.hf_generate(prompt, stopping_criteria=StoppingCriteriaList(criteria), **options).sequences
        assert torch.equal(ours, expected), criteria
    with pytest.raises(ValueError, match="EosTokenCriteria"):
        engine.hf_generate(prompt, max_new_tokens=3, stopping_criteria=[EosTokenCriteria(eos_token_id=3)])
    # A caller's StopStringCriteria replaces the config's stop_strings (a merge that kept both stopped at the
    # config's string, 6 tokens in, where generate goes on to the caller's).
    from transformers.generation import StopStringCriteria

    from .test_speculative_stopping import _stop_string_tokenizer

    tokenizer = _stop_string_tokenizer()
    words = tokenizer.convert_ids_to_tokens(engine.generate(prompt, max_new_tokens=12, eos_token_id=[]).sequences[
        0, 5:].tolist())
    options = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=0, tokenizer=tokenizer, stop_strings=[words[3]])
    outputs = []
    for run in (lambda criteria: target.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                  stopping_criteria=criteria, **options),
                lambda criteria: engine.hf_generate(prompt, stopping_criteria=criteria, **options).sequences):
        outputs.append(run(StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=[words[9]])])))
    assert outputs[0].shape[1] > 5 + 4 and torch.equal(outputs[1], outputs[0])


def test_warpers_apply_the_temperature_once():
    """``min_p`` puts sampling on the warper path (generate's warper list filters the logits, temperature included):
    the verifier then samples at temperature 1. 400 first tokens at T = 0.5: the share of the most likely one is
    within 4.5 standard deviations of generate's exact warped distribution (0.883 here; a verifier that applied T
    again drew it 0.988 of the time)."""
    from transformers.generation import logits_process

    engine = _engine()
    target = engine.target
    prompt = prompts(256, [5], seed=4)[0]
    with torch.no_grad():
        logits = target(prompt).logits[0, -1].float()
    warpers = logits_process.LogitsProcessorList([logits_process.TemperatureLogitsWarper(0.5),
                                                  logits_process.MinPLogitsWarper(0.05)])
    exact = torch.softmax(warpers(prompt, logits[None].clone())[0], -1)
    draws = 400
    out = engine.generate(prompt.expand(draws, -1), max_new_tokens=1, temperature=0.5, min_p=0.05, eos_token_id=[],
                          generator=torch.Generator().manual_seed(0))
    top = float(exact.max())
    assert 0.5 < top < 0.95
    count = int((out.sequences[:, -1].cpu() == int(exact.argmax())).sum())
    assert abs(count - draws * top) < 4.5 * (draws * top * (1 - top)) ** 0.5, (count, draws * top)


def test_default_length_is_capped_at_the_models_positions():
    """No length given: generate's default max_length (20) is capped at the model's max_position_embeddings when
    that is smaller (12 here: 12 tokens in all, not 25), and the engine caps it alike."""
    engine = _engine()
    target = engine.target
    prompt = prompts(256, [5], seed=4)[0]
    saved = target.config.max_position_embeddings
    target.config.max_position_embeddings = 12
    try:
        expected = target.generate(prompt)
        ours = engine.hf_generate(prompt).sequences
    finally:
        target.config.max_position_embeddings = saved
    assert expected.shape[1] == 12 and torch.equal(ours, expected)


@pytest.mark.parametrize("options, match", [
    (dict(output_attentions=True), "output_attentions: the speculative engine"),
    (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states: the speculative"),
    (dict(token_healing=True), "token_healing"),
    (dict(bad_words_ids=[]), "bad_words_ids must be a non-empty list"),
])
def test_more_refusals(options, match):
    engine = _engine()
    with pytest.raises(ValueError, match=match):
        engine.hf_generate(prompts(256, [4], seed=3)[0], max_new_tokens=3, **options)
