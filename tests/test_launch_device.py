"""Kernels launch on the device of their inputs, not on whichever device is current.

Triton launches on the current CUDA device and its stream. With a model split over GPUs
(``device_map="auto"``) the tensors reaching a layer's op sit on another GPU than the current one; the
launch must follow the tensors (peer bug: Liger-Kernel issues 593 and 1303). ``kernels/_device.py`` wraps
every launcher; ``tests/conftest.py`` checks every launch of the whole suite against the device the
launcher chose. The tests here show that check bites, and, on a machine with two GPUs, run each op with its
inputs on ``cuda:1`` while ``cuda:0`` is current.
"""

import os
import subprocess
import sys

import pytest
import torch

import distill_ops
from distill_ops.kernels import _device
from distill_ops.kernels.scale_rows import scale_rows_
from tests.conftest import DEVICE, LAUNCHES_CHECKED, assert_close


def test_every_launch_is_checked():
    before = LAUNCHES_CHECKED[0]
    grad = torch.ones(3, 5, device=DEVICE)
    scale_rows_(grad, torch.full((3,), 2.0, device=DEVICE))
    assert LAUNCHES_CHECKED[0] > before
    assert torch.equal(grad, torch.full((3, 5), 2.0, device=DEVICE))


def test_unwrapped_launcher_fails_the_check():
    # The same launcher without its wrapper launches with no device chosen: the suite-wide check refuses it.
    grad = torch.ones(3, 5, device=DEVICE)
    with pytest.raises(AssertionError, match="_scale_rows_kernel launched with tensors on"):
        scale_rows_.__wrapped__(grad, torch.full((3,), 2.0, device=DEVICE))


def test_launch_without_the_explicit_options_fails_the_check():
    # A launch inside the launcher's device choice but without LAUNCH_OPTIONS (FP contraction left to the installed
    # Triton's default, which 3.10 turns off): the suite-wide check refuses it before the kernel runs.
    from distill_ops.kernels._launch import LAUNCH_OPTIONS
    from distill_ops.kernels.scale_rows import BLOCK_V, NUM_WARPS, _scale_rows_kernel

    assert set(LAUNCH_OPTIONS) == {"enable_fp_fusion"}
    grad, upstream = torch.ones(3, 5, device=DEVICE), torch.full((3,), 2.0, device=DEVICE)

    @_device.on_input_device
    def launch(grad, upstream, **options):
        _scale_rows_kernel[(3,)](grad, upstream, grad.stride(0), upstream.stride(0), 5, BLOCK_V=BLOCK_V,
                                 num_warps=NUM_WARPS, **options)

    with pytest.raises(AssertionError, match=r"_scale_rows_kernel launched without \{'enable_fp_fusion': "):
        launch(grad, upstream)
    with pytest.raises(AssertionError, match="launched without"):
        launch(grad, upstream, enable_fp_fusion=not LAUNCH_OPTIONS["enable_fp_fusion"])
    assert torch.equal(grad, torch.ones(3, 5, device=DEVICE))
    launch(grad, upstream, **LAUNCH_OPTIONS)
    assert torch.equal(grad, torch.full((3, 5), 2.0, device=DEVICE))


def test_fp_fusion_follows_the_users_triton_setting():
    from distill_ops.kernels._launch import _fp_fusion

    assert _fp_fusion(None) is True  # unset: on, Triton <= 3.9's default, whatever 3.10 defaults to
    assert [_fp_fusion(value) for value in ("0", "false", "off", "1", "True", " on ")] == [False] * 3 + [True] * 3
    # Read from the environment when the kernels are imported (fresh interpreters).
    probe = "from distill_ops.kernels._launch import LAUNCH_OPTIONS; print(LAUNCH_OPTIONS['enable_fp_fusion'])"
    seen = []
    for setting in (None, "0", "1"):
        env = {key: value for key, value in os.environ.items() if key != "TRITON_DEFAULT_FP_FUSION"}
        if setting is not None:
            env["TRITON_DEFAULT_FP_FUSION"] = setting
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        seen.append(out.stdout.strip())
    assert seen == ["True", "False", "True"]


def test_launcher_restores_the_device_it_found():
    assert _device.launch_device() is None
    seen = []

    @_device.on_input_device
    def inner(x):
        seen.append(_device.launch_device())

    @_device.on_input_device
    def outer(layers, x):
        inner(x)
        seen.append(_device.launch_device())

    meta = torch.empty(2, device="meta")
    outer([meta, meta], torch.empty(2))  # the first tensor, looked for one level into lists
    assert seen == [torch.device("cpu"), torch.device("meta")]
    assert _device.launch_device() is None


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (cuda:1 is not current)")


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@two_gpus
@pytest.mark.parametrize("op", ["kl_div", "aligndistil", "topk_kl_div", "fused_linear_kl_div"])
def test_losses_on_a_device_that_is_not_current(op):
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 37, generator=gen, dtype=torch.float64)
    teacher = torch.randn(6, 37, generator=gen, dtype=torch.float64)
    hidden, weight = torch.randn(6, 16, generator=gen), torch.randn(37, 16, generator=gen)

    def run(device, impl):
        s = student.to(device, torch.float32).requires_grad_()
        t = teacher.to(device, torch.float32)
        if op == "kl_div":
            loss, leaf = distill_ops.kl_div(s, t, impl=impl), s
        elif op == "aligndistil":
            loss, leaf = distill_ops.aligndistil_kl(s, t, t * 0.5, impl=impl), s
        elif op == "topk_kl_div":
            loss, leaf = distill_ops.topk_kl_div(s, t, k=5, impl=impl), s
        else:
            h = hidden.to(device).requires_grad_()
            loss, leaf = distill_ops.fused_linear_kl_div(h, weight.to(device), teacher_logits=t, impl=impl), h
        loss.backward()
        return loss.detach().cpu(), leaf.grad.cpu()

    loss_1, grad_1 = run(torch.device("cuda", 1), "triton")
    assert torch.cuda.current_device() == 0
    loss_ref, grad_ref = run(torch.device("cpu"), "torch")
    assert_close(loss_1, loss_ref, torch.float32)
    assert_close(grad_1, grad_ref, torch.float32)


@two_gpus
def test_tree_ops_on_a_device_that_is_not_current():
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(1)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]])
    tokens = torch.randint(0, 50, (1, 6), generator=gen)
    logits = torch.randn(1, 6, 50, generator=gen)
    q = torch.randn(1, 4, 6, 32, generator=gen)
    k, v = torch.randn(1, 2, 20, 32, generator=gen), torch.randn(1, 2, 20, 32, generator=gen)
    cache_lens = torch.tensor([9])

    def run(device, impl):
        tree = distill_ops.tree_spec_from_parents_tensor(parents.to(device), 2, 2, impl=impl)
        out = distill_ops.tree_attention(*_on(device, q, k, v), tree, cache_lens.to(device), impl=impl)
        greedy = distill_ops.verify_greedy(tree, tokens.to(device), logits.to(device), impl=impl)
        uniforms_from = torch.Generator(device).manual_seed(3)
        sampled = distill_ops.verify_sampling(tree, tokens.to(device), logits.to(device), temperature=0.7,
                                              generator=uniforms_from, impl=impl)
        kc, vc = _on(device, k, v)
        lens = distill_ops.compact_kv_cache(kc, vc, cache_lens.to(device), greedy, impl=impl)
        return dict(attention=out, emitted=greedy.emitted_tokens, sampled=sampled.emitted_tokens, k=kc, v=vc,
                    lens=lens)

    on_1 = {name: t.cpu() for name, t in run(torch.device("cuda", 1), "triton").items()}
    assert torch.cuda.current_device() == 0
    on_0 = {name: t.cpu() for name, t in run(torch.device("cuda", 0), "triton").items()}
    reference = {name: t.cpu() for name, t in run(torch.device("cpu"), "torch").items()}
    for name in on_1:
        assert torch.equal(on_1[name], on_0[name]), name
        if name == "sampled":  # CUDA and CPU generators draw different numbers
            continue
        if on_1[name].is_floating_point():
            assert_close(on_1[name], reference[name], torch.float32, msg=name)
        else:
            assert torch.equal(on_1[name], reference[name]), name


@two_gpus
def test_engine_on_a_device_that_is_not_current():
    from distill_ops.speculative import SpeculativeDecoder
    from tests.test_speculative import make_models, reference_generate

    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    target, draft = (model.to(device) for model in make_models())
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2)).to(device)
    engine = SpeculativeDecoder(target, draft, depth=3, topk=2, num_nodes=8, profile=True)
    out = engine.generate(prompt, max_new_tokens=12)
    assert torch.cuda.current_device() == 0
    assert torch.equal(out.sequences, reference_generate(target, prompt, 12))


def test_engine_refuses_a_model_split_over_devices():
    from distill_ops.speculative import SpeculativeDecoder
    from tests.test_speculative import make_models

    target, draft = make_models()
    target.lm_head.to("meta")  # as device_map="auto" would put the head on another device
    split = r"target must sit on one device, got parameters and buffers on \[.*'meta'\] \(a model split with device_map"
    with pytest.raises(ValueError, match=split):
        SpeculativeDecoder(target, draft)
    target, draft = make_models()
    draft.model.layers[0].to("meta")
    with pytest.raises(ValueError, match=r"draft must sit on one device"):
        SpeculativeDecoder(target, draft)


def test_launchers_refuse_shapes_that_would_read_or_write_out_of_bounds():
    """The raw launchers of ``distill_ops.kernels`` trust their callers (the ops check first), but three mistakes
    read or wrote out of bounds silently (an error-message audit): a short ``upstream`` in ``scale_rows_`` read past
    its end and wrote garbage into ``grad``; ``topk_select`` with ``count`` > V returned uninitialised memory as
    indices; ``kl_div_forward`` with fewer teacher rows read rows that do not exist. Each is now a ValueError, with
    ``grad`` untouched."""
    from distill_ops.kernels.kl_div import kl_div_forward
    from distill_ops.kernels.topk_select import topk_select

    grad = torch.ones(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"upstream must have shape \[3\] \(grad's rows\), got \(1,\)"):
        scale_rows_(grad, torch.full((1,), 2.0, device=DEVICE))
    assert torch.equal(grad, torch.ones_like(grad))
    rows = torch.randn(3, 16, device=DEVICE)
    for count in (0, 17):
        with pytest.raises(ValueError, match=rf"count must be in \[1, 16\] \(the row width\), got {count}"):
            topk_select(rows, count)
    options = dict(coef=0.0, temperature=1.0, ignore_index=-100)
    with pytest.raises(ValueError, match=r"teacher \(and grad_out\) must have student's shape \(3, 16\), got "
                                         r"\(1, 16\)"):
        kl_div_forward(rows, rows[:1], None, None, torch.ones(1, device=DEVICE), divergence="forward", **options)
    with pytest.raises(ValueError, match="divergence must be one of .* got 'kl'"):  # a bare KeyError before
        kl_div_forward(rows, rows, None, None, torch.ones(1, device=DEVICE), divergence="kl", **options)
