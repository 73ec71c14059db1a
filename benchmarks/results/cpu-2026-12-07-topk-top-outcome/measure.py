import time
import torch
from distill_ops import topk_kl_div
torch.manual_seed(0)
N, V, K = 1024, 32000, 64
s = torch.randn(N, V)
idx = torch.stack([torch.randperm(V)[:K] for _ in range(N)])
lp = torch.log_softmax(torch.randn(N, K), -1) - 0.1
labels = torch.randint(0, V, (N,))
for tail in ["renormalize", "bucket", "label"]:
    for div in ["forward", "reverse"]:
        best = 1e9
        for _ in range(9):
            leaf = s.clone().requires_grad_(True)
            t0 = time.perf_counter()
            topk_kl_div(leaf, teacher_topk_indices=idx, teacher_topk_logprobs=lp, tail=tail, divergence=div,
                        labels=labels, impl="torch").backward()
            best = min(best, time.perf_counter() - t0)
        print(f"{tail:12s} {div:8s} {best*1e3:8.2f} ms", flush=True)
