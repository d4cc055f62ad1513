"""benchmarks/repro_sentiment.py: the paper's controlled-sentiment experiment in miniature.

The pieces are checked against independent answers (pair formation, the Best-of-N estimator,
the KL's log-probs against a float64 forward of a tiny model); the ``--smoke`` run (slow:
real SmolLM2 and Rotten Tomatoes, about a minute) runs every method end to end.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import tiny_model, tiny_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import repro_sentiment as rs  # noqa: E402


def test_ordered_pairs_form_every_pair_with_the_higher_reward_chosen():
    comps = ["a", "b", "c", "d"]
    rows, dropped = rs.ordered_pairs("p", comps, [0.1, -0.5, 0.9, 0.3])
    assert dropped == 0 and len(rows) == 6
    got = {(r["chosen"], r["rejected"]) for r in rows}
    assert got == {("a", "b"), ("c", "a"), ("d", "a"), ("c", "b"),
                   ("d", "b"), ("c", "d")}
    assert all(r["chosen_reward"] > r["rejected_reward"] and r["prompt"] == "p" for r in rows)


def test_ordered_pairs_leave_out_ties_and_identical_text():
    rows, dropped = rs.ordered_pairs("p", ["x", "y", "x", "z"], [0.0, 0.0, 0.5, 0.7])
    # (x, y) tie; (x, x) identical text; 4 pairs left.
    assert dropped == 2 and len(rows) == 4
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_best_of_n_known_answers():
    r = np.array([[0.1, 0.5, -0.2, 0.4], [0.0, -1.0, 0.3, 0.2]])
    assert rs.best_of_n(r, 1) == pytest.approx(r.mean())
    assert rs.best_of_n(r, 4) == pytest.approx((0.5 + 0.3) / 2)
    assert rs.best_of_n(r, 2) == pytest.approx((0.5 + 0.4 + 0.0 + 0.3) / 4)
    with pytest.raises(ValueError, match="n=8"):
        rs.best_of_n(r, 8)


def test_best_of_n_estimates_the_expected_maximum():
    # Uniform(0, 1) rewards: E[max of n] = n / (n + 1). 20,000 prompts x 64 samples.
    r = np.random.default_rng(0).random((20000, 64))
    for n in (1, 4, 16, 64):
        assert abs(rs.best_of_n(r, n) - n / (n + 1)) < 3e-3, n


def test_best_of_n_kl_formula():
    assert rs.best_of_n_kl(1) == 0.0
    assert rs.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert rs.best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_frontier_table_takes_the_best_reward_within_each_kl_budget():
    pts = [{"family": "A", "kl": 0.2, "reward": 0.1}, {"family": "A", "kl": 3.0, "reward": 0.6},
           {"family": "A", "kl": 1.5, "reward": 0.3}, {"family": "B", "kl": 9.0, "reward": 0.9}]
    t = rs.frontier_table(pts, bins=(0.5, 2.0, 4.0, 16.0))
    assert t["A"] == {"0.5": 0.1, "2": 0.3, "4": 0.6, "16": 0.6}
    assert t["B"] == {"0.5": None, "2": None, "4": None, "16": 0.9}


def _oracle_logp(model, prompt_ids, completion):
    """float64 log p(completion | prompt), one unpadded sequence, by hand."""
    m = model.double()
    ids = torch.tensor([list(prompt_ids) + list(completion)])
    with torch.no_grad():
        lp = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)
    m.float()
    n = len(prompt_ids)
    return sum(float(lp[n - 1 + t, c]) for t, c in enumerate(completion))


def test_sample_logps_and_sequence_logps_match_a_float64_oracle():
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    prompts = ["the movie was", "a film", "the plot of the movie is very"]
    texts, ids, lps = rs.sample(model, tok, prompts, n=3, max_new_tokens=6, seed=5,
                                batch_size=4)
    assert [len(t) for t in texts] == [3, 3, 3]
    flat_p = [p for p in prompts for _ in range(3)]
    flat_ids = list(itertools.chain.from_iterable(ids))
    flat_lps = list(itertools.chain.from_iterable(lps))
    eos = tok.eos_token_id
    for c in flat_ids:  # cut at the first end-of-sequence token, which is kept
        assert 1 <= len(c) <= 6
        assert eos not in c[:-1].tolist()
    again = rs.sequence_logps(model, tok, flat_p, flat_ids, batch_size=5)
    for p, c, a, b in zip(flat_p, flat_ids, flat_lps, again):
        truth = _oracle_logp(model, tok(p)["input_ids"], c.tolist())
        assert abs(a - truth) <= 1e-4 * max(1.0, abs(truth)), (a, truth)  # generate's logits
        assert abs(b - truth) <= 1e-4 * max(1.0, abs(truth)), (b, truth)  # right-padded batch


def test_sampling_is_seeded_and_leaves_the_rng_alone():
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = rs.sample(model, tok, ["the movie"], n=4, max_new_tokens=5, seed=9)
    assert torch.equal(torch.get_rng_state(), before)
    b = rs.sample(model, tok, ["the movie"], n=4, max_new_tokens=5, seed=9)
    assert a[0] == b[0] and a[2] == b[2]


def test_prompts_split_by_movie():
    tok = tiny_tokenizer()
    reviews = [{"category": c, "movie_name": f"m{i % 7}",
                "text": f"the movie {i} was great fun and not dull at all"}
               for i, c in zip(range(70), itertools.cycle(["fresh", "rotten", "plot"]))]
    train, held = rs.make_prompts(tok, reviews, 20, 5, seed=0, eval_fraction=0.3)
    assert len(train) == 20 and 1 <= len(held) <= 5
    assert not {p.movie for p in train} & {p.movie for p in held}
    for p in train + held:
        assert p.text.endswith(p.prefix) and 2 <= len(p.prefix.split()) <= 5


@pytest.mark.slow
def test_smoke_run_trains_every_method(tmp_path):
    from dpo_fast.assets import AssetMissingError, rotten_tomatoes_reviews, smollm2_dir

    try:
        smollm2_dir()
        rotten_tomatoes_reviews()
        import vaderSentiment  # noqa: F401
    except (AssetMissingError, ImportError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real-model assets unavailable: {e}")
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, str(BENCH / "repro_sentiment.py"), "--smoke",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "sentiment.json").read_text())
    assert abs(res["sft"]["kl"]) < 1e-3  # the SFT policy against itself
    fams = {p["family"] for p in res["points"]}
    assert fams == {"DPO", "Preferred-FT", "Unlikelihood", "Best-of-N (true reward)"}
    trained = [p for p in res["points"] if p["step"] > 0]
    assert {p["method"] for p in trained} == {"dpo_beta0.1", "preferred_ft",
                                              "unlikelihood_alpha1"}
    assert all(p["step"] in (1, 2) for p in trained)
    for p in res["points"]:
        assert -1.0 <= p["reward"] <= 1.0 and math.isfinite(p["kl"])
    assert res["data"]["pairs"] > 0 and res["data"]["pairs_trained_per_method"] == 8
    assert set(res["frontier"]) == fams
    assert (out / "sentiment.png").stat().st_size > 10_000
    assert "| DPO |" in (out / "sentiment.md").read_text()
