"""distill_ops.integrations.hf under FSDP: the student (and the teacher) sharded by ``FullyShardedDataParallel``
(FSDP1, flat or original parameters) or ``fully_shard`` (FSDP2), two gloo ranks on the CPU, one sequence each.

Each rank computes ``trainer_loss`` on its sequence, backpropagates and takes an SGD step (lr 1) for two steps;
the whole-model weights after each step (gathered with ``get_model_state_dict``) must be one process's weights
after the same steps with the average of the two sequences' gradients, as DDP would give. Before FSDP support the
loss read the LM head weight outside the sharded forward (a flat shard or a ``DTensor``) and failed or trained on
the wrong weights. The same holds when the sharded model is then ``torch.compile``-d (accelerate's order). Under
FSDP's bf16 mixed-precision policy each rank's loss and gradient shards are compared with
those of the loss computed from the sharded models' own (bf16) logits."""

import datetime
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch built without distributed support", allow_module_level=True)

from tests.conftest import TOLERANCES, assert_close  # noqa: E402
from tests.test_integrations_hf import _batch, _destroy_group, _tiny_models  # noqa: E402

STEPS = 2
LOSS_KWARGS = dict(num_items_in_batch=15.0, divergence="reverse", ce_weight=0.5, impl="torch")


def _models(tied: bool):
    """The tiny student / teacher pair; ``tied``: a student whose LM head is its input embedding (Llama-3.2-1B,
    Qwen2.5-0.5B, Gemma: the usual small students), the same weights otherwise."""
    student, teacher = (model.cpu() for model in _tiny_models())
    if tied:
        student.config.tie_word_embeddings = True
        student.lm_head.weight = student.get_input_embeddings().weight
    return student, teacher


def _layer_classes(model):
    return {type(layer) for layer in model.get_decoder().layers}


def _shard(model, how: str, bf16: bool = False):
    """``model`` sharded over the process group: each decoder layer its own unit, the rest in the root.
    ``bf16``: the usual mixed-precision policy (bf16 parameters in forward and backward, fp32 gradient reduction and
    fp32 sharded master weights). ``how`` ending in ``+compile``: then ``torch.compile``-d, as accelerate does last
    for ``TrainingArguments(torch_compile=True)``."""
    if how.endswith("+compile"):
        return torch.compile(_shard(model, how.removesuffix("+compile"), bf16), backend="eager")
    if how == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from torch.distributed.device_mesh import init_device_mesh

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        # A CPU mesh named explicitly: fully_shard's default mesh is the accelerator's, so on a CUDA machine these
        # gloo ranks would move the student to cuda:0 while the batch and the teacher stay on the CPU.
        kwargs = {"mesh": init_device_mesh("cpu", (dist.get_world_size(),))}
        if bf16:
            kwargs["mp_policy"] = policy
        for layer in model.get_decoder().layers:
            fully_shard(layer, **kwargs)
        return fully_shard(model, **kwargs)
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_layer_classes(model))
    precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                    use_orig_params=how == "fsdp1", mixed_precision=precision)


def _full_weights(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _fsdp_rank(rank: int, world: int, rendezvous: str, out_dir: str, student_how: str, teacher_how,
               tied: bool) -> None:
    from distill_ops.integrations.hf import trainer_loss

    torch.set_num_threads(1)
    # A rank that fails makes the other wait in a collective: a minute, not gloo's default half hour.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        student, teacher = _models(tied)
        inputs = dict(zip(("input_ids", "attention_mask", "labels"), (t.cpu()[rank:rank + 1] for t in _batch())))
        student = _shard(student, student_how)
        if teacher_how is not None:
            teacher = _shard(teacher.requires_grad_(False), teacher_how)
        optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
        record = {"losses": [], "weights": []}
        for _ in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = trainer_loss(student, teacher, inputs, **LOSS_KWARGS)
            loss.backward()
            optimizer.step()
            record["losses"].append(loss.detach())
            record["weights"].append(_full_weights(student))
        if teacher_how == "fsdp2":  # the frozen teacher is resharded after each use
            record["teacher_head_is_shard"] = type(teacher.lm_head.weight).__name__ == "DTensor"
        torch.save(record, f"{out_dir}/rank{rank}.pt")
    finally:
        student = teacher = optimizer = None  # the sharded models go while their group is alive
        _destroy_group()


@pytest.mark.parametrize(
    "student_how, teacher_how, tied",
    [("fsdp1", None, False), ("fsdp1-flat", "fsdp1-flat", False), ("fsdp2", "fsdp2", False), ("fsdp2", None, False),
     ("fsdp1", None, True), ("fsdp2", "fsdp2", True), ("fsdp1+compile", None, False),
     ("fsdp2+compile", "fsdp2+compile", False)],
)
def test_sharded_student_trains_like_one_process_with_the_averaged_gradient(tmp_path, student_how, teacher_how,
                                                                            tied):
    import torch.multiprocessing as mp

    from distill_ops.integrations.hf import trainer_loss

    mp.start_processes(_fsdp_rank, nprocs=2, start_method="spawn",
                       args=(2, str(tmp_path / "rendezvous"), str(tmp_path), student_how, teacher_how, tied))
    student, teacher = _models(tied)
    batch = [tensor.cpu() for tensor in _batch()]
    records = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for step in range(STEPS):
        grads = {name: torch.zeros_like(p) for name, p in student.named_parameters()}
        for row in range(2):
            inputs = dict(zip(("input_ids", "attention_mask", "labels"), (t[row:row + 1] for t in batch)))
            student.zero_grad(set_to_none=True)
            loss = trainer_loss(student, teacher, inputs, **LOSS_KWARGS)
            loss.backward()
            assert_close(records[row]["losses"][step], loss, torch.float32, msg=f"step {step} rank {row} loss")
            for name, p in student.named_parameters():
                grads[name] += p.grad / 2
        with torch.no_grad():
            for name, p in student.named_parameters():
                p -= grads[name]
        # Every name, tied ones included (a tied LM head is listed under both names and moved once).
        names = dict(student.named_parameters(remove_duplicate=False))
        assert ("lm_head.weight" in dict(student.named_parameters())) != tied
        for rank, record in enumerate(records):
            weights = record["weights"][step]
            assert set(weights) == set(names)
            for name, p in names.items():
                assert p.grad.abs().max() > 0, name  # every weight moves: the check can fail
                assert_close(weights[name], p, torch.float32, msg=f"step {step} rank {rank} {name}")
    if teacher_how == "fsdp2":
        assert all(record["teacher_head_is_shard"] for record in records)


def _local_grads(model) -> dict:
    """This rank's shard of each gradient (a ``DTensor``'s local part under FSDP2), in fp32."""
    return {name: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).detach().float().clone()
            for name, p in model.named_parameters() if p.grad is not None}


def _mixed_precision_rank(rank: int, world: int, rendezvous: str, out_dir: str, how: str,
                          shard_teacher: bool) -> None:
    from distill_ops import kl_div
    from distill_ops.integrations.hf import trainer_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        student, teacher = _models(tied=False)
        input_ids, attention_mask, labels = (t.cpu()[rank:rank + 1] for t in _batch())
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        student = _shard(student, how, bf16=True)
        if shard_teacher:
            teacher = _shard(teacher.requires_grad_(False), how, bf16=True)
        record = {}
        loss = trainer_loss(student, teacher, inputs, **LOSS_KWARGS)
        loss.backward()
        record["fused"] = (loss.detach(), _local_grads(student))
        student.zero_grad(set_to_none=True)

        # The same loss from the logits the sharded student itself returns (bf16 under the policy), upcast to fp32
        # as Hugging Face's own loss does.
        logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        record["logits_dtype"] = logits.dtype
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        student_logits, targets = logits[:, :-1].float(), labels[:, 1:]
        kwargs = {key: value for key, value in LOSS_KWARGS.items() if key not in ("num_items_in_batch", "ce_weight")}
        divergence = kl_div(student_logits, teacher_logits[:, :-1], labels=targets, reduction="sum", **kwargs)
        ce = torch.nn.functional.cross_entropy(student_logits.flatten(0, 1), targets.flatten(), reduction="sum")
        expected = (divergence + LOSS_KWARGS["ce_weight"] * ce) / LOSS_KWARGS["num_items_in_batch"]
        expected.backward()
        record["logits"] = (expected.detach(), _local_grads(student))
        torch.save(record, f"{out_dir}/rank{rank}.pt")
    finally:
        student = teacher = None  # the sharded models go while their group is alive
        _destroy_group()


@pytest.mark.parametrize("how, shard_teacher", [("fsdp1", False), ("fsdp1-flat", True), ("fsdp2", True)])
def test_bf16_mixed_precision_student_matches_the_loss_from_its_own_logits(tmp_path, how, shard_teacher):
    """FSDP's usual bf16 mixed-precision policy (on the student, and on a sharded teacher): the fused loss sees the
    bf16 hidden states and LM heads FSDP gathers for the forward, and gives the loss and (reduced, fp32) gradient
    shards that the loss computed from the models' own bf16 logits gives, to bf16 tolerance."""
    import torch.multiprocessing as mp

    mp.start_processes(_mixed_precision_rank, nprocs=2, start_method="spawn",
                       args=(2, str(tmp_path / "rendezvous"), str(tmp_path), how, shard_teacher))
    for rank in range(2):
        record = torch.load(tmp_path / f"rank{rank}.pt")
        assert record["logits_dtype"] == torch.bfloat16  # the policy is in force
        (loss, grads), (expected, expected_grads) = record["fused"], record["logits"]
        assert_close(loss, expected, torch.bfloat16, msg=f"rank {rank} loss")
        assert set(grads) == set(expected_grads) and grads
        assert sum(grad.abs().sum() for grad in expected_grads.values()) > 0
        for name, grad in grads.items():
            expected_grad = expected_grads[name]
            assert_close(grad, expected_grad, torch.bfloat16, msg=f"rank {rank} {name}")
            # The gradients are ~0.1 here, so the absolute tolerance alone says little: the error relative to the
            # whole tensor must be within the bf16 relative tolerance too (measured: about 1 %, both paths being
            # bf16 backward passes that round differently).
            relative = (grad - expected_grad).norm() / expected_grad.norm()
            assert relative <= TOLERANCES[torch.bfloat16]["rtol"], (rank, name, relative.item())


def test_deepspeed_zero3_partitioned_head_is_refused():
    """A ZeRO-3 partitioned LM head (DeepSpeed marks its parameters with ``ds_status``; an empty local tensor) is
    refused with an error naming ZeRO-3, before any forward."""
    from distill_ops.integrations.hf import causal_lm_distillation_loss

    student, teacher = _tiny_models()
    input_ids, attention_mask, labels = _batch()
    for partitioned in (student, teacher):
        weight = partitioned.lm_head.weight
        weight.ds_status, weight.ds_shape = "NOT_AVAILABLE", tuple(weight.shape)
        calls = []
        handle = partitioned.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            with pytest.raises(NotImplementedError, match="ZeRO-3"):
                causal_lm_distillation_loss(student, teacher, input_ids, labels, attention_mask, impl="torch")
        finally:
            handle.remove()
            del weight.ds_status, weight.ds_shape
        assert calls == []

