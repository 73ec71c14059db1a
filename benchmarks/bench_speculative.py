"""Benchmarks of the speculative-decoding engine (``distill_ops.SpeculativeDecoder``) against ``generate``.

One timed pass = decoding ``new_tokens`` tokens greedily after a random prompt (``forward_only`` cases:
there is no backward). Impls:

* ``generate``: ``target.generate(do_sample=False)``, the vanilla baseline.
* ``engine_tree``: our engine with a dynamic EAGLE-2 tree (depth 5, topk 4, 32 nodes: T = 32).
* ``engine_chain``: our engine with a chain of 5 drafts (classic speculative decoding).

A second case decodes a batch of ``BATCH`` prompts of different lengths (left padded, with their attention
mask) with each impl: ``generate`` on the padded batch, the engine on the same batch (each sequence keeps
its own length; see ``distill_ops.speculative._Generation``). Its tokens/s counts every sequence's tokens.

The pair is synthetic (random weights): a Llama target whose layers after the first ``draft_layers`` are
damped, and a draft LM made of the target's first layers (shared embedding, norm, LM head), so that the
draft agrees with the target often, as a trained draft would. GPU: a Llama-3.2-1B-shaped target (hidden
2048, 16 layers, 32/8 heads, MLP 8192, vocabulary 128256) with a 2-layer draft, bf16. CPU: a tiny pair.

Besides time (tokens/s = new_tokens / pass time), each engine impl is run once more at setup with
``profile=True`` (CUDA synchronised at phase boundaries) to record target forwards per generated token,
accepted drafts per step and the time split per step; the summary reports them and checks the engine
overhead target (tree building + verification + compaction < 10 % of the target forward at T = 32).
At these sizes that overhead is host time (op and kernel launches): ``python -m benchmarks.engine_overhead``
counts the ops, launches, host-device copies and synchronisations of each phase per step.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks.harness import Case
from distill_ops.speculative import SpeculativeDecoder

OP = "speculative_decode"
TREE = dict(depth=5, topk=4, num_nodes=32)
CHAIN = dict(tree=[[0] * d for d in range(1, 6)])
GPU_SHAPE = dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, draft_layers=2)
CPU_SHAPE = dict(vocab=512, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, draft_layers=1)
DAMPING = 0.3
PROMPT_LEN = 64
BATCH = 4  # the batched case: prompts of PROMPT_LEN, PROMPT_LEN - 8, ... tokens
NOTES = (
    "Greedy decoding of new_tokens tokens per pass; tokens/s = new_tokens / pass time. Synthetic pair: random "
    f"Llama target with the layers after the draft's damped ×{DAMPING}, draft = the target's first layers "
    "(see the module docstring). engine_tree: dynamic EAGLE-2 tree (depth 5, topk 4, 32 nodes); engine_chain: 5 "
    "drafts in a chain. CPU: one intra-op thread (the tiny models are per-op-overhead bound)."
)

# (case label, impl) -> statistics of one profiled engine run, filled at setup; read by summarize_results.
_STATS: dict[tuple[str, str], dict] = {}
_MODELS: dict[tuple, tuple] = {}


def release() -> None:
    """Drop the cached model pair (the harness calls this once the module's cases are done)."""
    _MODELS.clear()


def build_pair(shape: dict, device: str, dtype: torch.dtype):
    """The synthetic target / draft pair (cached: every impl of a case shares it)."""
    key = (tuple(sorted(shape.items())), device, dtype)
    if key in _MODELS:
        return _MODELS[key]
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(layers: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            initializer_range=0.02 if shape["hidden"] >= 512 else 0.3, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )

    torch.manual_seed(0)
    with torch.device(device):
        target = LlamaForCausalLM(config(shape["layers"])).to(dtype).eval()
        draft = LlamaForCausalLM(config(shape["draft_layers"])).to(dtype).eval()
    with torch.no_grad():
        if shape["hidden"] >= 512:
            # Random large models have near-uniform logits; a larger LM head makes them peaked.
            target.lm_head.weight.normal_(0.0, 4.0 / shape["hidden"] ** 0.5)
        for layer in target.model.layers[shape["draft_layers"]:]:
            layer.self_attn.o_proj.weight.mul_(DAMPING)
            layer.mlp.down_proj.weight.mul_(DAMPING)
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    for index in range(shape["draft_layers"]):
        draft.model.layers[index].load_state_dict(target.model.layers[index].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.lm_head.load_state_dict(target.lm_head.state_dict())
    _MODELS.clear()  # one pair alive at a time
    _MODELS[key] = (target, draft)
    return target, draft


def _one_thread_on_cpu(device: str, fn: Callable[[], object]) -> Callable[[], object]:
    """On CPU the tiny models are per-op-overhead bound: extra intra-op threads only add contention."""
    if device == "cuda":
        return fn

    def run():
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(previous)

    return run


def _prompt(vocab: int, device: str, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts and their attention mask: ``PROMPT_LEN - 8 b`` tokens in row ``b``, left padded."""
    prompt = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(prompt)
    for row in range(batch):
        mask[row, : 8 * row] = 0
    return prompt, mask


def _setup_generate(
    shape: dict, device: str, dtype: torch.dtype, new_tokens: int, batch: int = 1
) -> Callable[[], Callable[[], object]]:
    def setup() -> Callable[[], object]:
        target, _ = build_pair(shape, device, dtype)
        prompt, mask = _prompt(shape["vocab"], device, batch)

        def run():
            with torch.inference_mode():
                return target.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)

        return _one_thread_on_cpu(device, run)

    return setup


def _setup_engine(label: str, impl: str, shape: dict, device: str, dtype: torch.dtype, new_tokens: int,
                  tree: dict, batch: int = 1) -> Callable[[], Callable[[], object]]:
    def setup() -> Callable[[], object]:
        target, draft = build_pair(shape, device, dtype)
        prompt, mask = _prompt(shape["vocab"], device, batch)
        kwargs = dict(attention_mask=mask, eos_token_id=[])
        profiled = SpeculativeDecoder(target, draft, profile=True, **tree)
        _one_thread_on_cpu(device, lambda: profiled.generate(prompt, max_new_tokens=8, **kwargs))()  # warm-up
        out = _one_thread_on_cpu(device, lambda: profiled.generate(prompt, max_new_tokens=new_tokens, **kwargs))()
        steps = max(out.num_target_forwards - 1, 1)  # verification steps (a batch shares them)
        _STATS[(label, impl)] = {
            # per token of one sequence (a batch's sequences share each forward)
            "target_forwards_per_token": out.num_target_forwards / out.num_new_tokens,
            "accepted_per_step": sum(out.accept_lengths) / max(len(out.accept_lengths), 1),
            "per_step_ms": {phase: 1e3 * seconds / steps for phase, seconds in out.timings.items()
                            if phase not in ("total", "prefill")},
        }
        engine = SpeculativeDecoder(target, draft, **tree)
        return _one_thread_on_cpu(device, lambda: engine.generate(prompt, max_new_tokens=new_tokens, **kwargs))

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shape, dtype, new_tokens = GPU_SHAPE, torch.bfloat16, 64 if quick else 128
    else:
        shape, dtype, new_tokens = CPU_SHAPE, torch.float32, 16 if quick else 32
    params = dict(target=f"{shape['layers']}L-{shape['hidden']}", draft_layers=shape["draft_layers"],
                  vocab=shape["vocab"], dtype=str(dtype).replace("torch.", ""), prompt=PROMPT_LEN,
                  new_tokens=new_tokens)
    # Whole generate calls, each impl several times, and the first call compiles the engine's kernels: a double
    # share of a budgeted run (the H200 run of 2026-11-28 gave it an even share and the engine timed out).
    case = Case(op=OP, params=params, impls={}, forward_only=True, notes=NOTES, budget_weight=2.0)
    label = case.label()
    case.impls["generate"] = _setup_generate(shape, device, dtype, new_tokens)
    case.impls["engine_tree"] = _setup_engine(label, "engine_tree", shape, device, dtype, new_tokens, TREE)
    case.impls["engine_chain"] = _setup_engine(label, "engine_chain", shape, device, dtype, new_tokens, CHAIN)
    batched = Case(op=OP, params={**params, "batch": BATCH}, impls={}, forward_only=True, notes=NOTES,
                   budget_weight=2.0)
    label = batched.label()
    batched.impls["generate"] = _setup_generate(shape, device, dtype, new_tokens, BATCH)
    for impl, tree in (("engine_tree", TREE), ("engine_chain", CHAIN)):
        batched.impls[impl] = _setup_engine(label, impl, shape, device, dtype, new_tokens, tree, BATCH)
    return [case, batched]


def summarize_results(results: list[dict], meta: dict) -> str:
    """Tokens/s, target forwards per token, accepted drafts per step, the time split and the overhead target."""
    lines = []
    for result in [r for r in results if r["op"] == OP and r["impl"] == "generate"]:
        label = f"{OP} " + " ".join(f"{k}={v}" for k, v in result["params"].items())
        new_tokens = result["params"]["new_tokens"] * result["params"].get("batch", 1)  # every sequence's
        base_ms = result["forward_ms"]
        lines += [f"**{label}** ({meta.get('device_name', meta['device'])})", "",
                  "| impl | tokens/s | speedup | target forwards / token | accepted / step | "
                  "per step ms: draft (tree) / target / verify / compaction | overhead / target forward |",
                  "|---|---|---|---|---|---|---|"]
        for impl in ("generate", "engine_tree", "engine_chain"):
            row = next((r for r in results if r["op"] == OP and r["impl"] == impl and r["params"] == result["params"]),
                       None)
            if row is None or row["forward_ms"] is None:
                lines.append(f"| {impl} | {row['skipped'] if row else 'not run'} | | | | | |")
                continue
            rate = new_tokens / (row["forward_ms"] * 1e-3)
            speedup = f"{base_ms / row['forward_ms']:.2f}×" if base_ms else "-"
            stats = _STATS.get((label, impl))
            if stats is None:
                lines.append(f"| {impl} | {rate:.1f} | {speedup} | {1.0 if impl == 'generate' else '-'} | | | |")
                continue
            step = stats["per_step_ms"]
            overhead = step.get("tree", 0.0) + step.get("verify", 0.0) + step.get("compaction", 0.0)
            ratio = overhead / step["target"] if step.get("target") else None
            lines.append(
                f"| {impl} | {rate:.1f} | {speedup} | {stats['target_forwards_per_token']:.3f} | "
                f"{stats['accepted_per_step']:.2f} | {step.get('draft', 0):.2f} ({step.get('tree', 0):.2f}) / "
                f"{step.get('target', 0):.2f} / {step.get('verify', 0):.2f} / {step.get('compaction', 0):.2f} | "
                f"{'-' if ratio is None else f'{100 * ratio:.1f} %'} |"
            )
        tree_stats = _STATS.get((label, "engine_tree"))
        if meta["device"] == "cuda":
            step = tree_stats["per_step_ms"] if tree_stats else {}
            overhead = step.get("tree", 0) + step.get("verify", 0) + step.get("compaction", 0)
            measured = (f"{100 * overhead / step['target']:.1f} % "
                        f"({'met' if overhead < 0.10 * step['target'] else '**missed**'})"
                        if step.get("target") else "not measured")
            lines += ["", f"- target: engine overhead (tree building + verification + compaction) < 10 % of the "
                          f"target forward at T = 32: {measured}"]
        lines.append("")
    return "\n".join(lines)
