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
                 "LoRA (peft)", "cores", "packed attention segments on cpu: PyTorch's CPU "
                 "flash kernel per segment (softcap / short windows: chunked)"):
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


# ----------------------------------------------------------------- the README's own commands


def readme_commands(heading):
    """The ``dpo-fast`` command lines of the first bash block under ``heading`` in the README,
    continuation lines joined and trailing comments dropped, as shell words."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    return [shlex.split(ln, comments=True) for ln in block.splitlines() if ln.strip()]


def run_readme_command(words, cwd, subs, timeout=900):
    """Runs one README command in ``cwd`` with the placeholders in ``subs`` (a user's model
    folder and files) replaced, through the installed ``dpo-fast`` entry point (CI installs
    it; elsewhere ``python -m dpo_fast`` stands in when it is not on PATH)."""
    import shutil

    assert words[0] == "dpo-fast", words
    words = [subs.get(w, w) if "=" not in w else
             w.split("=", 1)[0] + "=" + subs.get(w.split("=", 1)[1], w.split("=", 1)[1])
             for w in words]
    exe = shutil.which("dpo-fast")
    if exe is None and os.environ.get("CI"):
        raise AssertionError("the dpo-fast entry point is not installed")
    cmd = [exe] if exe else [sys.executable, "-m", "dpo_fast"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", DPO_FAST_CACHE=str(cwd / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd + words[1:], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _own_run_folder(tmp_path):
    (tmp_path / "path" / "to").mkdir(parents=True)
    tiny_model().save_pretrained(tmp_path / "path" / "to" / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "path" / "to" / "model")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in word_rows(60)))
    return {"path/to/model": str(tmp_path / "path" / "to" / "model")}


def _assert_only_asked_for(cfg_yaml, words):
    """Every setting of a run's config.yaml is what its command line named or the default
    (the command line's own default for report_to): nothing came from the demo preset."""
    import dataclasses

    from dpo_fast.train import TrainConfig

    named = {w.split("=", 1)[0] for w in words[2:] if "=" in w}
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "report_to":
            default = ["plots", "tensorboard"]
        if f.name not in named:
            assert cfg_yaml[f.name] == default, (f.name, cfg_yaml[f.name], default)


def test_readme_own_model_and_data_commands_work_as_written(tmp_path):
    cmds = readme_commands("### Your own model and data")
    train, from_yaml, help_ = cmds
    assert "eval_fraction=0.05" in train and "output_dir=runs/mine" in train
    subs = _own_run_folder(tmp_path)
    r = run_readme_command(train, tmp_path, subs)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "mine"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    _assert_only_asked_for(cfg, train)
    assert cfg["eval_data"] is None and cfg["sample_prompts"] == 0 and cfg["eval_fraction"] == 0.05
    assert cfg["max_steps"] == 1000 and cfg["output_dir"] == "runs/mine"
    assert (run / "model.safetensors").is_file()
    assert "bundled" not in (run / "config.yaml").read_text()
    assert "rotten" not in r.stdout.lower() and "sentiment" not in r.stdout.lower()
    # the same command again refuses the folder of the earlier run
    r = run_readme_command(train, tmp_path, subs)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "holds an earlier run" in r.stderr and "resume_from_checkpoint=true" in r.stderr
    assert "Traceback" not in r.stderr
    # without eval_fraction: no held-out set at all, still nothing from the demo
    plain = [w for w in train if not w.startswith(("eval_fraction=", "max_steps=", "output_dir="))]
    plain += ["max_steps=20", "output_dir=runs/plain"]
    r = run_readme_command(plain, tmp_path, subs)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "runs" / "plain" / "config.yaml").read_text())
    _assert_only_asked_for(cfg, plain)
    assert "held-out" not in r.stdout
    # the YAML form with an override on top
    assert from_yaml[:3] == ["dpo-fast", "train", "--config"] and from_yaml[4] == "beta=0.05"
    (tmp_path / from_yaml[3]).write_text(yaml.safe_dump(
        {"model": subs["path/to/model"], "train_data": "pairs.jsonl", "output_dir": "runs/yaml",
         "max_steps": 3, "beta": 0.2}))
    r = run_readme_command(from_yaml, tmp_path, subs)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "runs" / "yaml" / "config.yaml").read_text())
    assert cfg["beta"] == 0.05 and cfg["max_steps"] == 3 and cfg["eval_data"] is None
    r = run_readme_command(help_, tmp_path, subs)
    assert r.returncode == 0 and "--eval_fraction" in r.stdout


def test_demo_is_the_base_only_without_a_model_or_data(tmp_path):
    from dpo_fast.cli import CliError
    from dpo_fast.cli.train import parse_train_args
    from dpo_fast.train import TrainConfig

    demo, _, _ = parse_train_args([])
    assert demo.model == "bundled:smollm2-135m-instruct" and demo.sample_prompts == 32
    assert demo.output_dir == "runs/demo" and demo.overwrite_output_dir  # its own folder
    shorter, _, _ = parse_train_args(["max_steps=5"])  # still the demo, shortened
    assert shorter.eval_data == demo.eval_data and shorter.max_steps == 5
    moved, _, _ = parse_train_args(["output_dir=elsewhere"])  # the demo in another folder
    assert moved.sample_prompts == 32 and not moved.overwrite_output_dir
    asked, _, _ = parse_train_args(["output_dir=elsewhere", "overwrite_output_dir=true"])
    assert asked.overwrite_output_dir
    explicit, _, _ = parse_train_args(["--config", "demo", "output_dir=x"])
    assert explicit.sample_prompts == 32 and not explicit.overwrite_output_dir
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    for argv in (["model=m", f"train_data={data}"], ["--model", "m", "--train_data", str(data)],
                 ["--model=m", f"train_data={data}"]):
        own, _, _ = parse_train_args(argv)
        defaults = TrainConfig(model="m", train_data=str(data),
                               report_to=["plots", "tensorboard"])
        assert own == defaults, argv
    # naming only one of them is an own run too: the demo does not fill in the other
    with pytest.raises(CliError, match="train_data is required"):
        parse_train_args(["model=m"])
    with pytest.raises(CliError, match="model"):
        parse_train_args([f"train_data={data}"])
