"""Speculative decoding with ``distill_ops.SpeculativeDecoder``: greedy and sampled, against ``generate``.

    python examples/speculative_decode.py                          # tiny random pair, CPU, seconds
    python examples/speculative_decode.py --device cuda --dtype bfloat16 --hidden-size 2048 \\
        --num-layers 16 --vocab-size 128256 --max-new-tokens 256   # a Llama-1B-shaped random pair
    python examples/speculative_decode.py --target PATH --draft PATH   # local transformers checkpoints

Without checkpoints the script builds a *synthetic* pair: a random target whose layers after the first
``--draft-layers`` are damped, and a draft LM made of the target's first layers (shared embedding, norm and
LM head), so that the draft agrees with the target often, as a trained draft would. It decodes a few
prompts greedily (checking that the output equals ``target.generate(do_sample=False)``) and by sampling,
and prints tokens/s, target forwards per generated token and the engine's time split. Then it decodes the
prompts again as one batch of different lengths (left padded, with an attention mask), checking that each
sequence equals its own greedy run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distill_ops.speculative import SpeculativeDecoder


def build_pair(vocab_size: int, hidden_size: int, num_layers: int, draft_layers: int, damping: float,
               device: str, dtype: torch.dtype, seed: int = 0):
    """A random Llama target and a draft LM made of its first ``draft_layers`` layers (see the module doc)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(layers: int) -> LlamaConfig:
        heads = max(4, hidden_size // 64)
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
            initializer_range=0.02 if hidden_size >= 512 else 0.3, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )

    torch.manual_seed(seed)
    with torch.device(device):
        target = LlamaForCausalLM(config(num_layers)).to(dtype).eval()
        draft = LlamaForCausalLM(config(draft_layers)).to(dtype).eval()
    with torch.no_grad():
        if hidden_size >= 512:
            # Random large models have near-uniform logits; a larger LM head makes them peaked.
            target.lm_head.weight.normal_(0.0, 4.0 / hidden_size**0.5)
        for layer in target.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(damping)
            layer.mlp.down_proj.weight.mul_(damping)
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    for index in range(draft_layers):
        draft.model.layers[index].load_state_dict(target.model.layers[index].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.lm_head.load_state_dict(target.lm_head.state_dict())
    return target, draft


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="local transformers checkpoint of the target")
    parser.add_argument("--draft", default=None, help="local checkpoint of a smaller draft LM (same vocabulary)")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--damping", type=float, default=0.3, help="scale of the damped target layers' updates")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=32)
    parser.add_argument("--chain", action="store_true", help="a chain of --depth drafts instead of a tree")
    parser.add_argument("--temperature", type=float, default=0.8, help="for the sampled run")
    parser.add_argument("--top-p", type=float, default=0.95, help="for the sampled run")
    parser.add_argument("--impl", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    if args.target is not None:
        from transformers import AutoModelForCausalLM

        if args.draft is None:
            parser.error("--target needs --draft")
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
        draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(args.device).eval()
    else:
        target, draft = build_pair(args.vocab_size, args.hidden_size, args.num_layers, args.draft_layers,
                                   args.damping, args.device, dtype, args.seed)
    vocab = target.get_output_embeddings().weight.shape[0]
    tree = dict(tree=[[0] * (d + 1) for d in range(args.depth)]) if args.chain else dict(
        depth=args.depth, topk=args.topk, num_nodes=args.num_nodes)
    engine = SpeculativeDecoder(target, draft, impl=args.impl, **tree)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, vocab, (1, args.prompt_len), generator=generator).to(args.device)
               for _ in range(args.prompts)]

    # Warm-up (kernel compilation, allocator) outside the timed runs.
    engine.generate(prompts[0], max_new_tokens=4, eos_token_id=[])
    target.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), do_sample=False, max_new_tokens=4,
                    pad_token_id=0)

    report = {"device": args.device, "dtype": args.dtype, "tree": tree, "greedy_identical": True}
    totals = {"generate_s": 0.0, "engine_s": 0.0, "tokens": 0, "forwards": 0, "steps": 0, "accepted": 0}
    split: dict[str, float] = {}
    for prompt in prompts:
        synchronize(args.device)
        start = time.perf_counter()
        reference = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=None, pad_token_id=0)
        synchronize(args.device)
        totals["generate_s"] += time.perf_counter() - start
        start = time.perf_counter()
        out = engine.generate(prompt, max_new_tokens=args.max_new_tokens, eos_token_id=[])
        synchronize(args.device)
        totals["engine_s"] += time.perf_counter() - start
        report["greedy_identical"] &= torch.equal(out.sequences, reference)
        totals["tokens"] += out.num_new_tokens
        totals["forwards"] += out.num_target_forwards
        totals["steps"] += len(out.accept_lengths)
        totals["accepted"] += sum(out.accept_lengths)
        for phase, seconds in out.timings.items():
            split[phase] = split.get(phase, 0.0) + seconds
    report["generate_tokens_per_s"] = totals["tokens"] / totals["generate_s"]
    report["engine_tokens_per_s"] = totals["tokens"] / totals["engine_s"]
    report["speedup"] = report["engine_tokens_per_s"] / report["generate_tokens_per_s"]
    report["target_forwards_per_token"] = totals["forwards"] / totals["tokens"]
    report["mean_accepted_per_step"] = totals["accepted"] / max(totals["steps"], 1)
    report["time_split_s"] = split

    # One batch of the prompts cut to different lengths, left padded as a tokenizer pads for generation.
    rows = [prompt[:, : max(1, args.prompt_len - 3 * index)] for index, prompt in enumerate(prompts)]
    batch = torch.zeros(len(rows), args.prompt_len, dtype=torch.int64, device=args.device)
    mask = torch.zeros_like(batch)
    for index, row in enumerate(rows):
        batch[index, args.prompt_len - row.shape[1]:] = row[0]
        mask[index, args.prompt_len - row.shape[1]:] = 1
    synchronize(args.device)
    start = time.perf_counter()
    batched = engine.generate(batch, attention_mask=mask, max_new_tokens=args.max_new_tokens, eos_token_id=[])
    synchronize(args.device)
    report["batch_tokens_per_s"] = len(rows) * args.max_new_tokens / (time.perf_counter() - start)
    report["batch_target_forwards"] = batched.num_target_forwards
    report["batch_identical"] = all(
        torch.equal(batched.sequences[index, args.prompt_len:],
                    engine.generate(row, max_new_tokens=args.max_new_tokens, eos_token_id=[]).sequences[0, row.shape[1]:])
        for index, row in enumerate(rows)
    )

    sampler = torch.Generator(device=args.device).manual_seed(args.seed)
    sampled = engine.generate(prompts[0], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, eos_token_id=[], generator=sampler)
    report["sampled_tokens"] = sampled.sequences[0, args.prompt_len:].tolist()
    report["sampled_target_forwards_per_token"] = sampled.num_target_forwards / sampled.num_new_tokens

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.device} {args.dtype}, tree {tree}")
        print(f"greedy: generate {report['generate_tokens_per_s']:.1f} tok/s, engine "
              f"{report['engine_tokens_per_s']:.1f} tok/s ({report['speedup']:.2f}x), "
              f"{report['target_forwards_per_token']:.2f} target forwards per token, "
              f"{report['mean_accepted_per_step']:.2f} drafts accepted per step, "
              f"identical to generate: {report['greedy_identical']}")
        print("time split (s): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
        print(f"batch of {len(rows)} prompts ({', '.join(str(row.shape[1]) for row in rows)} tokens): "
              f"{report['batch_tokens_per_s']:.1f} tok/s, {batched.num_target_forwards} target forwards, "
              f"each sequence identical to its own run: {report['batch_identical']}")
        print(f"sampled (T={args.temperature}, top_p={args.top_p}): "
              f"{report['sampled_target_forwards_per_token']:.2f} target forwards per token")
    return report


if __name__ == "__main__":
    main()
