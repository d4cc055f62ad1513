"""The reference forward pass of a build: model body -> hidden states -> fused log-probs.

:class:`Computer` turns one planned batch of examples into the row values a shard stores
(sums of the response tokens' log-probs, response lengths, optionally the per-token values),
through :func:`dpo_fast.linear_logprobs`, never the [tokens x vocab] logits. Its caller runs it
in eval mode under ``torch.inference_mode``. Before the first batch it can check the fused head
against the model's own logits on one short sequence (:meth:`Computer.check_head`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data import KEY_BYTES, PreferenceExample, pack_pair_batch
from ..models import body_hidden, input_device, model_parts
from ..ops.logprobs import linear_logprobs
from .store import RefCacheError

_IGNORE = -100


class Computer:
    """Runs the reference forward for batches of examples (eval mode, inference mode).

    ``lockstep``: the model is sharded over the torch.distributed processes (FSDP2: every
    layer's forward is a collective), so every rank makes the same forward calls: the head
    check runs on all ranks at once (:meth:`begin`), each real batch is announced to the
    others (:meth:`rows`), and a rank out of work runs a one-token forward for each batch
    another rank still computes (:meth:`drain`). Autograd is then off by ``no_grad`` (FSDP2
    keeps the gathered parameters it makes, which must not be inference tensors; also with
    one process)."""

    def __init__(self, model, softcap, temperature, per_token, verify_head, lockstep=False):
        self.model = model
        self.body, self.weight, self.bias = model_parts(model)
        self.device = input_device(model, self.weight)
        self.softcap, self.temperature = softcap, temperature
        self.per_token = per_token
        self.verify_head = verify_head
        self.lockstep = bool(lockstep)

    @contextlib.contextmanager
    def running(self):
        """Eval mode and no autograd for the block; the model's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad() if self.lockstep else torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _any_rank(self, mine: bool) -> bool:
        """True if this or any other rank has a batch to run (a collective)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        dev = torch.device("cpu")
        if dist.get_backend() == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([int(mine)], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def begin(self, ex: PreferenceExample) -> None:
        """Lockstep: the head check on ``ex`` (the same on every rank), before any batch."""
        if self.lockstep and self.verify_head:
            self.check_head(ex)  # (clears verify_head)

    def drain(self) -> int:
        """Lockstep: after this rank's last batch, one-token forwards while another rank
        still computes; returns their count."""
        if not self.lockstep:
            return 0
        n = 0
        ids = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
        while self._any_rank(False):
            self.hidden(ids, torch.ones_like(ids))
            n += 1
        return n

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states [S, T, D] of the body for ``input_ids`` / ``attention_mask``
        [S, T], on the head weight's device."""
        return body_hidden(self.body, input_ids, attention_mask, self.weight.device)

    def check_head(self, ex: PreferenceExample, max_tokens: int = 64) -> None:
        """Compares the fused head with the model's own full logits on the first
        ``max_tokens`` tokens of ``ex``'s prompt + chosen (every next token scored; logits of
        that short prefix only): catches a head transform (logit scale, softcap) that
        softcap / temperature do not describe."""
        seq = np.concatenate([ex.prompt_ids, ex.chosen_ids])[:max_tokens].astype(np.int64)
        ids = torch.from_numpy(seq)[None].to(self.device)
        mask = torch.ones_like(ids)
        tgt = ids[0, 1:].to(self.weight.device)
        ours = linear_logprobs(self.hidden(ids, mask)[0, :-1], self.weight, tgt, bias=self.bias,
                               softcap=self.softcap, temperature=self.temperature)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[0, :-1].float()
        full = torch.log_softmax(logits, -1).gather(-1, tgt.to(logits.device)[:, None])[:, 0]
        ours = ours.to(full.device)
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        tol = (0.25 + 0.02 * full.abs()) if half else (1e-3 + 1e-4 * full.abs())
        err = (ours - full).abs()
        if not bool((err <= tol).all()):
            raise RefCacheError(
                f"the model's own logits disagree with the fused head (max |diff| "
                f"{err.max().item():.3g} nats per token on example {ex.key}): the model "
                "transforms its logits in a way not given by softcap / temperature "
                f"(used softcap={self.softcap}, temperature={self.temperature}); pass the right "
                "softcap= / temperature=, or verify_head=False if this is expected")
        self.verify_head = False

    def rows(self, examples: Sequence[PreferenceExample]) -> Dict[str, Any]:
        """Per-row results for the R ``examples`` (a part, see :func:`.store.encode_shard`):
        ``keys`` uint8 [R, 16], ``chosen_logps`` / ``rejected_logps`` float32 [R],
        ``chosen_lengths`` / ``rejected_lengths`` int32 [R] and (per_token) ``token_logps``,
        R float32 arrays (row i's chosen tokens, then its rejected tokens)."""
        if self.lockstep:
            self._any_rank(True)
        if self.verify_head:  # (lockstep: done by begin)
            self.check_head(examples[0])
        r = len(examples)
        b = pack_pair_batch(examples, device=self.device)
        logp = linear_logprobs(self.hidden(b.input_ids, b.attention_mask), self.weight,
                               b.targets.to(self.weight.device), bias=self.bias,
                               softcap=self.softcap, temperature=self.temperature)
        lp = logp.float().cpu().numpy()
        sel = (b.targets != _IGNORE).cpu().numpy()
        flat = lp[sel].tolist()  # row-major: each sequence's response tokens in order
        lengths = b.lengths.cpu().numpy()
        offs = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.array([math.fsum(flat[offs[s]:offs[s + 1]]) for s in range(2 * r)],
                        dtype=np.float64).astype(np.float32)
        out = {"keys": np.frombuffer(b"".join(e.key_bytes for e in examples),
                                     dtype=np.uint8).reshape(r, KEY_BYTES),
               "chosen_logps": sums[:r], "rejected_logps": sums[r:],
               "chosen_lengths": lengths[:r].astype(np.int32),
               "rejected_lengths": lengths[r:].astype(np.int32)}
        if self.per_token:
            flat32 = lp[sel]
            out["token_logps"] = [np.concatenate([flat32[offs[i]:offs[i + 1]],
                                                  flat32[offs[r + i]:offs[r + i + 1]]])
                                  for i in range(r)]
        return out
