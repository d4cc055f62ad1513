"""Preference losses on sequence log-probs: every TRL 1.x ``DPOTrainer`` loss type, cDPO label
smoothing, and the reference-free SimPO / ORPO / CPO losses.

Inputs are per-pair sequence log-probs (sums over response tokens, see ``docs/losses.md``):
``pc, pr`` under the policy, ``rc, rr`` under the reference. With ``s_w = pc - rc``,
``s_l = pr - rr``, ``h = s_w - s_l``, ``sig`` = sigmoid, ``eps`` = ``label_smoothing``,
``|y|`` = response token count and ``a = logp / |y|`` (length-averaged log-prob), the per-pair
losses are:

==============  =================================================================================
loss_type       per-pair loss
==============  =================================================================================
sigmoid         -(1-eps) log sig(beta h) - eps log sig(-beta h)   (DPO; cDPO when eps > 0)
hinge           relu(1 - beta h)                                    (SLiC)
ipo             (h_avg - 1/(2 beta))^2, h_avg = s_w/|y_w| - s_l/|y_l|
exo_pair        q log(q/(1-e)) + (1-q) log((1-q)/e), q = sig(beta h), e = eps or 1e-3 if eps == 0
nca_pair        -log sig(beta s_w) - 0.5 log sig(-beta s_w) - 0.5 log sig(-beta s_l)
robust          [-(1-eps) log sig(beta h) + eps log sig(-beta h)] / (1 - 2 eps)
bco_pair        -log sig(beta s_w) - log sig(-beta s_l)
sppo_hard       (s_w - 1/(2 beta))^2 + (s_l + 1/(2 beta))^2
aot             sigmoid form on D = sort(pc - pr) - sort(rc - rr)    (sorted over the batch)
aot_unpaired    sigmoid form on D = sort(s_w) - sort(s_l)
apo_zero        (1 - sig(beta s_w)) + sig(beta s_l)
apo_down        sig(beta s_w) + (1 - sig(beta h))
discopop        z = beta h, m = sig(z/tau): (1-m)(-log sig(z)) + m exp(-z)
sigmoid_norm    -log sig(beta h_avg)
sft             chosen_nll                                          (also Preferred-FT)
unlikelihood    chosen_nll - alpha log(1 - exp(a_l))                (the DPO paper's baseline)
simpo           -(1-eps) log sig(x) - eps log sig(-x), x = beta (a_w - a_l) - gamma
orpo            chosen_nll - lambda log sig(log_odds),
                log_odds = (a_w - a_l) - [log(1 - exp(a_w)) - log(1 - exp(a_l))]
cpo             -(1-eps) log sig(x) - eps log sig(-x) + alpha chosen_nll, x = beta (pc - pr)
==============  =================================================================================

f-DPO (Wang et al. 2023; TRL's ``f_divergence_type``): the log-ratios ``u = pc - rc`` and
``pr - rr`` inside ``h`` (and inside ``h_avg``) are replaced by the scores ``f'(exp(u))``:
``reverse_kl`` u (standard DPO), ``forward_kl`` 1 - exp(-u), ``js_divergence``
log 2 + log sig(u), ``alpha_divergence`` (exp((alpha-1) u) - 1) / (alpha-1) with the exponent
clamped at 80 (u itself at alpha = 1). Only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair,
robust, discopop and sft (TRL refuses the others: the f-DPO reparameterisation's log Z(x) only
cancels in the chosen - rejected difference). Rewards stay ``beta * u``.

The batch loss is the mean of the per-pair losses; a list of loss types sums
``weight_k * loss_k`` per pair (TRL's ``loss_weights``; e.g. MPO = ``["sigmoid", "bco_pair",
"sft"]``). Everything is differentiable w.r.t. the policy log-probs and ``chosen_nll``;
references are constants in DPO but gradients flow to them too if they require grad.

Where this differs from TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``trl/experimental/{cpo,orpo}``):

- ``sigmoid`` applies ``label_smoothing`` (cDPO, as the DPO paper's repo and TRL 0.x did); TRL
  1.16's sigmoid ignores it. Identical at eps = 0.
- ``exo_pair`` uses eps = 1e-3 (the EXO paper's value) when ``label_smoothing`` is 0; TRL 1.16
  raises instead. ``label_smoothing`` outside [0, 0.5) raises for every type (TRL only warns
  for robust).
- ``sft`` is the mean over pairs of each pair's per-token mean NLL; TRL averages over all chosen
  tokens of the batch (token-weighted). Equal when the chosen lengths are equal.
- ``bco_pair`` has no running-mean reward shift (TRL 1.16 has none either; older TRL did).
- ``ipo`` / ``sigmoid_norm`` require lengths > 0 (TRL clamps the count to >= 1).
- ``simpo``: gamma is TRL's absolute margin ``simpo_gamma`` (TRL: ``beta * (logits -
  simpo_gamma / beta)``), not the SimPO repo's ``gamma_beta_ratio`` (gamma = ratio * beta).
- ``orpo``: lambda defaults to ``beta`` because TRL's ORPOTrainer uses ``beta`` as the paper's
  lambda; ``log(1 - exp(a))`` is the stable log1mexp, with a nan-free gradient as a -> 0-.
- ``discopop``: ``m * exp(-z)`` is formed as ``exp(log m - z)``, finite for very negative z.

``unlikelihood`` (not in TRL) is the DPO paper's Unlikelihood baseline: raise the likelihood of
y_w, lower that of y_l (Welleck et al. 2019's ``-log(1 - p)`` term), with weight
``unlikelihood_alpha``. The fused op reduces per-token log-probs to per-sequence sums, so the
unlikelihood term is applied to the geometric-mean token probability ``exp(a_l)`` of y_l
rather than to each token: bounded below by 0 like the per-token form, and its gradient pushes
every token of y_l down, with weight ``alpha exp(a_l) / (|y_l| (1 - exp(a_l)))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
    "simpo", "orpo", "cpo", "unlikelihood",
)
#: Types that need no reference log-probs (``sft`` needs none either but is not a preference loss).
REFERENCE_FREE_TYPES = ("simpo", "orpo", "cpo")
#: Every type that works without reference log-probs.
NO_REFERENCE_TYPES = frozenset(REFERENCE_FREE_TYPES + ("sft", "unlikelihood"))
_NO_REF = NO_REFERENCE_TYPES
_NEEDS_LENGTHS = frozenset(("ipo", "sigmoid_norm", "simpo", "orpo", "unlikelihood"))
#: ``f_divergence_type`` values (TRL 1.16's names; ``reverse_kl`` is standard DPO).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The loss types an f-divergence other than reverse_kl applies to (as TRL 1.16).
F_DIVERGENCE_TYPES = frozenset(("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                "discopop", "sft"))
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Result of :func:`preference_loss`. ``B`` = number of pairs.

    Attributes:
        loss: [] scalar, ``losses.mean()``; differentiable.
        losses: [B] total per-pair loss ``sum_k w_k * terms[k]``; differentiable. For ``aot`` /
            ``aot_unpaired`` entry i belongs to the i-th smallest sorted value, not to pair i.
        terms: one [B] unweighted per-pair loss per entry of ``loss_type``, in that order.
        chosen_rewards: [B] detached ``beta * (pc - rc)``; for reference-free-only losses
            ``beta * pc`` (``beta * a_w`` if simpo / orpo is among them), as TRL's CPO / ORPO log.
        rejected_rewards: [B] detached, same convention with ``pr, rr``.
        margins: [B] ``chosen_rewards - rejected_rewards``.
        accuracies: [B] float, 1.0 where ``chosen_rewards > rejected_rewards`` (ties count 0).
    """

    loss: Tensor
    losses: Tensor
    terms: Tuple[Tensor, ...]
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracies: Tensor

    @property
    def accuracy(self) -> Tensor:
        """[] mean of ``accuracies`` (TRL's ``rewards/accuracies``)."""
        return self.accuracies.mean()


# ------------------------------------------------------------------------------- validation


def _check_number(name: str, value, *, positive=False, nonneg=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_label_smoothing(eps) -> float:
    eps = _check_number("label_smoothing", eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps!r}")
    return eps


def _check_vector(name: str, t, batch: Optional[int], device, *, allow_int=False) -> Tensor:
    """Checks that ``t`` is a 1-D [B] tensor (float, or integer if ``allow_int``) on ``device``."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ok = t.dtype.is_floating_point or (allow_int and t.dtype != torch.bool and not t.is_complex())
    if not ok:
        kind = "a floating-point or integer" if allow_int else "a floating-point"
        raise ValueError(f"{name} must be {kind} tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} must be [B]=[{batch}], got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but policy_chosen_logps is on {device}")
    return t


def _check_lengths(name: str, t, batch: int, device) -> Tensor:
    _check_vector(name, t, batch, device, allow_int=True)
    if not torch.compiler.is_compiling() and not bool((t > 0).all()):
        raise ValueError(f"{name} must be > 0 (response token counts), got {t.tolist()}")
    return t


def _normalize_types(loss_type, loss_weights) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or len(types) == 0:
        raise ValueError(
            f"loss_type must be a name or a non-empty list of names, got {loss_type!r}"
        )
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type {t!r} is unknown; expected one of {LOSS_TYPES}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if isinstance(loss_weights, (int, float)) or not isinstance(loss_weights, Sequence):
            raise ValueError(f"loss_weights must be a list of numbers, got {loss_weights!r}")
        if len(loss_weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} entries but loss_type has {len(types)}"
            )
        weights = tuple(_check_number("loss_weights", w) for w in loss_weights)
    return tuple(types), weights


# ---------------------------------------------------------------------------------- helpers


def _compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in ts):
        return torch.float64
    return torch.float32


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, without cancellation (Maechler 2012: branch at -ln 2).

    The log1p branch sees x clamped to its side: unclamped, torch.where's discarded branch would
    put inf * 0 = nan into the gradient when exp(x) rounds to 1 (x -> 0-)."""
    lo = torch.clamp(x, max=-_LN2)
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(lo)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid(x: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sig(x) - eps log sig(-x) (cDPO's conservative form; plain DPO at eps=0)."""
    loss = -F.logsigmoid(x)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-x)
    return loss


def dpo_sigmoid_coefficients(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO/cDPO loss and its closed-form derivatives w.r.t. the sequence log-probs.

    With ``x = beta * ((pc - rc) - (pr - rr))`` and ``eps = label_smoothing``:
    ``L = -(1-eps) log sig(x) - eps log sig(-x)``,
    ``dL/dx = eps sig(x) - (1-eps) sig(-x)`` (= ``sig(x) - (1-eps)``), so
    ``dL/dpc = beta dL/dx`` and ``dL/dpr = -beta dL/dx`` (``-beta sig(-x)`` / ``+beta sig(-x)``
    for plain DPO). These are the coefficients the fused DPO loss broadcasts to every response
    token of the chosen / rejected sequence. They are per pair: multiply by ``1/B`` for the
    batch-mean loss.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            [B] float tensors (sequence log-prob sums over response tokens).
        beta: finite > 0.
        label_smoothing: eps in [0, 0.5).

    Returns:
        ``(loss [B], dL/dpc [B], dL/dpr [B])``, float32 (float64 if any input is float64),
        detached (no autograd graph).
    """
    beta = _check_number("beta", beta, positive=True)
    eps = _check_label_smoothing(label_smoothing)
    pc = _check_vector("policy_chosen_logps", policy_chosen_logps, None, None)
    batch, device = pc.shape[0], pc.device
    pr = _check_vector("policy_rejected_logps", policy_rejected_logps, batch, device)
    rc = _check_vector("ref_chosen_logps", ref_chosen_logps, batch, device)
    rr = _check_vector("ref_rejected_logps", ref_rejected_logps, batch, device)
    dtype = _compute_dtype(pc, pr, rc, rr)
    pc, pr, rc, rr = (t.detach().to(dtype) for t in (pc, pr, rc, rr))
    x = beta * ((pc - rc) - (pr - rr))
    loss = _smoothed_sigmoid(x, eps)
    dx = eps * torch.sigmoid(x) - (1.0 - eps) * torch.sigmoid(-x)
    return loss, beta * dx, -beta * dx


# ------------------------------------------------------------------------------- the losses


def _f_score(u: Tensor, kind: str, alpha: float) -> Tensor:
    """f'(exp(u)) of the f-divergence ``kind`` for log-ratios ``u`` (see the module docstring)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return u
    if kind == "forward_kl":
        return 1.0 - torch.exp(-u)
    if kind == "js_divergence":
        return _LN2 + F.logsigmoid(u)
    t = torch.clamp((alpha - 1.0) * u, max=80.0)  # alpha_divergence: exp stays finite
    return (torch.exp(t) - 1.0) / (alpha - 1.0)


def _term(kind: str, v: dict, beta: float, eps: float, p: dict) -> Tensor:
    """Unweighted per-pair loss [B] of one loss type. ``v`` holds the [B] inputs."""
    pc, pr = v["pc"], v["pr"]
    if kind in REFERENCE_FREE_TYPES:
        if kind == "cpo":
            loss = _smoothed_sigmoid(beta * (pc - pr), eps)
            return loss + p["cpo_alpha"] * v["nll"] if p["cpo_alpha"] else loss
        a_w, a_l = pc / v["lc"], pr / v["lr"]
        if kind == "simpo":
            return _smoothed_sigmoid(beta * (a_w - a_l) - p["simpo_gamma"], eps)
        log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))  # orpo
        return v["nll"] - p["orpo_lambda"] * F.logsigmoid(log_odds)
    if kind == "sft":
        return v["nll"]
    if kind == "unlikelihood":
        return v["nll"] - p["unlikelihood_alpha"] * _log1mexp(pr / v["lr"])

    s_w, s_l = v["sw"], v["sl"]  # the log-ratios, or their f-divergence scores
    h = s_w - s_l
    if kind == "sigmoid":
        return _smoothed_sigmoid(beta * h, eps)
    if kind == "hinge":
        return torch.relu(1.0 - beta * h)
    if kind in ("ipo", "sigmoid_norm"):
        h_avg = s_w / v["lc"] - s_l / v["lr"]
        if kind == "ipo":
            return (h_avg - 1.0 / (2.0 * beta)) ** 2
        return -F.logsigmoid(beta * h_avg)
    if kind == "exo_pair":
        e = eps if eps > 0 else 1e-3
        z = beta * h
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    if kind == "nca_pair":
        return (-F.logsigmoid(beta * s_w) - 0.5 * F.logsigmoid(-beta * s_w)
                - 0.5 * F.logsigmoid(-beta * s_l))
    if kind == "robust":
        z = beta * h
        return ((-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps))
    if kind == "bco_pair":
        return -F.logsigmoid(beta * s_w) - F.logsigmoid(-beta * s_l)
    if kind == "sppo_hard":
        return (s_w - 0.5 / beta) ** 2 + (s_l + 0.5 / beta) ** 2
    if kind == "aot":
        d = torch.sort(pc - pr, dim=0).values - torch.sort(v["rc"] - v["rr"], dim=0).values
        return _smoothed_sigmoid(beta * d, eps)
    if kind == "aot_unpaired":
        d = torch.sort(s_w, dim=0).values - torch.sort(s_l, dim=0).values
        return _smoothed_sigmoid(beta * d, eps)
    if kind == "apo_zero":
        return (1.0 - torch.sigmoid(beta * s_w)) + torch.sigmoid(beta * s_l)
    if kind == "apo_down":
        return torch.sigmoid(beta * s_w) + (1.0 - torch.sigmoid(beta * h))
    if kind == "discopop":
        z = beta * h
        # m * exp(-z) as exp(log m - z): no inf * 0 when z is very negative
        return (torch.sigmoid(-z / p["discopop_tau"]) * -F.logsigmoid(z)
                + torch.exp(F.logsigmoid(z / p["discopop_tau"]) - z))
    raise AssertionError(kind)  # unreachable: names are validated


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    chosen_nll: Optional[Tensor] = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    orpo_lambda: Optional[float] = None,
    cpo_alpha: float = 1.0,
    unlikelihood_alpha: float = 1.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: Optional[Tensor] = None,
) -> PreferenceLossOutput:
    """Preference loss on per-pair sequence log-probs (formulas in the module docstring).

    Args:
        policy_chosen_logps: [B] float, policy log-prob of each chosen response (sum over its
            response tokens). Must be < 0 for ``orpo``.
        policy_rejected_logps: [B] float, same for the rejected responses.
        ref_chosen_logps, ref_rejected_logps: [B] float reference log-probs; required (both)
            by every type except ``simpo``, ``orpo``, ``cpo``, ``sft`` and ``unlikelihood``.
        loss_type: a name from :data:`LOSS_TYPES`, or a list of them (combined per pair).
        loss_weights: one weight per entry of ``loss_type`` (default all 1.0).
        beta: finite > 0; DPO's KL strength (IPO's tau, SimPO/CPO's temperature).
        label_smoothing: eps in [0, 0.5); used by sigmoid (cDPO), robust, exo_pair, aot,
            aot_unpaired, simpo and cpo, ignored by the others (as in TRL).
        chosen_lengths, rejected_lengths: [B] response token counts (int or float, > 0);
            required by ipo, sigmoid_norm, simpo, orpo and unlikelihood (length-averaged
            log-probs).
        chosen_nll: [B] mean negative log-likelihood per response token of each chosen response,
            i.e. ``-(sum of chosen response token log-probs) / |y_w|``; used by sft, orpo,
            unlikelihood and cpo (when ``cpo_alpha != 0``). If None it is derived as
            ``-policy_chosen_logps / chosen_lengths`` (the same quantity), which needs
            ``chosen_lengths``.
        simpo_gamma: SimPO's target margin gamma (TRL ``CPOConfig.simpo_gamma``, default 0.5).
        discopop_tau: DiscoPOP's mixing temperature (> 0; TRL default 0.05).
        orpo_lambda: weight of ORPO's odds-ratio term; None means ``beta``, as TRL's ORPOTrainer,
            where ``beta`` is the paper's lambda.
        cpo_alpha: weight of CPO's NLL term (>= 0; TRL ``CPOConfig.cpo_alpha``, default 1.0).
        unlikelihood_alpha: weight (>= 0) of the unlikelihood term on y_l (default 1.0).
        f_divergence_type: one of :data:`F_DIVERGENCES` (TRL's names): the f-DPO score that
            replaces the log-ratios; other than ``reverse_kl`` only for the
            :data:`F_DIVERGENCE_TYPES`.
        f_alpha_divergence_coef: alpha of ``alpha_divergence`` (TRL default 0.5).
        pair_weights: [B] float, constants (detached here) that multiply each pair's total
            loss, e.g. WPO's :func:`wpo_weights` (TRL's ``use_weighting``). Not with ``aot`` /
            ``aot_unpaired``, whose entries are sorted values, not pairs (TRL refuses it too).

    Returns:
        :class:`PreferenceLossOutput`; tensors are float32 (float64 if any input is float64).

    Raises:
        ValueError: naming the offending argument (unknown type, missing references / lengths /
            chosen_nll, bad shapes or dtypes, beta <= 0, label_smoothing outside [0, 0.5), ...).
    """
    types, weights = _normalize_types(loss_type, loss_weights)
    beta = _check_number("beta", beta, positive=True)
    eps = _check_label_smoothing(label_smoothing)
    params = {
        "simpo_gamma": _check_number("simpo_gamma", simpo_gamma),
        "discopop_tau": _check_number("discopop_tau", discopop_tau, positive=True),
        "orpo_lambda": beta if orpo_lambda is None
        else _check_number("orpo_lambda", orpo_lambda, nonneg=True),
        "cpo_alpha": _check_number("cpo_alpha", cpo_alpha, nonneg=True),
        "unlikelihood_alpha": _check_number("unlikelihood_alpha", unlikelihood_alpha,
                                            nonneg=True),
    }

    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got "
                         f"{f_divergence_type!r}")
    outside = [t for t in types if t not in F_DIVERGENCE_TYPES]
    if f_divergence_type != "reverse_kl" and outside:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} applies only to loss types "
                         f"{sorted(F_DIVERGENCE_TYPES)}; got {outside[0]!r} (use reverse_kl)")
    f_alpha = _check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)

    pc = _check_vector("policy_chosen_logps", policy_chosen_logps, None, None)
    batch, device = pc.shape[0], pc.device
    if batch == 0:
        raise ValueError("policy_chosen_logps is empty: the batch needs at least one pair")
    pr = _check_vector("policy_rejected_logps", policy_rejected_logps, batch, device)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is None: give both reference log-probs or neither")
    has_ref = ref_chosen_logps is not None
    ref_types = [t for t in types if t not in _NO_REF]
    if ref_types and not has_ref:
        raise ValueError(
            f"loss_type {ref_types[0]!r} needs ref_chosen_logps and ref_rejected_logps; only "
            f"{REFERENCE_FREE_TYPES}, 'sft' and 'unlikelihood' are reference-free"
        )
    if has_ref:
        rc = _check_vector("ref_chosen_logps", ref_chosen_logps, batch, device)
        rr = _check_vector("ref_rejected_logps", ref_rejected_logps, batch, device)

    nll_types = [t for t in types
                 if t in ("sft", "orpo", "unlikelihood") or (t == "cpo" and params["cpo_alpha"])]
    len_types = [t for t in types if t in _NEEDS_LENGTHS]
    if nll_types and chosen_nll is None and chosen_lengths is None:
        raise ValueError(
            f"loss_type {nll_types[0]!r} needs chosen_nll (or chosen_lengths to derive it as "
            "-policy_chosen_logps / chosen_lengths)"
        )
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is None:
            if len_types:
                raise ValueError(
                    f"loss_type {len_types[0]!r} averages over response tokens and needs {name}"
                )
        else:
            _check_lengths(name, t, batch, device)
    if chosen_nll is not None:
        _check_vector("chosen_nll", chosen_nll, batch, device)
    if pair_weights is not None:
        _check_vector("pair_weights", pair_weights, batch, device)
        sorted_types = [t for t in types if t in ("aot", "aot_unpaired")]
        if sorted_types:
            raise ValueError(f"pair_weights cannot weight loss_type {sorted_types[0]!r}: its "
                             "entries are sorted over the batch, not pairs (TRL refuses WPO "
                             "weighting for aot / aot_unpaired too)")

    dtype = _compute_dtype(pc, pr, ref_chosen_logps, ref_rejected_logps, chosen_nll)
    v = {"pc": pc.to(dtype), "pr": pr.to(dtype)}
    if has_ref:
        v["rc"], v["rr"] = rc.to(dtype), rr.to(dtype)
        v["sw"] = _f_score(v["pc"] - v["rc"], f_divergence_type, f_alpha)
        v["sl"] = _f_score(v["pr"] - v["rr"], f_divergence_type, f_alpha)
    if chosen_lengths is not None:
        v["lc"] = chosen_lengths.to(dtype)
    if rejected_lengths is not None:
        v["lr"] = rejected_lengths.to(dtype)
    if nll_types:
        v["nll"] = chosen_nll.to(dtype) if chosen_nll is not None else -v["pc"] / v["lc"]
    if not torch.compiler.is_compiling():
        for kind in ("orpo", "unlikelihood"):
            if kind not in types:
                continue
            checks = (("policy_chosen_logps", pc), ("policy_rejected_logps", pr)) \
                if kind == "orpo" else (("policy_rejected_logps", pr),)
            for name, t in checks:
                if not bool((t < 0).all()):
                    raise ValueError(f"{name} must be < 0 for {kind} (log of a probability < 1)")

    terms = tuple(_term(t, v, beta, eps, params) for t in types)
    losses = terms[0] * weights[0] if weights[0] != 1.0 else terms[0]
    for term, w in zip(terms[1:], weights[1:]):
        losses = losses + w * term
    if pair_weights is not None:
        losses = losses * pair_weights.detach().to(dtype)

    with torch.no_grad():
        if has_ref and (ref_types or not any(t in REFERENCE_FREE_TYPES for t in types)):
            chosen_rewards = beta * (v["pc"] - v["rc"])
            rejected_rewards = beta * (v["pr"] - v["rr"])
        elif any(t in ("simpo", "orpo") for t in types):
            chosen_rewards = beta * v["pc"] / v["lc"]
            rejected_rewards = beta * v["pr"] / v["lr"]
        else:
            chosen_rewards, rejected_rewards = beta * v["pc"], beta * v["pr"]
        margins = chosen_rewards - rejected_rewards
        accuracies = (chosen_rewards > rejected_rewards).to(dtype)
    return PreferenceLossOutput(
        loss=losses.mean(), losses=losses, terms=terms, chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(), margins=margins.detach(),
        accuracies=accuracies,
    )


def wpo_weights(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_log_sum_sq: Tensor,
    rejected_log_sum_sq: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, Eq. 2-3; TRL 1.16's ``use_weighting``), without
    gradient: ``w_w * w_l`` with ``w = exp((sum_t log p(y_t) - sum_t log sum_v p_v^2) / |y|)``,
    ``|y|`` clamped to >= 1 (TRL's convention; TRL 1.16 applies no upper clamp).

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] the policy's unweighted sequence
            log-probs (sums over response tokens; not LD-DPO-weighted).
        chosen_log_sum_sq, rejected_log_sum_sq: [B] sums over the same tokens of
            ``log sum_v p_v^2`` (``sequence_logprobs(..., with_sum_sq=True).log_sum_sq``).
        chosen_lengths, rejected_lengths: [B] response token counts.

    Returns:
        [B] detached positive weights in the dtype of the log-probs (float32 for half
        inputs). A token whose probability equals its distribution's ``sum_v p_v^2`` (its
        expected probability under the policy's own sampling) contributes 1; likelier tokens
        raise the weight above 1, unlikelier ones lower it.
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "chosen_log_sum_sq",
             "rejected_log_sum_sq")
    vals = (policy_chosen_logps, policy_rejected_logps, chosen_log_sum_sq, rejected_log_sum_sq)
    pc = _check_vector(names[0], vals[0], None, None)
    batch, device = pc.shape[0], pc.device
    for name, t in zip(names[1:], vals[1:]):
        _check_vector(name, t, batch, device)
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        _check_vector(name, t, batch, device, allow_int=True)
    dtype = _compute_dtype(*vals)
    with torch.no_grad():
        def mean_aligned(lp: Tensor, sq: Tensor, n: Tensor) -> Tensor:
            return (lp.to(dtype) - sq.to(dtype)) / n.to(dtype).clamp(min=1.0)

        return torch.exp(mean_aligned(policy_chosen_logps, chosen_log_sum_sq, chosen_lengths)
                         + mean_aligned(policy_rejected_logps, rejected_log_sum_sq,
                                        rejected_lengths))
