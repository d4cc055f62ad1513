"""``dpo_fast.trl.DPOTrainer`` against TRL 1.16's ``DPOTrainer``: the same script, data, seed and
settings, step by step (tiny random Llama, word-level tokenizer, 3 steps x 4 pairs).

Per step: the training loss and every metric TRL logs (rewards/*, logps/*, logits/*,
entropy, mean_token_accuracy, num_tokens) within 1e-4 (logps/* sum ~10 tokens of |log p| ~ 5;
within max(1e-4, 1e-5 relative)), for loss types with and without a reference, a weighted
``loss_type`` list, label smoothing, TRL's precompute and LoRA; the fused head ran (counted);
f-divergences, LD-DPO (with precompute: split from dpo_fast's per-token cache) and WPO
(``use_weighting``: log sum p^2 from the fused kernels); a setting outside the fused path runs
TRL's own loss (named in a warning);
precompute through dpo_fast's cache, reused by a second run; an unedited TRL script runs
through ``python -m dpo_fast.trl``; and 2-process DDP keeps every parameter equal on
both ranks. Under CI a missing trl fails.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiny import tiny_model, tiny_tokenizer, word_rows

STEPS = 3
# fp32 throughout (bf16=False: TRL's DPOConfig defaults to bf16 autocast, where the two heads'
# roundings differ by ~1e-2 per sequence); the heads then agree to ~1e-6.
DTYPE = torch.float32
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
           "mean_token_accuracy", "num_tokens")


def _need_trl():
    try:
        import trl
    except ImportError as e:
        if os.environ.get("CI"):
            raise RuntimeError(f"trl unavailable under CI: {e}") from e
        pytest.skip(f"trl unavailable: {e}")
    if trl.__version__ != "1.16.0":
        msg = f"trl {trl.__version__} is installed, the drop-in subclasses 1.16.0"
        if os.environ.get("CI"):
            raise RuntimeError(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    _need_trl()
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model(seed=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _train(cls_name: str, model_dir: Path, out: Path, peft: bool = False, **config):
    """Trains STEPS steps with trl's or dpo_fast.trl's classes; returns (per-step logs,
    trainer)."""
    import datasets
    import transformers

    if cls_name == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from dpo_fast.trl import DPOConfig, DPOTrainer

    logs = []

    class Keep(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                kept.append(dict(logs, step=state.global_step))

    kept = logs
    settings = dict(learning_rate=5e-3, logging_steps=1, report_to="none", save_strategy="no",
                    seed=0, use_cpu=True, bf16=False, dataloader_num_workers=0)
    settings.update(config)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS,
                     **settings)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(word_rows(16, seed=5)),
                         peft_config=peft_config, callbacks=[Keep()])
    trainer.train()
    assert [x["step"] for x in logs] == list(range(1, STEPS + 1))
    return logs, trainer


CASES = {
    "sigmoid": dict(),
    "ipo": dict(loss_type="ipo"),
    "hinge": dict(loss_type="hinge"),
    "list_weighted": dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[1.0, 0.5, 0.3]),
    "robust_smoothed": dict(loss_type="robust", label_smoothing=0.1),
    "sigmoid_smoothing_ignored": dict(label_smoothing=0.2),
    "aot": dict(loss_type="aot"),
    "apo_zero": dict(loss_type="apo_zero"),
    "sigmoid_norm": dict(loss_type="sigmoid_norm"),
    "precompute": dict(precompute_ref_log_probs=True),
    "lora": dict(_peft=True, learning_rate=5e-2),  # LoRA's B starts at 0: a larger step
    "no_grad_ckpt": dict(gradient_checkpointing=False),
    "forward_kl": dict(f_divergence_type="forward_kl"),
    "js_ipo": dict(f_divergence_type="js_divergence", loss_type="ipo"),
    "alpha_hinge": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                        loss_type="hinge"),
    "packed_alpha": dict(padding_free=True, f_divergence_type="alpha_divergence"),
    "ld_alpha": dict(ld_alpha=0.5),
    "ld_alpha_list": dict(ld_alpha=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "ld_alpha_precompute": dict(ld_alpha=0.5, precompute_ref_log_probs=True),
    "packed_ld_alpha": dict(padding_free=True, ld_alpha=0.0),
    "packed_ld_alpha_precompute": dict(padding_free=True, ld_alpha=0.5,
                                       precompute_ref_log_probs=True),
    # WPO: the weights from the same kernel pass (log sum_v p_v^2 per position)
    "wpo": dict(use_weighting=True),
    # (not with sft or hinge: TRL 1.16 multiplies their per-pair losses by the weights in
    # place, which raises for sft's expanded batch loss and for hinge's relu output)
    "wpo_list": dict(use_weighting=True, loss_type=["sigmoid", "bco_pair", "ipo"],
                     loss_weights=[1.0, 0.5, 0.3]),
    "wpo_ld_alpha": dict(use_weighting=True, ld_alpha=0.5),
    "wpo_precompute": dict(use_weighting=True, precompute_ref_log_probs=True),
    "packed_wpo": dict(padding_free=True, use_weighting=True, loss_type="ipo"),
    # padding_free=True: TRL 1.16 switches it off (padded batches); the drop-in packs each
    # micro-batch into one shared-prompt row with segment attention: the same losses.
    "packed": dict(padding_free=True),
    "packed_ipo": dict(padding_free=True, loss_type="ipo"),
    "packed_list_weighted": dict(padding_free=True, loss_type=["sigmoid", "sft", "hinge"],
                                 loss_weights=[1.0, 0.5, 0.3]),
    "packed_precompute": dict(padding_free=True, precompute_ref_log_probs=True),
    "packed_lora": dict(padding_free=True, _peft=True, learning_rate=5e-2),
    "packed_truncated": dict(padding_free=True, max_length=12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_steps_as_trl(model_dir, tmp_path, case, monkeypatch):
    import dpo_fast.trl.trainer as dropin

    calls = []
    real = dropin.sequence_logprobs

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dropin, "sequence_logprobs", counted)
    config = dict(CASES[case])
    peft = config.pop("_peft", False)
    ref, _ = _train("trl", model_dir, tmp_path / "trl", peft=peft, **config)
    got, trainer = _train("dpo_fast", model_dir, tmp_path / "dpo_fast", peft=peft, **config)
    assert trainer.dpo_fast_slow_reason is None
    packed = config.get("padding_free", False)
    assert trainer.dpo_fast_attention == ("packed-segments" if packed else "padded")
    assert trainer.args.padding_free == packed
    # the fused head ran for every step's policy pass (and the packed reference pass)
    live_packed_ref = packed and not config.get("precompute_ref_log_probs", False)
    assert len(calls) == STEPS * (2 if live_packed_ref else 1)
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) <= 1e-4, (r["step"], r["loss"], g["loss"])
        for k in METRICS:
            if k == "rewards/accuracies" and r["rewards/chosen"] == r["rewards/rejected"] == 0:
                # policy == reference in TRL (step 1): exact ties, which a reference computed
                # another way (packed vs padded rows) breaks by rounding noise
                continue
            tol = max(1e-4, 1e-5 * abs(r[k])) if k.startswith("logps/") else 1e-4
            assert abs(r[k] - g[k]) <= tol, (r["step"], k, r[k], g[k])
    # The policy trained: a later step's loss differs from step 1's.
    assert abs(got[-1]["loss"] - got[0]["loss"]) > 1e-3


def test_precompute_fills_and_reuses_the_cache(model_dir, tmp_path):
    """precompute_ref_log_probs=True fills dpo_fast's on-disk cache (default
    <output_dir>/ref_cache, or ref_cache_dir); a second run computes no row and trains the same
    steps."""
    first, t1 = _train("dpo_fast", model_dir, tmp_path / "run", precompute_ref_log_probs=True)
    assert (tmp_path / "run" / "ref_cache" / "manifest.json").is_file()
    assert t1.dpo_fast_ref_cache.last_build.rows_computed == 16
    again, t2 = _train("dpo_fast", model_dir, tmp_path / "run", precompute_ref_log_probs=True)
    assert t2.dpo_fast_ref_cache.last_build.rows_computed == 0
    assert [x["loss"] for x in again] == [x["loss"] for x in first]
    other, t3 = _train("dpo_fast", model_dir, tmp_path / "run2", precompute_ref_log_probs=True,
                       ref_cache_dir=str(tmp_path / "run" / "ref_cache"))
    assert t3.dpo_fast_ref_cache.last_build.rows_computed == 0
    assert not (tmp_path / "run2" / "ref_cache").exists()


def test_ld_alpha_precompute_splits_the_per_token_cache(model_dir, tmp_path):
    """ld_alpha with precompute_ref_log_probs: the reference comes from dpo_fast's cache built
    with per-token values (split at each pair's shared length), reused by a second run."""
    first, t1 = _train("dpo_fast", model_dir, tmp_path / "run", ld_alpha=0.5,
                       precompute_ref_log_probs=True)
    assert t1.dpo_fast_ref_cache.per_token
    assert t1.dpo_fast_ref_cache.last_build.rows_computed == 16
    again, t2 = _train("dpo_fast", model_dir, tmp_path / "run", ld_alpha=0.5,
                       precompute_ref_log_probs=True)
    assert t2.dpo_fast_ref_cache.last_build.rows_computed == 0
    assert [x["loss"] for x in again] == [x["loss"] for x in first]


def test_outside_fused_path_runs_trls_loss(tmp_path, caplog):
    """A soft-capped head (config.final_logit_softcapping, whose capped logits TRL's logits/*
    metrics average) takes TRL's own loss, named in a warning: TRL's numbers exactly."""
    _need_trl()
    capped = tmp_path / "capped"
    tiny_model(seed=3, final_logit_softcapping=30.0).save_pretrained(capped)
    tiny_tokenizer().save_pretrained(capped)
    ref, _ = _train("trl", capped, tmp_path / "trl")
    with caplog.at_level(logging.WARNING, logger="dpo_fast.trl.trainer"):
        got, trainer = _train("dpo_fast", capped, tmp_path / "dpo_fast")
    assert trainer.dpo_fast_slow_reason.startswith("final_logit_softcapping")
    assert "final_logit_softcapping" in caplog.text and "TRL's own loss" in caplog.text
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) <= 1e-6


def test_refuses_loss_types_trl_lacks(model_dir, tmp_path):
    with pytest.raises(ValueError, match="simpo"):
        _train("dpo_fast", model_dir, tmp_path, loss_type="simpo")


SCRIPT = textwrap.dedent("""
    # A TRL 1.16 DPO script as users write it: nothing of dpo_fast in it.
    import sys
    import datasets, transformers
    from trl import DPOConfig, DPOTrainer
    sys.path.insert(0, {tests!r})
    from tiny import word_rows

    model_dir, out = sys.argv[1], sys.argv[2]
    args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=2,
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True)
    trainer = DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                         args=args,
                         processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
                         train_dataset=datasets.Dataset.from_list(word_rows(8)))
    trainer.train()
    print("TRAINER", type(trainer).__module__, trainer.state.global_step)
""")


def test_unedited_script_through_python_m(model_dir, tmp_path):
    script = tmp_path / "train_dpo.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "dpo_fast.trl", str(script), str(model_dir),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINER dpo_fast.trl.trainer 2" in proc.stdout
    # The same script without the runner gets TRL's own class.
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "o2")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINER trl.trainer.dpo_trainer 2" in proc.stdout


def test_python_m_without_script():
    proc = subprocess.run([sys.executable, "-m", "dpo_fast.trl", "no_such_script.py"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no_such_script.py" in proc.stderr


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp(model_dir, out, launcher, dropin, packed=False, precompute=False):
    """The DDP script on 2 CPU processes (gloo); returns (per-rank records, rank 0's losses)."""
    tests = Path(__file__).resolve().parent
    script = [str(tests / "trl_ddp_script.py"), str(model_dir), str(out)] + \
        (["packed"] if packed else []) + (["precompute"] if precompute else [])
    entry = ["-m", "dpo_fast.trl", *script] if dropin else script
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *entry]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
               "--dynamo_backend=no", f"--main_process_port={_free_port()}", *entry]
        if not dropin:
            raise ValueError("accelerate runs the drop-in only")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import json

    ranks = [[json.loads(x) for x in (out / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    return ranks, {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}


@pytest.mark.slow
@pytest.mark.parametrize("launcher,packed,precompute", [
    ("torchrun", False, False), ("accelerate", False, False), ("torchrun", True, False),
    ("torchrun", True, True)])
def test_ddp_keeps_ranks_in_sync(model_dir, tmp_path, launcher, packed, precompute):
    """TRL #7245's check: under 2-process DDP every parameter is equal on both ranks after every
    step (digests of all parameters), while the ranks trained on different batches; the per-step
    losses equal TRL's own DDP run's (padded; the drop-in also with padding_free=True, and with
    the reference precomputed into dpo_fast's cache by both ranks). TRL's run keeps its live
    reference (the same values in fp32): TRL 1.16's own precompute fails under 2 processes with
    an in-memory dataset (rank 1 looks for rank 0's temporary arrow file)."""
    ref_ranks, ref_losses = _ddp(model_dir, tmp_path / "trl", "torchrun", dropin=False)
    ranks, losses = _ddp(model_dir, tmp_path / "dropin", launcher, dropin=True, packed=packed,
                         precompute=precompute)
    if precompute:
        assert (tmp_path / "dropin" / "run" / "ref_cache" / "manifest.json").is_file()
    assert all(r["attention"] == ("packed-segments" if packed else "padded") for r in ranks[0])
    for recs, module in ((ref_ranks, "trl.trainer.dpo_trainer"),
                         (ranks, "dpo_fast.trl.trainer")):
        assert [r["step"] for r in recs[0]] == [1, 2, 3] == [r["step"] for r in recs[1]]
        for a, b in zip(*recs):
            assert a["wrapped"] == "DistributedDataParallel" and a["trainer"] == module
            assert a["batch"] != b["batch"]  # different data on each rank ...
            assert a["params"] == b["params"]  # ... and the same parameters after the step
    assert all(r["slow_reason"] is None for r in ranks[0])
    assert ranks[0][-1]["params"] != ranks[0][0]["params"]
    assert sorted(losses) == [1, 2, 3] == sorted(ref_losses)
    for k in losses:
        assert abs(losses[k] - ref_losses[k]) <= 1e-4, (k, losses[k], ref_losses[k])
