"""Run reports (dpo_fast.train.report): PNG plots of metrics.jsonl, the TensorBoard and plot
callbacks, driven by synthetic metrics and fake trainer / state objects (no model)."""

import importlib
import importlib.util
import json
import os
import time
import warnings
from types import SimpleNamespace

import pytest

from dpo_fast.train import report
from dpo_fast.train.callbacks import TrainerCallback

PLOT_NAMES = ["loss.png", "reward_margin.png", "reward_accuracy.png", "logps.png"]
METRIC_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "entropy",
                "mean_token_accuracy"]


def need(name: str):
    """The module, or a skip when it is not installed -- except under CI, where a missing
    package must fail the test."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def metric_values(step: int, prefix: str = "") -> dict:
    m = 0.05 * step
    vals = {
        "loss": 0.6931 - 0.02 * step,
        "rewards/chosen": m / 2,
        "rewards/rejected": -m / 2,
        "rewards/margins": m,
        "rewards/accuracies": min(1.0, 0.5 + 0.05 * step),
        "logps/chosen": -120.0 + step,
        "logps/rejected": -130.0 - step,
        "entropy": 2.5,
        "mean_token_accuracy": 0.4,
    }
    return {prefix + k: v for k, v in vals.items()}


def train_line(step: int) -> dict:
    return {"step": step, "epoch": step / 10, **metric_values(step), "grad_norm": 1.0 / step,
            "learning_rate": 5e-7, "num_tokens": 1000 * step,
            "train_tokens_per_second": 1234.5, "peak_memory_mb": 512.0, "skipped_steps": 0}


def write_metrics(run_dir, records, tail: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    return run_dir


def full_run(run_dir):
    records = [{"step": 0, **metric_values(0, "eval/")}]
    for s in range(1, 11):
        records.append(train_line(s))
        if s in (5, 10):
            records.append({"step": s, **metric_values(s, "eval/")})
    return write_metrics(run_dir, records)


def check_png(path):
    image = need("matplotlib.image")
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG", path
    img = image.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[:2] == (480, 720)  # 6 x 4 in at 120 dpi
    assert img.std() > 0  # not a blank canvas


# ------------------------------------------------------------------------------ plots


def test_write_plots_full_run(tmp_path):
    need("matplotlib")
    run = full_run(tmp_path / "run")
    paths = report.write_plots(run)
    assert [p.name for p in paths] == PLOT_NAMES
    for p in paths:
        assert p.parent == run / "plots"
        check_png(p)
    assert sorted(os.listdir(run / "plots")) == sorted(PLOT_NAMES)  # no temp files left


def test_write_plots_out_dir_and_rewrite(tmp_path):
    need("matplotlib")
    run = full_run(tmp_path / "run")
    out = tmp_path / "elsewhere" / "figs"
    paths = report.write_plots(str(run), out_dir=str(out))
    assert [p.parent for p in paths] == [out] * 4
    again = report.write_plots(run, out_dir=out)  # overwrites in place
    assert again == paths
    for p in again:
        check_png(p)
    assert not (run / "plots").exists()


def test_write_plots_without_eval_lines(tmp_path):
    need("matplotlib")
    run = write_metrics(tmp_path / "run", [train_line(s) for s in range(1, 11)])
    paths = report.write_plots(run)
    assert [p.name for p in paths] == PLOT_NAMES
    for p in paths:
        check_png(p)


def test_write_plots_skips_absent_keys_and_bad_lines(tmp_path):
    need("matplotlib")
    # Only losses logged, a single eval point, a blank line and a partial last line.
    records = [{"step": 0, "eval/loss": 0.69}] + \
              [{"step": s, "loss": 0.7 - 0.01 * s, "note": "x"} for s in range(1, 4)]
    run = write_metrics(tmp_path / "run", records, tail='\n{"step": 4, "loss": 0.6')
    paths = report.write_plots(run)
    assert [p.name for p in paths] == ["loss.png"]
    check_png(paths[0])
    # Nothing plottable at all: no files, no error.
    empty = write_metrics(tmp_path / "empty", [{"step": 1, "grad_norm": 1.0}])
    assert report.write_plots(empty) == []
    assert not (empty / "plots").exists()


def test_write_plots_missing_metrics_file(tmp_path):
    need("matplotlib")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        report.write_plots(tmp_path)


def test_read_metrics(tmp_path):
    run = write_metrics(tmp_path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}],
                        tail="\n[1, 2]\nnot json\n")
    assert report.read_metrics(run) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]


def test_plot_callback_writes_plots(tmp_path):
    need("matplotlib")
    run = full_run(tmp_path / "run")
    cb = report.PlotCallback()
    assert isinstance(cb, TrainerCallback)
    cb.on_train_end(SimpleNamespace(output_dir=run), SimpleNamespace(global_step=10), None)
    assert [p.name for p in cb.paths] == PLOT_NAMES
    assert all(p.is_file() for p in cb.paths)


# ------------------------------------------------------------------------------ missing packages


@pytest.fixture
def hide(monkeypatch):
    """hide("matplotlib", ...): find_spec reports those packages as not installed."""

    def apply(*names):
        real = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            if name.split(".")[0] in names:
                return None
            return real(name, *args, **kwargs)

        monkeypatch.setattr(report.importlib.util, "find_spec", find_spec)

    return apply


def test_missing_matplotlib(tmp_path, hide):
    run = full_run(tmp_path / "run")
    hide("matplotlib")
    with pytest.raises(ImportError, match="plots need matplotlib: pip install matplotlib"):
        report.write_plots(run)
    cb = report.PlotCallback()
    trainer, state = SimpleNamespace(output_dir=run), SimpleNamespace(global_step=10)
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        cb.on_train_end(trainer, state, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_train_end(trainer, state, None)  # warns only once
    assert not (run / "plots").exists()


def test_missing_tensorboard(hide):
    hide("tensorboard")
    assert report.tensorboard_available() is False
    with pytest.raises(ImportError,
                       match="TensorBoard logging needs tensorboard: pip install tensorboard"):
        report.TensorBoardCallback()


# ------------------------------------------------------------------------------ TensorBoard


def read_scalars(log_dir):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def drive(cb, trainer, train_logs, evals, start_step=0):
    """Calls the hooks in the trainer's order: before-training eval (fresh runs), train
    begin, then per step a log and maybe an eval, then train end."""
    if start_step == 0 and 0 in evals:
        cb.on_evaluate(trainer, SimpleNamespace(global_step=0), evals[0])
    cb.on_train_begin(trainer, SimpleNamespace(global_step=start_step))
    for step, logs in train_logs.items():
        state = SimpleNamespace(global_step=step)
        cb.on_log(trainer, state, logs)
        if step in evals:
            cb.on_evaluate(trainer, state, evals[step])
    cb.on_train_end(trainer, SimpleNamespace(global_step=max(train_logs)), None)


def test_tensorboard_round_trip(tmp_path):
    need("tensorboard")
    assert report.tensorboard_available()
    trainer = SimpleNamespace(output_dir=tmp_path)
    cb = report.TensorBoardCallback()
    assert isinstance(cb, TrainerCallback)
    train_logs = {s: {**train_line(s), "loss": 0.6931 - 0.1234567 * s, "tag": "text",
                      "flag": True} for s in (1, 2, 3)}
    evals = {0: metric_values(0, "eval/"), 3: metric_values(3, "eval/")}
    drive(cb, trainer, train_logs, evals)
    assert cb.writer is None  # closed at train end
    log_dir = tmp_path / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())

    scalars = read_scalars(log_dir)
    expect_train = {f"train/{k}" for k in train_line(1) if k != "step"}
    expect_eval = {f"eval/{k}" for k in METRIC_NAMES}
    assert set(scalars) == expect_train | expect_eval
    assert "train/step" not in scalars and "train/tag" not in scalars
    assert "train/flag" not in scalars
    for step, (s, v) in zip((1, 2, 3), scalars["train/loss"]):
        assert s == step
        assert v == pytest.approx(train_logs[step]["loss"], rel=1e-6)
    for key in ("num_tokens", "learning_rate", "rewards/margins", "logps/rejected"):
        got = scalars[f"train/{key}"]
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx([train_logs[s][key] for s in (1, 2, 3)],
                                                    rel=1e-6)
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"):
        got = scalars[key]
        assert [s for s, _ in got] == [0, 3]
        assert [v for _, v in got] == pytest.approx([evals[0][key], evals[3][key]], rel=1e-6)


def test_tensorboard_custom_log_dir_and_flush(tmp_path):
    need("tensorboard")
    log_dir = tmp_path / "tb" / "run1"
    cb = report.TensorBoardCallback(log_dir=str(log_dir))
    trainer = SimpleNamespace(output_dir=tmp_path / "out")
    cb.on_train_begin(trainer, SimpleNamespace(global_step=0))
    assert log_dir.is_dir()
    cb.on_log(trainer, SimpleNamespace(global_step=1), {"step": 1, "loss": 0.5})
    # flushed after the log: readable before the writer is closed
    assert read_scalars(log_dir)["train/loss"] == [(1, 0.5)]
    cb.on_train_end(trainer, SimpleNamespace(global_step=1), None)
    assert not (tmp_path / "out").exists()


def test_tensorboard_resume_discards_replayed_steps(tmp_path):
    need("tensorboard")
    trainer = SimpleNamespace(output_dir=tmp_path)
    first = {s: {"step": s, "loss": 1.0 * s} for s in range(1, 6)}
    drive(report.TensorBoardCallback(), trainer, first, {})
    # Event file names carry whole seconds; the resumed run's file must sort after.
    t = int(time.time())
    while int(time.time()) == t:
        time.sleep(0.02)
    # Interrupted, resumed from the checkpoint at step 3: steps 4 and 5 are replayed.
    second = {s: {"step": s, "loss": 10.0 * s} for s in (4, 5)}
    drive(report.TensorBoardCallback(), trainer, second, {}, start_step=3)
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
