"""``dpo-fast eval``: held-out DPO loss, reward accuracy and margin of a (trained) model on
preference pairs against the reference cache; optionally sampled responses and their scores.
A run directory written by ``dpo-fast train`` supplies its settings (``config.yaml``) and
reference cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, TextIO

from ..data import DATA_SUFFIXES
from .errors import EXIT_USAGE, CliError

NAME = "eval"
HELP = "held-out DPO loss, reward accuracy and margin of a model"


def parser() -> argparse.ArgumentParser:
    """The parser of ``dpo-fast eval``."""
    p = argparse.ArgumentParser(
        prog=f"dpo-fast {NAME}",
        description="Evaluate a (trained) model on preference pairs against the reference "
                    "cache: DPO loss, implicit-reward accuracy and margin; optionally sample "
                    "responses and score them. A run directory written by `dpo-fast train` "
                    "supplies its settings (config.yaml) and reference cache.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model folder (e.g. a train run's output_dir)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="pairs: a data file or bundled:rotten-tomatoes/eval")
    p.add_argument("--ref-cache", metavar="DIR", default=None,
                   help="reference cache (default: <model>/ref_cache, or the run config's)")
    p.add_argument("--ref-model", metavar="DIR", default=None,
                   help="compute missing reference values with this model")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N pairs")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="also sample one response for N prompts")
    p.add_argument("--scorer", choices=("vader",), default=None, help="score the samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def parse(argv: List[str]) -> argparse.Namespace:
    """The arguments (argparse exits with status 2 on a bad command line)."""
    return parser().parse_args(argv)


def run(args: argparse.Namespace, err: TextIO, state: Dict[str, Any]) -> int:
    """Runs ``dpo-fast eval``: the metrics as JSON on stdout, samples on ``err``."""
    import yaml

    from ..train import TrainConfig, Trainer

    model_dir = Path(args.model)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise CliError(f"--model {args.model}: not a model folder (no config.json)",
                       code=EXIT_USAGE)
    if args.data.lower().endswith(DATA_SUFFIXES) and not Path(args.data).is_file():
        raise CliError(f"--data {args.data}: no such file", code=EXIT_USAGE)
    run: Dict[str, Any] = {}
    if (model_dir / "config.yaml").is_file():
        run = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    keep = ("max_length", "beta", "loss_type", "loss_weights", "label_smoothing", "rpo_alpha",
            "prompt_column", "chosen_column", "rejected_column", "truncation_mode",
            "simpo_gamma", "cpo_alpha", "orpo_lambda", "discopop_tau", "unlikelihood_alpha",
            "f_divergence_type", "f_alpha_divergence_coef", "ld_alpha", "use_weighting",
            "seed",
            "sample_max_new_tokens", "sample_temperature")
    cfg = TrainConfig(**{k: run[k] for k in keep if k in run})
    cfg.model, cfg.train_data, cfg.eval_data = str(model_dir), args.data, args.data
    cfg.max_eval_samples = args.limit
    cfg.device = args.device
    cfg.output_dir = str(model_dir)
    cfg.sample_prompts, cfg.sample_scorer = args.samples, args.scorer
    ref_dir = args.ref_cache or (str(model_dir / "ref_cache") if (model_dir / "ref_cache")
                                 .is_dir() else run.get("ref_cache_dir"))
    t = Trainer(cfg.validate())
    m = t.evaluate_against_cache(ref_dir, ref_model=args.ref_model)
    out = {k: v for k, v in m.items() if k != "samples"}
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    for s in m.get("samples", [])[:5]:
        sc = f" [{s['score']:+.2f}]" if "score" in s else ""
        err.write(f"  {s['prompt']}\n    ->{sc} {s['response'][:150]}\n")
    return 0


def interrupted(state: Dict[str, Any]) -> str:
    """What Ctrl-C left: nothing to resume."""
    return "interrupted"
