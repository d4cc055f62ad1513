"""``dpo-fast train``: a DPO run from a :class:`dpo_fast.train.TrainConfig`, and the
end-of-run report.

The config is parsed with jsonargparse: a YAML file or a named preset (``--config``), then
``key=value`` overrides (or ``--key value``), each checked against the field's type. Without
``--config`` the base is the ``demo`` preset (the bundled SmolLM2 + Rotten Tomatoes run) only
while the command line names neither ``model`` nor ``train_data``; a user's own run starts
from TrainConfig's defaults and inherits nothing from the demo.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..data import DATA_SUFFIXES
from .errors import EXIT_USAGE, CliError

NAME = "train"
HELP = ("train a model with DPO (no arguments: the demo run; `dpo-fast train --help` lists "
        "every setting)")
PRESETS_DIR = Path(__file__).parent.parent / "configs"
DEFAULT_PRESET = "demo"


def presets() -> Dict[str, Path]:
    """Named configs shipped with the package: name -> YAML path."""
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def parser():
    """The jsonargparse parser of ``dpo-fast train`` (every TrainConfig field)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    from ..train import TrainConfig

    p = ArgumentParser(
        prog="dpo-fast train", formatter_class=DefaultHelpFormatter, exit_on_error=False,
        allow_abbrev=False,
        description="Train a causal LM with DPO (or another preference loss). With no "
                    "arguments: the demo run (SmolLM2-135M-Instruct learns to prefer fresh "
                    "over rotten Rotten Tomatoes reviews; about 10 minutes on 2 CPU cores). "
                    "Settings come from --config (a YAML file or a preset: "
                    f"{', '.join(presets())}) and key=value overrides, e.g. "
                    "`dpo-fast train --config my.yaml learning_rate=5e-7 max_steps=200`. "
                    "Once model or train_data is given, the defaults below are the base "
                    "(nothing comes from the demo).")
    p.add_argument("--config", action=ActionConfigFile,
                   help=f"YAML file or preset name ({', '.join(presets())}); default: the "
                        f"{DEFAULT_PRESET} preset when neither --config nor model / train_data "
                        "is given, else the defaults below")
    p.add_argument("--quiet", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_class_arguments(TrainConfig, nested_key=None, as_group=False)
    p.set_defaults(report_to=["plots", "tensorboard"])
    return p


#: Naming one of these on the command line makes it the user's own run: its base is then
#: TrainConfig's defaults, not the demo preset.
OWN_RUN_KEYS = ("model", "train_data")


def _named_keys(argv: List[str]) -> List[str]:
    """The TrainConfig keys a command line sets (``key=value``, ``--key=value``, ``--key v``)."""
    keys = []
    for i, a in enumerate(argv):
        if a.startswith("--") and a not in ("--config", "--quiet", "--debug", "--help"):
            keys.append(a[2:].split("=", 1)[0])
        elif not a.startswith("-") and "=" in a and (i == 0 or argv[i - 1] != "--config"):
            keys.append(a.split("=", 1)[0].strip())
    return [k.replace("-", "_") for k in keys]


def _expand(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """``key=value`` -> ``--key=value``; a preset name after ``--config`` -> its YAML path.
    With no ``--config``, the demo preset is the base only when the command line names
    neither ``model`` nor ``train_data`` (``dpo-fast train``, ``dpo-fast train
    max_steps=10``); a user's own run starts from TrainConfig's defaults. Returns the
    expanded arguments and the preset they start from (None: a file or the defaults)."""
    out: List[str] = []
    names = presets()
    base: Optional[str] = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            v = argv[i + 1]
            out += ["--config", str(names[v]) if v in names else v]
            if v not in names and not Path(v).is_file():
                raise CliError(f"--config {v}: no such file or preset (presets: "
                               f"{', '.join(names)})", code=EXIT_USAGE)
            base = v if v in names else base
            i += 2
            continue
        if a.startswith("--config="):
            v = a.split("=", 1)[1]
            out.append("--config=" + (str(names[v]) if v in names else v))
            base = v if v in names else base
        elif not a.startswith("-") and "=" in a:
            k, v = a.split("=", 1)
            out.append(f"--{k.strip()}={v}")
        else:
            out.append(a)
        i += 1
    given_config = any(a == "--config" or a.startswith("--config=") for a in out)
    own_run = any(k in OWN_RUN_KEYS for k in _named_keys(argv))
    if not given_config and not own_run and not any(a in ("-h", "--help") for a in out):
        out = ["--config", str(names[DEFAULT_PRESET])] + out
        base = DEFAULT_PRESET
    return out, base


def parse_train_args(argv: List[str]):
    """(TrainConfig, quiet, debug) from a ``dpo-fast train`` command line; CliError (status 2)
    for an unknown key, a wrong type, a bad value or a missing data file.

    The demo preset may start over in its own folder (its ``overwrite_output_dir``); moved
    to another ``output_dir`` it refuses a folder holding an earlier run, as every other run
    does, unless ``overwrite_output_dir`` is given."""
    from jsonargparse import ArgumentError

    from ..train import TrainConfig

    expanded, base = _expand(argv)
    try:
        ns = parser().parse_args(expanded)
    except ArgumentError as e:
        raise CliError(_one_line_jsonargparse(str(e)), code=EXIT_USAGE) from None
    d = ns.as_dict()
    quiet, debug = d.pop("quiet"), d.pop("debug")
    d.pop("config", None)
    d.pop("__path__", None)
    named = set(_named_keys(argv))
    if base is not None and "output_dir" in named and "overwrite_output_dir" not in named:
        d["overwrite_output_dir"] = False
    cfg = TrainConfig(**d)
    try:
        cfg.validate()
    except ValueError as e:
        raise CliError(str(e), code=EXIT_USAGE) from None
    for what in ("train_data", "eval_data"):
        v = getattr(cfg, what)
        if isinstance(v, str) and v.lower().endswith(DATA_SUFFIXES) and not Path(v).is_file():
            raise CliError(f"{what}={v}: no such file", code=EXIT_USAGE)
    return cfg, quiet, debug


def _one_line_jsonargparse(text: str) -> str:
    """jsonargparse's error as one line; an unknown key gets a did-you-mean."""
    import dataclasses
    import difflib
    import re

    from ..train import TrainConfig

    text = " ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
    keys: List[str] = []
    if "nrecognized arguments:" in text:
        bad = text.split("rguments:", 1)[1].split()
        keys = [b.split("=", 1)[0].lstrip("-") for b in bad if b.startswith("--")] or bad
    keys += re.findall(r"Option '([^']+)' is not accepted", text)
    if not keys:
        return text
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    hints = []
    for k in keys:
        m = difflib.get_close_matches(k, fields, 1)
        hints.append(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else ""))
    return f"unknown key {', '.join(hints)}; `dpo-fast train --help` lists every key"


def parse(argv: List[str]) -> argparse.Namespace:
    """The command line, parsed when the command runs (:func:`parse_train_args`: its errors
    exit with status 2 through the error map); ``debug`` is known at once."""
    return argparse.Namespace(argv=list(argv), debug="--debug" in argv)


def run(args: argparse.Namespace, err: TextIO, state: Dict[str, Any]) -> int:
    """Runs ``dpo-fast train``; returns the exit status."""
    cfg, quiet, _ = parse_train_args(args.argv)
    from ..train import ProgressCallback, Trainer

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    callbacks = [] if quiet or not main else [ProgressCallback(err)]
    if quiet and main:
        callbacks.append(_LogLines(err))
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, callbacks=callbacks)
    try:
        res = trainer.train()
    finally:
        from ..train.distributed import teardown

        teardown(trainer.dist)
    err.flush()
    if main:
        from ..losses import NO_REFERENCE_TYPES

        losses = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
        ref_is_policy = cfg.ref_model is None and not all(
            t in NO_REFERENCE_TYPES for t in losses)
        sys.stdout.write(report(res, time.perf_counter() - t0, ref_is_policy))
        sys.stdout.flush()
    return 0


def interrupted(state: Dict[str, Any]) -> str:
    """What to do after Ctrl-C."""
    return ("interrupted; for train, `resume_from_checkpoint=true` continues from the last "
            "checkpoint")


class _LogLines:
    """--quiet: stage messages and one line per log / eval, no bars."""

    def __init__(self, stream: TextIO):
        self.s = stream

    def __getattr__(self, name):  # the hooks it does not handle
        return lambda *a, **k: None

    def on_stage(self, trainer, message):
        self.s.write(f"dpo-fast: {message}\n")

    def on_log(self, trainer, state, logs):
        self.s.write(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                     f"margin {logs['rewards/margins']:.4f}, accuracy "
                     f"{logs['rewards/accuracies']:.3f}, "
                     f"{logs['train_tokens_per_second']:,.0f} tok/s\n")

    def on_evaluate(self, trainer, state, m):
        self.s.write(f"eval at step {state.global_step}: loss {m['eval/loss']:.4f}, reward "
                     f"accuracy {m['eval/rewards/accuracies']:.3f}, margin "
                     f"{m['eval/rewards/margins']:.4f}\n")


def report(res, seconds: float, reference_is_policy: bool = False) -> str:
    """The end-of-run report: held-out metrics before / after, sample scores, samples, files.

    ``reference_is_policy``: the reference model is the initial policy (no ``ref_model``, a
    loss with a reference term), so before training every pair's true margin is 0 and the
    "before" reward accuracy only counts fp32 rounding; the report says so."""
    lines = ["", f"dpo-fast train: {res.global_step} steps in {seconds / 60:.1f} min "
                 f"({res.tokens_per_second:,.0f} tokens/s training, peak memory "
                 f"{res.peak_memory_mb / 1024:.2f} GiB, attention {res.attention})"]
    if res.cpu_threads and "fewer" in res.cpu_threads:
        lines.append(f"  CPU threads: {res.cpu_threads}")
    if res.interrupted:
        lines.append(f"  interrupted: checkpoint {res.checkpoint}; resume with "
                     "resume_from_checkpoint=true")
    b, a = res.eval_before, res.eval_after
    if b and a:
        lines.append(f"  held-out ({res.eval_pairs} pairs)      before    after")
        for k, name in (("eval/rewards/accuracies", "reward accuracy"),
                        ("eval/rewards/margins", "reward margin"), ("eval/loss", "DPO loss")):
            tie = "*" if reference_is_policy and k == "eval/rewards/accuracies" else " "
            lines.append(f"    {name:<24}{b[k]:>8.3f}{tie}{a[k]:>8.3f}")
        if reference_is_policy:
            lines.append("    * before training the policy is the reference model, so every "
                         "margin is 0 up to fp32 rounding (the reference values were computed "
                         "in other batches) and the pairs are ties: TRL counts them 0, and "
                         "this 'before' accuracy counts rounding noise")
    if res.sample_score_before is not None and res.sample_score_after is not None:
        lines.append(f"  mean sentiment (VADER) of {len(res.samples)} sampled reviews of unseen "
                     f"movies: {res.sample_score_before:+.3f} -> {res.sample_score_after:+.3f}")
    for s in res.samples[:3]:
        lines.append(f"    {s['prompt']}")
        for when in ("before", "after"):
            if when in s:
                sc = f" [{s['score_' + when]:+.2f}]" if f"score_{when}" in s else ""
                lines.append(f"      {when:<7}{sc} {s[when][:150]}")
    if res.skipped_rows:
        lines.append(f"  skipped rows: {res.skipped_rows}")
    out = Path(res.output_dir)
    lines.append(f"  run directory: {out}")
    lines.append(f"    model: {res.model_dir or '(not saved)'}; metrics: {out / 'metrics.jsonl'}; "
                 f"summary: {out / 'summary.json'}")
    plots = sorted((out / "plots").glob("*.png")) if (out / "plots").is_dir() else []
    if plots:
        lines.append(f"    plots: {', '.join(str(p) for p in plots)}")
    if (out / "tensorboard").is_dir():
        lines.append(f"    tensorboard: tensorboard --logdir {out / 'tensorboard'}")
    return "\n".join(lines) + "\n"
