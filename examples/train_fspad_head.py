"""Train an FSPAD draft head for a tiny randomly initialised target, then measure it in the engine.

    python examples/train_fspad_head.py                 # a few minutes on a laptop CPU
    python examples/train_fspad_head.py --steps 60 --sequences 32   # seconds (what the tests run)

1. Build a tiny random Llama target (embeddings large next to the layers' updates, so that its next token
   depends on the current token and its context in a learnable way, as in a trained LM).
2. Sample training sequences from the target itself (the head learns the target's behaviour, no dataset).
3. Train ``FSPADDraftHead`` on the target's last-layer features with ``fspad_draft_loss`` (SmoothL1 on the
   regressed next feature + soft cross-entropy through the frozen LM head, computed by the fused linear
   divergence: no [tokens, vocabulary] logits are materialised).
4. Decode held-out prompts greedily with ``SpeculativeDecoder`` and report tokens per target forward
   for the trained head on a dynamic (EAGLE-2) tree, the trained head on a chain (one path, the
   classic speculative-decoding draft) and the untrained head; the output is checked against
   ``target.generate``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distill_ops.fspad import FSPADDraftHead, fspad_training_inputs
from distill_ops.speculative import SpeculativeDecoder

from distill_ops.fspad_loss import fspad_draft_loss
from distill_ops.integrations.hf import logit_scale, logit_softcap


def build_target(vocab_size: int, hidden_size: int, num_layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.05, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Embeddings large next to the layers' updates: as in a trained LM, the current token and its context
        # (not initialisation noise) decide the next token, so a small head can learn to predict it.
        target.get_input_embeddings().weight.normal_(0.0, 1.0)
        target.get_output_embeddings().weight.normal_(0.0, 0.3)
    return target


@torch.no_grad()
def sample_sequences(target, num: int, length: int, prompt_len: int, temperature: float, seed: int) -> torch.Tensor:
    """``num`` sequences of ``length`` tokens: random prompts continued by sampling from the target."""
    generator = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    prompts = torch.randint(0, vocab, (num, prompt_len), generator=generator)
    torch.manual_seed(seed)  # generate() samples with the global generator
    return target.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=temperature, top_k=None,
        top_p=None, max_new_tokens=length - prompt_len, min_new_tokens=length - prompt_len, pad_token_id=0,
    )


def train(head, target, sequences, *, steps: int, batch_size: int, lr: float, logit_weight: float,
          feature_noise: float, seed: int) -> list[float]:
    inputs = fspad_training_inputs(target, sequences)
    lm_head_weight = target.get_output_embeddings().weight.detach()
    # The target's logits are softcap(scale * lm_head(feature)) (scale 1, no cap for Llama; Cohere, Granite and
    # Gemma-2 differ): the loss scores the head's predictions through the same map.
    logit_map = dict(logit_scale=logit_scale(target), softcap=logit_softcap(target))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    for _ in range(steps):
        rows = torch.randint(0, sequences.shape[0], (batch_size,), generator=generator)
        features = inputs["features"][rows]
        if feature_noise > 0:
            # While drafting the head reads its own (imperfect) predicted features: train it to tolerate noise.
            features = features + feature_noise * torch.randn(features.shape, generator=generator)
        regress, predict = head(features, inputs["token_embeds"][rows], inputs["position_ids"])
        loss = fspad_draft_loss(regress, predict, inputs["target_next_features"][rows], lm_head_weight,
                                regress_weight=1.0, logit_weight=logit_weight, **logit_map)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    head.eval()
    return losses


def tokens_per_forward(target, draft, prompts, max_new_tokens: int, **tree) -> tuple[float, bool]:
    """Generated tokens per target forward (after the prefill) over ``prompts``, and whether every output
    equals ``target.generate`` (greedy)."""
    engine = SpeculativeDecoder(target, draft, **tree)
    generated = forwards = 0
    identical = True
    for prompt in prompts:
        prompt = prompt[None]
        out = engine.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=[])
        reference = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=0)
        identical &= torch.equal(out.sequences, reference)
        generated += out.num_new_tokens - 1  # the first token comes from the prefill
        forwards += out.num_target_forwards - 1
    return generated / max(forwards, 1), identical


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=256, help="training sequences sampled from the target")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--logit-weight", type=float, default=1.0)
    parser.add_argument("--feature-noise", type=float, default=0.02)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the training data")
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    target = build_target(args.vocab_size, args.hidden_size, args.num_layers, args.seed)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    sequences = sample_sequences(target, args.sequences, args.seq_len, 4, args.temperature, args.seed)
    torch.manual_seed(args.seed + 1)
    head = FSPADDraftHead(target.config)
    untrained = FSPADDraftHead(target.config).eval()
    untrained.load_state_dict(head.state_dict())
    losses = train(head, target, sequences, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   logit_weight=args.logit_weight, feature_noise=args.feature_noise, seed=args.seed)
    train_seconds = time.perf_counter() - start

    generator = torch.Generator().manual_seed(args.seed + 2)
    prompts = torch.randint(0, args.vocab_size, (args.eval_prompts, 6), generator=generator)
    dynamic = dict(depth=args.depth, topk=args.topk, num_nodes=args.num_nodes)
    chain = dict(tree=[[0] * (d + 1) for d in range(args.depth)])
    report = {"loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
              "train_seconds": train_seconds}
    identical = True
    for name, draft, tree in (("trained_dynamic", head, dynamic), ("trained_chain", head, chain),
                              ("untrained_dynamic", untrained, dynamic)):
        rate, same = tokens_per_forward(target, draft, prompts, args.max_new_tokens, **tree)
        report[f"{name}_tokens_per_forward"] = rate
        identical &= same
    report["greedy_identical_to_generate"] = identical
    report["total_seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"fspad_draft_loss {report['loss_first']:.3f} -> {report['loss_last']:.3f} in {args.steps} steps "
              f"({train_seconds:.1f} s)")
        print("tokens per target forward (greedy, accepted drafts + bonus):")
        print(f"  trained head, dynamic tree (depth {args.depth}, topk {args.topk}, {args.num_nodes} nodes): "
              f"{report['trained_dynamic_tokens_per_forward']:.2f}")
        print(f"  trained head, chain of {args.depth}: {report['trained_chain_tokens_per_forward']:.2f}")
        print(f"  untrained head, dynamic tree: {report['untrained_dynamic_tokens_per_forward']:.2f}")
        print(f"output identical to target.generate: {identical}")
    return report


if __name__ == "__main__":
    main()
