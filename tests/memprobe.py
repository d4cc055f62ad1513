"""Peak extra host memory of one fwd+bwd of linear_logprobs, measured in a fresh process.

Usage: python tests/memprobe.py IMPL N D V   ->  prints one JSON line.
IMPL "dpo:<impl>" measures fused_preference_loss (its defaults) on N tokens packed as
pairs of 512-token sequences instead.

"Extra" = peak RSS during the second fwd+bwd minus the RSS with inputs and the previous
step's gradients resident (what a training loop holds between steps). The first call
warms up thread pools, BLAS buffers and the allocator; the kernel's high-water mark
(VmHWM) is then reset through /proc/self/clear_refs, so the number is the steady-state
cost of one step, not start-up. VmHWM can lag the real RSS on these VMs (seen: 2.4 GB read for
a step whose RSS reached 4.3 GB), so the peak is the higher of VmHWM and the RSS a thread
samples every half millisecond during the step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import harness  # noqa: E402  (the benchmarks' memory readers: one implementation)


def main() -> None:
    harness.disable_thp()
    impl, n, d, v = sys.argv[1], *map(int, sys.argv[2:5])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    import dpo_fast

    def run(h, w, t):
        if impl.startswith("dpo:"):
            seq = torch.arange(n) // 512
            ref = -torch.rand(int(seq.max()) + 1) * 50 - 100
            out = dpo_fast.fused_preference_loss(h, w, t, seq, ref, impl=impl[4:])
            out.loss.backward()
            return
        if impl == "naive":
            logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None]).squeeze(1)
        else:
            logp = dpo_fast.linear_logprobs(h, w, t, impl=impl)
        logp.sum().backward()

    hidden = torch.randn(n, d).requires_grad_()
    weight = (torch.randn(v, d) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,))
    harness.start_rss_sampler(period_s=0.0005)
    run(hidden, weight, targets)  # warm-up; leaves .grad resident, as in a training loop
    hidden.grad.fill_(1.0)  # touch every page: gradient-sized buffers stay resident
    weight.grad.fill_(1.0)
    base = harness.rss_bytes()
    hidden.grad, weight.grad = None, None  # freed; the step allocates its own
    harness.reset_hwm()  # VmHWM and the sampler's peak
    run(hidden, weight, targets)
    peak = harness.hwm_bytes()  # the higher of the two
    print(json.dumps({"impl": impl, "n": n, "d": d, "v": v, "extra_bytes": peak - base,
                      "logits_bytes": n * v * 4}))


if __name__ == "__main__":
    main()
