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
import re
import resource
import sys

import torch


def disable_thp() -> None:
    """Transparent huge pages make RSS jump in 2 MiB steps (seen here: +-8 MiB between
    identical runs); switch them off for this process so RSS counts 4 KiB pages."""
    import ctypes

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Sampler:
    """Largest RSS seen by a daemon thread reading /proc/self/statm every ``period_s``."""

    def __init__(self, period_s: float = 0.0005):
        import os
        import threading
        import time

        fd, page = os.open("/proc/self/statm", os.O_RDONLY), resource.getpagesize()
        self.read = lambda: int(os.pread(fd, 128, 0).split()[1]) * page
        self.peak = self.read()

        def loop():
            while True:
                self.peak = max(self.peak, self.read())
                time.sleep(period_s)

        threading.Thread(target=loop, daemon=True).start()


def main() -> None:
    disable_thp()
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
    sampler = Sampler()
    run(hidden, weight, targets)  # warm-up; leaves .grad resident, as in a training loop
    hidden.grad.fill_(1.0)  # touch every page: gradient-sized buffers stay resident
    weight.grad.fill_(1.0)
    base = rss_bytes()
    hidden.grad, weight.grad = None, None  # freed; the step allocates its own
    reset_hwm()
    sampler.peak = sampler.read()
    run(hidden, weight, targets)
    peak = max(hwm_bytes(), sampler.peak)
    print(json.dumps({"impl": impl, "n": n, "d": d, "v": v, "extra_bytes": peak - base,
                      "logits_bytes": n * v * 4}))


if __name__ == "__main__":
    main()
