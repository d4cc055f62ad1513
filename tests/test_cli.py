"""The command line, driven for real in subprocesses: `dpo-fast --help`, `train` through YAML
+ key=value overrides (run directory contents), bad keys / types / files (exit 2, one message,
no traceback), `eval`, `info`, and (slow) the default demo run in a reduced form on the real
model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import tiny_model, tiny_tokenizer, word_rows

ROOT = Path(__file__).resolve().parents[1]


def dpo_fast(*args, cwd=None, timeout=600):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dpo_fast", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny_model().save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in word_rows(40)))
    cfg = {"model": str(d / "model"), "train_data": str(d / "pairs.jsonl"),
           "eval_fraction": 0.2, "output_dir": str(d / "run"), "max_steps": 4,
           "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "max_length": 64,
           "save_steps": 2, "data_cache_dir": ""}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_help_lists_commands_and_every_setting_with_its_default():
    r = dpo_fast("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "info", "precompute"):
        assert cmd in r.stdout
    r = dpo_fast("train", "--help")
    assert r.returncode == 0
    import dataclasses

    from dpo_fast.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in r.stdout, f.name
    assert "Peak learning rate. (type: float, default: 1e-06)" in " ".join(r.stdout.split())


def test_train_from_yaml_with_overrides(setup):
    r = dpo_fast("train", "--config", str(setup / "cfg.yaml"), "max_steps=3", "beta=0.2",
                 "--quiet", "sample_prompts=2")
    assert r.returncode == 0, r.stderr[-3000:]
    run = setup / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["max_steps"] == 3 and cfg["beta"] == 0.2 and cfg["learning_rate"] == 1e-3
    for f in ("metrics.jsonl", "summary.json", "config.json", "model.safetensors",
              "tokenizer.json", "checkpoint-2", "checkpoint-3", "plots/loss.png",
              "plots/reward_margin.png", "plots/reward_accuracy.png", "plots/logps.png"):
        assert (run / f).exists(), f
    assert list((run / "tensorboard").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 3 and len(summary["samples"]) == 2
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3]
    assert "reward accuracy" in r.stdout and "run directory" in r.stdout
    assert "step 3/3: loss" in r.stderr and "Traceback" not in r.stderr
    # a second start in the same folder must say how to continue or overwrite it
    r = dpo_fast("train", "--config", str(setup / "cfg.yaml"), "--quiet")
    assert r.returncode == 1
    assert "resume_from_checkpoint=true" in r.stderr and "Traceback" not in r.stderr
    r = dpo_fast("train", "--config", str(setup / "cfg.yaml"), "--quiet",
                 "resume_from_checkpoint=true", "max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step 4/4" in r.stderr
    # eval against the run's cache, with the data the run saw
    r = dpo_fast("eval", "--model", str(run), "--data", str(setup / "pairs.jsonl"),
                 "--ref-model", str(setup / "model"), "--limit", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout)
    assert m["pairs"] == 6 and 0.0 <= m["eval/rewards/accuracies"] <= 1.0
    assert math.isfinite(m["eval/loss"])


@pytest.mark.parametrize("args,message", [
    (["learning_rat=1"], "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    (["learning_rate=abc"], 'Parser key "learning_rate"'),
    (["beta=-1"], "TrainConfig.beta must be"),
    (["optimizer=sgd"], "optimizer"),
    (["train_data=/nonexistent/pairs.jsonl"], "train_data=/nonexistent/pairs.jsonl: no such "
                                              "file"),
])
def test_bad_command_lines_exit_2_with_one_message(setup, args, message):
    r = dpo_fast("train", "--config", str(setup / "cfg.yaml"), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("error") == 1


def test_unknown_key_and_wrong_type_in_yaml(setup, tmp_path):
    base = yaml.safe_load((setup / "cfg.yaml").read_text())
    for extra, message in (({"learnin_rate": 1}, "unknown key 'learnin_rate' (did you mean "
                                                  "'learning_rate'?)"),
                           ({"batch_size": "many"}, 'Parser key "batch_size"')):
        f = tmp_path / "bad.yaml"
        f.write_text(yaml.safe_dump({**base, **extra}))
        r = dpo_fast("train", "--config", str(f))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_missing_config_file_and_unloadable_model(setup, tmp_path):
    r = dpo_fast("train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such file or preset" in r.stderr
    (tmp_path / "empty_model").mkdir()
    r = dpo_fast("train", "--config", str(setup / "cfg.yaml"),
                 f"model={tmp_path / 'empty_model'}", f"output_dir={tmp_path / 'o'}", "--quiet")
    assert r.returncode == 1 and "cannot load the model" in r.stderr
    assert "Traceback" not in r.stderr


def test_info_names_backends_and_machine():
    r = dpo_fast("info")
    assert r.returncode == 0
    for text in ("dpo_fast", "torch", "C++ CPU kernel", "CUDA", "Triton", "flash-attn",
                 "LoRA (peft)", "cores"):
        assert text in r.stdout


@pytest.mark.slow
def test_default_run_reduced_on_the_real_model(tmp_path):
    # The README's main command with only the run length shortened.
    r = dpo_fast("train", "max_steps=2", "max_eval_samples=8", "sample_prompts=4",
                 "eval_steps=null", "save_steps=null", f"output_dir={tmp_path / 'demo'}",
                 cwd=tmp_path, timeout=1500)
    if r.returncode != 0 and "AssetMissingError" in r.stderr and not os.environ.get("CI"):
        pytest.skip("demo assets unavailable")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert math.isfinite(s["eval_before"][k]) and math.isfinite(s["eval_after"][k])
    assert abs(s["eval_before"]["eval/loss"] - math.log(2)) < 1e-5
    assert math.isfinite(s["sample_score_before"]) and math.isfinite(s["sample_score_after"])
    assert len(s["samples"]) == 4 and all(x["before"] and x["after"] for x in s["samples"])
    for p in ("loss", "reward_margin", "reward_accuracy", "logps"):
        assert (tmp_path / "demo" / "plots" / f"{p}.png").stat().st_size > 1000
    assert "mean sentiment (VADER)" in r.stdout and "reward accuracy" in r.stdout


def test_readme_config_reference_is_generated_from_the_dataclass():
    from dpo_fast.train.config import README_END, README_START, config_reference_markdown

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(README_START) + len(README_START):text.index(README_END)]
    assert block == "\n" + config_reference_markdown(), \
        "README config reference is stale: run dpo_fast.train.config.update_readme('README.md')"
