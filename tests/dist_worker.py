"""A training process for tests/test_distributed.py, started by torchrun (or alone).

    python dist_worker.py CONFIG_JSON            train with TrainConfig(**json)
    python dist_worker.py grads CONFIG_JSON      fused loss + grads through the engine vs alone
    python dist_worker.py collectives CONFIG_JSON   gloo collectives just before the exit

Environment: HOLD_AT=k  rank 0 prints "STEP k" after step k and then sleeps (for a kill);
DIE_AT=k  rank 1 kills itself with SIGKILL after step k; SLOW=s  every rank sleeps s seconds
after each step. Rank 0 prints "STEP n" after each step
and "RESULT <json>" at the end.
"""

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dpo_fast.train import TrainConfig, Trainer, TrainerCallback  # noqa: E402


class Hooks(TrainerCallback):
    def on_step_end(self, trainer, state):
        rank = trainer.dist.rank
        if rank == 0:
            print(f"STEP {state.global_step}", flush=True)
        time.sleep(float(os.environ.get("SLOW", "0")))
        if rank == 0 and os.environ.get("HOLD_AT") == str(state.global_step):
            time.sleep(3600)
        if rank == 1 and os.environ.get("DIE_AT") == str(state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)


def train(cfg):
    t = Trainer(TrainConfig(**cfg), callbacks=[Hooks()])
    res = t.train()
    if t.is_main:
        print("RESULT " + json.dumps(res.to_dict()), flush=True)
    from dpo_fast.train.distributed import teardown

    teardown(t.dist)  # as the CLI does


def grads(cfg):
    """One micro-batch of 4 pairs through the DDP / FSDP2 engine and through an unwrapped copy
    of the same model: loss and every parameter's (full) gradient, printed by rank 0."""
    from transformers import AutoModelForCausalLM

    from dpo_fast.train import distributed, sharding
    from dpo_fast.train.batching import make_micro_batch
    from dpo_fast.train.step import HeadSpec, micro_batch_loss

    from dpo_fast.models import model_parts
    from dpo_fast.ops.head_grad import weight_grad_sink
    from tiny import random_examples

    ctx, dev = distributed.setup(cfg["strategy"], "cpu", 120.0)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    alone = copy.deepcopy(model)
    ex = random_examples(4, seed=3)
    mb = make_micro_batch(ex, "padded", 0)
    ref = torch.linspace(-30.0, -10.0, 8)
    head = HeadSpec(None, 1.0)
    kw = dict(loss_type="sigmoid", beta=0.1)
    engine, _ = distributed.wrap(model, ctx, torch.device("cpu"))
    # rank r takes its own pairs; the engine's average over ranks of the per-rank mean losses'
    # gradients is the gradient of the mean over all 4 pairs
    k = 4 // ctx.world_size
    mine = list(range(ctx.rank * k, (ctx.rank + 1) * k))
    mb_r = make_micro_batch([ex[i] for i in mine], "padded", 0)
    ref_r = torch.cat([ref[mine], ref[[4 + i for i in mine]]])
    # head_blocks: the trainer's FSDP2 path, the head's weight gradient by vocabulary block
    # reduced onto each rank's shard (no [V, D] gradient)
    sink = sharding.head_grad_sink(model_parts(model).weight, ctx) \
        if cfg.get("head_blocks") else None
    assert (sink is not None) == bool(cfg.get("head_blocks"))
    with weight_grad_sink(sink):
        out = engine(lambda lm: micro_batch_loss(model_parts(lm), mb_r, ref_r, head, kw))
    out.loss.backward()
    loss = ctx.all_sum(out.loss.detach()) / ctx.world_size
    got = {}
    for n, p in engine.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        got[n.replace("module.", "").replace("lm.", "", 1)] = g
    want_out = micro_batch_loss(model_parts(alone), mb, ref, head, kw)
    want_out.loss.backward()
    want = {n: p.grad for n, p in alone.named_parameters()}
    if ctx.rank == 0:
        diffs = {n: float((got[n] - want[n]).abs().max()) for n in want}
        scale = {n: float(want[n].abs().max()) for n in want}
        print("RESULT " + json.dumps({
            "loss": float(loss), "loss_alone": float(want_out.loss),
            "names": sorted(got) == sorted(want), "diffs": diffs, "scale": scale,
            "tied": model_parts(alone).weight is alone.get_input_embeddings().weight,
            "world": ctx.world_size}), flush=True)
    distributed.teardown(ctx)


class _Finalized:
    """Writes ``path`` when the interpreter finalizes (``__main__``'s globals are cleared)."""

    def __init__(self, path):
        self.path = path

    def __del__(self):
        Path(self.path).write_text("finalized")


def collectives(cfg):
    """Gloo all-reduces of Python tensors, each dropped at once, with the group kept alive
    (as FSDP2's DTensor caches keep it), then the CLI's exit: a worker thread that frees the
    last one while the interpreter finalizes aborts the process. Writes ``<out>/atexit-<rank>``
    from an exit handler and ``<out>/finalized-<rank>`` if the interpreter finalized."""
    import atexit

    from dpo_fast.train import distributed

    ctx, _ = distributed.setup("auto", "cpu", 60)
    rank = ctx.rank
    out = Path(cfg["out"])
    atexit.register(lambda: (out / f"atexit-{rank}").write_text("ran"))
    globals()["_finalized"] = _Finalized(out / f"finalized-{rank}")
    globals()["_group"] = torch.distributed.group.WORLD
    for _ in range(cfg["n"]):
        x = torch.ones(1000)
        torch.distributed.all_reduce(x)
        del x
    distributed.teardown(ctx)


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        grads(json.loads(sys.argv[2]))
    elif sys.argv[1] == "collectives":
        collectives(json.loads(sys.argv[2]))
        if json.loads(sys.argv[2]).get("plain_exit"):  # the interpreter's own exit
            sys.exit(0)
    else:
        train(json.loads(sys.argv[1]))
    from dpo_fast.train.distributed import end_process

    end_process(0)  # as the CLI does: gloo's threads would outlive the interpreter
