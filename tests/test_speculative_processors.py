"""The caller's own logits processors in the speculative engine: ``logits_processor=`` (a transformers
``LogitsProcessorList`` or a list of callables) and ``prefix_allowed_tokens_fn=`` (constrained decoding), applied
at every tree node to the node's own sequence, in ``generate``'s order."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from distill_ops import SpeculativeDecoder

from .conftest import DEVICE
from .test_speculative import DYNAMIC_TREE, STATIC_TREE, make_head, models, prompts
from .test_speculative_batch import left_padded
from .test_speculative import _sequence_distribution, _sequence_sampling_pvalue

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


class ParityBump(LogitsProcessor):
    """A processor that reads the whole sequence: no token t with t + (the sequence's sum) divisible by 3, and +3
    on token (sequence length + last token) mod V, so that the output differs from the unprocessed one at most steps
    and depends on every token and on the length."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        ids = torch.arange(vocab, device=scores.device)
        scores = scores.masked_fill((ids[None] + input_ids.sum(-1)[:, None]) % 3 == 0, -float("inf"))
        bumped = (input_ids[:, -1] + input_ids.shape[1]) % vocab
        return scores + torch.zeros_like(scores).scatter_(1, bumped[:, None], 3.0)


def allowed_after(batch_id: int, sequence: torch.Tensor) -> list[int]:
    """A prefix rule that depends on the last token and on the batch index: four fifths of the vocabulary."""
    last = int(sequence[-1])
    return [token for token in range(256) if (7 * token + last + batch_id) % 5 != 0]


EOS = list(range(0, 256, 9))


def _engines():
    target, draft = models("llama")
    return [
        SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE),
        SpeculativeDecoder(target, draft, impl="torch", tree=STATIC_TREE),
        SpeculativeDecoder(target, make_head(target), impl="torch", **DYNAMIC_TREE),
        SpeculativeDecoder(target, target, impl="torch", depth=3, topk=1, num_nodes=4),  # the target's own chain
    ]


OPTIONS = [
    dict(logits_processor=LogitsProcessorList([ParityBump()])),
    dict(prefix_allowed_tokens_fn=allowed_after),
    dict(logits_processor=[ParityBump()], prefix_allowed_tokens_fn=allowed_after, repetition_penalty=1.2,
         no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("options", OPTIONS, ids=["processor", "prefix", "both+rules"])
def test_greedy_equals_generate(options):
    """Token for token ``target.generate``'s output, for draft LMs, an FSPAD head and the target drafting for
    itself (whose unconstrained drafts the constraint rejects), static and dynamic trees, prompts of 1 to 7
    tokens; ``hf_generate`` passes both options through."""
    engines = _engines()
    target = engines[0].target
    for prompt in prompts(256, [1, 4, 7], seed=2):
        expected = target.generate(prompt, do_sample=False, max_new_tokens=10, **options)
        assert not torch.equal(expected, target.generate(prompt, do_sample=False, max_new_tokens=10))
        for engine in engines:
            assert torch.equal(engine.generate(prompt, max_new_tokens=10, **options).sequences, expected)
        assert torch.equal(engines[0].hf_generate(prompt, max_new_tokens=10, **options).sequences, expected)


def test_order_prefix_rule_before_forced_eos_and_processors_before_warpers():
    """``generate`` applies ``prefix_allowed_tokens_fn`` before the forced EOS (which then overrides a constraint
    that never allows the EOS), and the caller's processors after its own processors and before the warpers (a
    processor that sees -inf from a suppressed token keeps it; one that adds to every logit is undone by nothing)."""
    engine = _engines()[0]
    target = engine.target
    prompt = prompts(256, [3], seed=8)[0]
    never_eos = dict(prefix_allowed_tokens_fn=lambda batch_id, sequence: list(range(200)))  # EOS 200: never
    options = dict(max_new_tokens=5, forced_eos_token_id=200, eos_token_id=200, pad_token_id=0, **never_eos)
    expected = target.generate(prompt, do_sample=False, **options)
    assert int(expected[0, -1]) == 200
    assert torch.equal(engine.generate(prompt, **options).sequences, expected)

    seen = []

    def record(input_ids, scores):
        seen.append(bool(torch.isinf(scores[:, 5]).all()))
        return scores

    target.generation_config.suppress_tokens = [5]
    try:
        engine.generate(prompt, max_new_tokens=4, logits_processor=[record])
    finally:
        target.generation_config.suppress_tokens = None
    assert seen and all(seen)


def test_batch_rows_pass_their_input_index():
    """In a left-padded batch, each sequence decodes as alone, and ``prefix_allowed_tokens_fn`` gets the row's
    index in the input batch (the constraint here depends on it), also after an earlier row finished (EOS) and
    left the batch."""
    engine = _engines()[0]
    rows = prompts(256, [2, 6, 4, 3], seed=5)
    ids, mask = left_padded(rows)
    options = dict(max_new_tokens=9, eos_token_id=EOS, pad_token_id=0)
    out = engine.generate(ids, attention_mask=mask, prefix_allowed_tokens_fn=allowed_after,
                          logits_processor=[ParityBump()], **options).sequences
    lengths = []
    for index, row in enumerate(rows):
        alone = engine.target.generate(row, do_sample=False, logits_processor=[ParityBump()],
                                       prefix_allowed_tokens_fn=lambda _, sequence, b=index: allowed_after(b, sequence),
                                       **options)[0, row.shape[1]:]
        lengths.append(alone.shape[0])
        assert torch.equal(out[index, ids.shape[1]: ids.shape[1] + alone.shape[0]], alone), index
    assert lengths[0] < max(lengths[1:])  # the first row left the batch before others


def test_sampling_is_lossless_chi_square():
    """The first three sampled tokens follow ``generate``'s distribution with the processor and the prefix rule
    (exact, by enumeration), and the engine's draws are rejected against the unconstrained distribution."""
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="torch", **DYNAMIC_TREE)
    prompt = prompts(256, [2], seed=36)[0]
    processors = LogitsProcessorList([ParityBump()])

    def process(logits, held, step):
        ids = torch.tensor([held], device=DEVICE)
        allowed = torch.full_like(logits, -float("inf"))
        allowed[allowed_after(0, ids[0])] = 0.0
        return processors(ids, (logits.to(DEVICE) + allowed.to(DEVICE))[None])[0].cpu()

    expected = _sequence_distribution(target, prompt, 3, 1.5, 4, process)
    options = dict(logits_processor=processors, prefix_allowed_tokens_fn=allowed_after)
    assert _sequence_sampling_pvalue(engine, prompt, expected, 300, 1.5, 4, 0, **options) > 1e-3
    unconstrained = _sequence_distribution(target, prompt, 3, 1.5, 4, lambda logits, held, step: logits)
    assert _sequence_sampling_pvalue(engine, prompt, unconstrained, 150, 1.5, 4, 1, **options) < 1e-3


def test_triton_path():
    target, draft = models("llama")
    engine = SpeculativeDecoder(target, draft, impl="triton", **DYNAMIC_TREE)
    prompt = prompts(256, [5], seed=21)[0]
    options = dict(logits_processor=[ParityBump()], prefix_allowed_tokens_fn=allowed_after)
    expected = target.generate(prompt, do_sample=False, max_new_tokens=6, **options)
    assert torch.equal(engine.generate(prompt, max_new_tokens=6, **options).sequences, expected)


@pytest.mark.parametrize("options, error, match", [
    (dict(logits_processor="abc"), TypeError, "logits_processor must be a LogitsProcessorList"),
    (dict(logits_processor=[ParityBump(), 3]), TypeError, r"logits_processor\[1\] must be callable"),
    (dict(prefix_allowed_tokens_fn=[1, 2]), TypeError, "prefix_allowed_tokens_fn must be callable"),
])
def test_bad_arguments_are_refused_before_any_forward(options, error, match):
    engine = _engines()[0]
    calls = []
    handle = engine.target.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            engine.generate(prompts(256, [3], seed=1)[0], max_new_tokens=3, **options)
    finally:
        handle.remove()
    assert not calls


def test_unsatisfiable_prefix_constraint_names_the_row():
    engine = _engines()[0]
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn returned no token for batch_id 0"):
        engine.generate(prompts(256, [3], seed=1)[0], max_new_tokens=3,
                        prefix_allowed_tokens_fn=lambda batch_id, sequence: [])


@pytest.mark.parametrize("result, error, match", [
    (None, TypeError, r"logits_processor must return the scores \(a torch.Tensor of the shape it was given, "
                      r"\(1, 256\)\), got NoneType"),
    (3.0, TypeError, "logits_processor must return the scores .* got float"),
    ("narrow", ValueError, r"logits_processor must return scores of the shape it was given \(1, 256\), got \(1, 10\)"),
])
def test_a_processor_returning_no_scores_is_named(result, error, match):
    """A processor's result that is not scores of the shape it was given (None, a number, another shape) is named
    (it failed inside ``index_copy_``, naming no argument; an audit of bad inputs)."""
    engine = SpeculativeDecoder(*models("llama"), impl="torch", tree=[])  # the root alone: one node row per step
    processor = (lambda ids, scores: scores[:, :10]) if result == "narrow" else (lambda ids, scores: result)
    with pytest.raises(error, match=match):
        engine.generate(prompts(256, [3], seed=1)[0], max_new_tokens=3, logits_processor=[processor])


@pytest.mark.parametrize("allowed, error, match", [
    ([5, 300], ValueError, r"prefix_allowed_tokens_fn's result must be token ids in \[0, 256\) for batch_id 0, got "
                           r"values from 5 to 300"),  # an IndexError
    ([-1], ValueError, r"must be token ids in \[0, 256\) for batch_id 0, got values from -1 to -1"),  # token 255
    ([1.5, 2.0], TypeError, r"prefix_allowed_tokens_fn must return a list of token ids \(ints\), got torch.float32"),
])
def test_prefix_constraint_ids_outside_the_vocabulary_are_named(allowed, error, match):
    """Token ids that ``prefix_allowed_tokens_fn`` returns are checked against the vocabulary (one past it was an
    ``IndexError``, a negative one allowed the token that many from the end, a float its truncation; an audit of
    bad inputs). A bool mask of the vocabulary's size is taken as such."""
    engine = _engines()[0]
    with pytest.raises(error, match=match):
        engine.generate(prompts(256, [3], seed=1)[0], max_new_tokens=3,
                        prefix_allowed_tokens_fn=lambda batch_id, sequence: allowed)
    mask = torch.zeros(256, dtype=torch.bool)
    mask[[7, 9]] = True
    out = engine.generate(prompts(256, [3], seed=1)[0], max_new_tokens=3,
                          prefix_allowed_tokens_fn=lambda batch_id, sequence: mask).sequences
    assert set(out[0, 3:].tolist()) <= {7, 9}


def test_processor_of_a_builtin_class_is_refused_when_its_option_is_set():
    """transformers' generate uses a caller's processor in place of its own of the same class (at its own's
    position): the engine refuses that pairing by name (the option carries the value, applied at every node);
    the same class without the option is applied as any other processor (equal to generate), and a processor that
    changes the dtype is written back in fp32."""
    from transformers.generation import RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor

    engine = _engines()[0]
    target = engine.target
    prompt = prompts(256, [4], seed=11)[0]
    with pytest.raises(ValueError, match=r"logits_processor\[0\] is a RepetitionPenaltyLogitsProcessor.*"
                                         r"repetition_penalty"):
        engine.generate(prompt, max_new_tokens=3, repetition_penalty=5.0,
                        logits_processor=[RepetitionPenaltyLogitsProcessor(0.3)])
    target.generation_config.suppress_tokens = [5]
    try:
        with pytest.raises(ValueError, match="suppress_tokens"):
            engine.generate(prompt, max_new_tokens=3, logits_processor=[SuppressTokensLogitsProcessor([7])])
    finally:
        target.generation_config.suppress_tokens = None
    for processors in ([RepetitionPenaltyLogitsProcessor(0.3)], [lambda ids, scores: scores.double() * 1.5],
                       [lambda ids, scores: scores.to(torch.bfloat16)]):
        expected = target.generate(prompt, do_sample=False, max_new_tokens=8, logits_processor=processors)
        assert torch.equal(engine.generate(prompt, max_new_tokens=8, logits_processor=processors).sequences,
                           expected)


def test_hf_generate_copies_share_their_prompts_batch_id():
    """``num_return_sequences``: generate passes every copy of prompt ``i`` to ``prefix_allowed_tokens_fn`` as
    ``batch_id`` ``i``."""
    engine = _engines()[0]
    ids = torch.cat(prompts(256, [3, 3], seed=2))
    options = dict(do_sample=True, num_return_sequences=2, max_new_tokens=3, pad_token_id=0,
                   prefix_allowed_tokens_fn=lambda batch_id, sequence: [10 + batch_id])
    expected = engine.target.generate(ids, attention_mask=torch.ones_like(ids), **options)
    assert expected[:, 3:].tolist() == [[10] * 3, [10] * 3, [11] * 3, [11] * 3]
    assert torch.equal(engine.hf_generate(ids, **options).sequences, expected)
