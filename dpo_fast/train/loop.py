"""The trainer as a recipe: preference rows in, a DPO-trained model out, one model in memory.

:meth:`Trainer.train` reads top to bottom: :meth:`Trainer.setup` (checks, data, plan,
policy, reference pass, optimizer, resume), the step loop, :meth:`Trainer.finish` (final
evaluation, samples, export, summary). Each stage is a call into a module with one job:

- :mod:`.rundir` -- checks before any work, ``config.yaml``, ``summary.json``;
- :mod:`dpo_fast.data` -- rows -> checks -> tokenization (cached) -> :class:`PreparedData`;
- :mod:`.batching` -- the per-epoch data order (:meth:`Trainer.epoch_steps`);
- :mod:`.modeling` -- loading, dropout, LoRA, checkpointing, optimizer, schedule;
- :mod:`.reference` -- the reference cache filled for the planned pairs, the reference freed;
- :mod:`.runner` -- micro-batches, the fused head + loss, optimizer steps, held-out passes;
- :mod:`.metrics` -- ``metrics.jsonl`` and the logging window;
- :mod:`.checkpoint` -- atomic checkpoints and exact resume;
- :mod:`.export` -- the final model (FSDP2 gather, LoRA merge);
- :mod:`.evaluate` -- ``dpo-fast eval`` against an existing cache.

See ``docs/design.md``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..threads import ThreadGovernor
from . import (checkpoint, distributed, export, metrics, modeling, reference, rundir, runtime,
               sharding)
from .batching import PADDED, epoch_steps, pair_tokens
from .callbacks import TrainerCallback
from .config import TrainConfig
from ..data import PreparedData, count_reasons
from .runner import StepResult, StepRunner
from .splits import load_splits
from .state import TrainingError, TrainResult, TrainState


class Trainer:
    """DPO (and every loss type of :func:`dpo_fast.preference_loss`) on a Hugging Face causal LM.

    Args:
        config: a :class:`TrainConfig` (checked here).
        model: optionally a loaded causal LM to train (else ``config.model`` is loaded).
        tokenizer: optionally a loaded tokenizer (else from ``config.tokenizer`` /
            ``config.model``).
        callbacks: :class:`TrainerCallback` objects.

    ``train()`` runs everything and returns a :class:`TrainResult`; ``evaluate()`` computes
    held-out metrics of the current policy. After ``train()``, ``model`` is the trained policy.
    """

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None,
                 callbacks: Sequence[TrainerCallback] = ()):
        if model is not None and config.model is None:
            config.model = getattr(getattr(model, "config", None), "_name_or_path", None) \
                or "<model object>"
        self.config = config.validate()
        self.model = model
        self.model_given = model is not None
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.dist, device = distributed.setup(config.strategy, config.device,
                                              config.dist_timeout)
        self.device = runtime.resolve_device(device)
        if self.dist.strategy == "fsdp2" and self.device.type == "cpu":
            runtime.return_freed_memory()  # RSS follows live memory (see there)
        if not self.dist.is_main:  # one set of progress bars and library warnings per job
            runtime.quiet_libraries()
        self.output_dir = Path(config.output_dir)
        self.log = metrics.MetricsLog(self.output_dir, self.dist.is_main)
        self.state = TrainState()
        self.train_data: Optional[PreparedData] = None
        self.eval_data: Optional[PreparedData] = None
        self.pair_lengths: Optional[np.ndarray] = None  # [n_train] tokens of each pair
        self.steps_per_epoch = 0
        self.total_steps = 0
        self.reference = reference.ReferenceTables()
        self.precompute_seconds = 0.0
        self.runner: Optional[StepRunner] = None  # the policy's step machinery (setup)
        self.engine: Optional[torch.nn.Module] = None  # DDP / FSDP2 / plain wrapper
        self.forward: Optional[torch.nn.Module] = None  # its root module (FSDP2: sharded)
        self.params: List[torch.nn.Parameter] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.threads: Optional[ThreadGovernor] = None  # CPU threads while train() runs
        self.sample_prompts: List[np.ndarray] = []
        self.memory = runtime.PhaseMemory(self.device)  # peak memory of each phase
        self.memory.end("start")
        self.load_source: Optional[str] = None  # sharded load: "slices" / "broadcast"

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, plots, checkpoints' shared files and the
        final model (rank 0; the only process without torchrun)."""
        return self.dist.is_main

    @property
    def sharded_load(self) -> bool:
        """True when the policy is built sharded (FSDP2 with ``config.model`` to load): no
        process ever holds it whole (:mod:`.sharding`)."""
        return self.dist.strategy == "fsdp2" and not self.model_given

    @property
    def attention(self) -> str:
        """The attention path of the steps (``padded`` until the policy is set up)."""
        return self.runner.attention if self.runner is not None else PADDED

    @property
    def parts(self):
        """:class:`dpo_fast.models.ModelParts` of the policy (after setup)."""
        return self.runner.parts if self.runner is not None else None

    # -- the recipe ---------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Runs the whole pipeline and returns the :class:`TrainResult`."""
        cfg = self.config
        self.threads = ThreadGovernor(enabled=cfg.adaptive_threads and self.device.type == "cpu")
        try:
            resumed = self.setup()
            st = self.state
            eval_before = self.log.eval_before() if resumed else self._evaluate_at_start()
            samples_before = [] if resumed else self.sample_responses("before")
            self._stage(f"training: {len(self.train_data.examples)} pairs, {st.max_steps} "
                        f"steps of {cfg.batch_size} pairs, attention {self.attention}, "
                        f"device {self.device}")
            window, last_logs = metrics.StepWindow(), {}
            last_ckpt: Optional[Path] = None
            interrupted = False
            self.memory.end("setup")
            runtime.reset_peak_memory(self.device)
            self._emit("on_train_begin", st)
            with runtime.SignalStop() as stop:
                while st.global_step < st.max_steps and not interrupted:
                    steps = self.epoch_steps(st.epoch)
                    while st.step_in_epoch < len(steps) and st.global_step < st.max_steps:
                        res = self._step(steps[st.step_in_epoch], stop.signum is not None,
                                         window)
                        self._emit("on_step_end", st)
                        done = st.global_step >= st.max_steps
                        if st.global_step % cfg.logging_steps == 0 or done:
                            last_logs = self._log_window(window, res, len(steps)) or last_logs
                        if cfg.eval_steps and st.global_step % cfg.eval_steps == 0 \
                                and not done and self.eval_data is not None:
                            self._evaluate_and_log()
                        if st.step_in_epoch >= len(steps):
                            st.epoch += 1
                            st.step_in_epoch = 0
                        if (cfg.save_steps and st.global_step % cfg.save_steps == 0
                                and not done) or res.stop:
                            last_ckpt = self.save_checkpoint()
                        if res.stop:
                            interrupted = True
                            self._stage(f"stopped by signal {stop.signum or 'on another rank'} "
                                        f"at step {st.global_step}; checkpoint {last_ckpt}; "
                                        "resume with resume_from_checkpoint=True")
                            break
            return self.finish(interrupted, last_logs, eval_before, samples_before, last_ckpt)
        finally:
            self.threads.close()

    def setup(self) -> Optional[Path]:
        """Everything before the first step; returns the checkpoint resumed from, if any."""
        cfg = self.config
        runtime.seed_everything(cfg.seed)
        rundir.check_before_work(self.output_dir, cfg, self.model_given, self.is_main,
                                 self.dist.barrier, self._stage)
        if self.is_main:
            rundir.write_config(self.output_dir, cfg)
            self._add_reporters()
        self.prepare_data()
        self.plan()
        self.memory.end("data")
        self.prepare_model()
        self.memory.end("load")
        t0 = time.perf_counter()
        self.prepare_reference()
        self.precompute_seconds = time.perf_counter() - t0
        self.memory.end("reference")
        self.prepare_training()
        resumed = self.resume()
        if resumed is None:
            self.log.start()
        return resumed

    def finish(self, interrupted: bool, last_logs: Dict[str, float],
               eval_before: Dict[str, float], samples_before: List[str],
               last_ckpt: Optional[Path]) -> TrainResult:
        """After the loop: the end-state checkpoint, final evaluation, samples and model
        (unless interrupted), ``summary.json``."""
        cfg, st = self.config, self.state
        peak = self._peak_mb()
        state_mb = self._by_rank(modeling.state_bytes(self.engine, self.optimizer) / 2**20)
        self.memory.end("train")
        eval_after: Dict[str, float] = {}
        model_dir, samples_after = None, []
        if not interrupted:
            if cfg.save_steps:  # the end state, so a finished run resumes as finished
                last_ckpt = self.save_checkpoint()
            if self.eval_data is not None:
                eval_after = self._evaluate_and_log()
            samples_after = self.sample_responses("after")
            if cfg.save_final_model:
                model_dir = str(self.output_dir)
                self.save_model(self.output_dir)
        self.memory.end("finish")
        from .sampling import pair_samples

        samples, sb, sa = pair_samples(self.tokenizer, self.sample_prompts, samples_before,
                                       samples_after, cfg.sample_scorer)
        result = TrainResult(
            output_dir=str(self.output_dir), model_dir=model_dir, global_step=st.global_step,
            epochs=st.global_step / self.steps_per_epoch, interrupted=interrupted,
            train_metrics={k: v for k, v in last_logs.items() if k != "step"},
            eval_before=eval_before, eval_after=eval_after,
            skipped_rows=count_reasons([s for s in (self.train_data, self.eval_data) if s]),
            skipped_steps=st.skipped_steps, attention=self.attention,
            tokens_per_second=st.num_tokens / st.train_seconds if st.train_seconds else 0.0,
            peak_memory_mb=peak, train_pairs=len(self.train_data.examples),
            eval_pairs=len(self.eval_data.examples) if self.eval_data is not None else 0,
            train_seconds=st.train_seconds,
            checkpoint=None if last_ckpt is None else str(last_ckpt), samples=samples,
            sample_score_before=sb, sample_score_after=sa,
            precompute_seconds=self.precompute_seconds,
            cpu_threads=self.threads.summary() if self.device.type == "cpu" else None,
            phase_memory_mb={k: self._by_rank(v) for k, v in self.memory.host.items()},
            phase_cuda_memory_mb={k: self._by_rank(v) for k, v in self.memory.cuda.items()},
            model_state_mb=state_mb)
        if self.is_main:
            rundir.write_summary(self.output_dir, result.to_dict())
        self._emit("on_train_end", st, result)
        self.dist.barrier()
        return result

    # -- setup stages -------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Reads, checks, splits and tokenizes the data (``train_data`` / ``eval_data``)."""
        from ..models import load_tokenizer

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.config.tokenizer or self.config.model,
                                            what="TrainConfig.tokenizer")
        tok = self.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        self.train_data, self.eval_data = load_splits(
            self.config, tok, stage=self._stage,
            progress=lambda done, total: self._emit("on_tokenize_progress", done, total))

    def plan(self) -> None:
        """Steps per epoch, total steps, pair lengths (the inputs of the data order)."""
        cfg = self.config
        n = len(self.train_data.examples)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
            cfg.num_train_epochs * self.steps_per_epoch)
        self.pair_lengths = np.array([pair_tokens(e) for e in self.train_data.examples])

    def epoch_steps(self, epoch: int) -> List[np.ndarray]:
        """The optimizer steps of ``epoch`` in order, each an array of train-pair indices
        (deterministic in ``seed``, ``batch_size`` and the pair lengths; after :meth:`plan`)."""
        return epoch_steps(self.pair_lengths, self.config.batch_size, self.config.seed, epoch)

    def planned_indices(self) -> np.ndarray:
        """Sorted indices of the train pairs the run's ``total_steps`` steps visit."""
        if self.total_steps >= self.steps_per_epoch:
            return np.arange(len(self.train_data.examples))
        return np.unique(np.concatenate(self.epoch_steps(0)[:self.total_steps]))

    def prepare_model(self) -> None:
        """Loads the policy (if not given) onto the device. Under FSDP2 (:attr:`sharded_load`)
        it is built on the meta device, made trainable (dropout, LoRA, checkpointing),
        sharded and filled with each process's slices of the weights (``engine`` /
        ``forward``: its FSDP2 root)."""
        cfg = self.config
        if not self.sharded_load:
            self.model = modeling.load_policy(cfg, self.model, self.device, self._stage)
            return
        self._stage(f"loading {cfg.model} sharded over {self.dist.world_size} process(es)")
        self.model, self.forward, self.load_source = sharding.load_sharded(
            cfg.model, dtype=modeling.model_dtype(cfg), dist=self.dist, device=self.device,
            fsdp=modeling.fsdp_settings(cfg, self.device), what="TrainConfig.model",
            seed=cfg.seed,
            prepare=lambda m: modeling.make_trainable(modeling.checked_policy(m), cfg),
            stage=self._stage)
        self.engine = self.forward

    def prepare_reference(self) -> None:
        """Fills the reference cache for the planned train pairs and every eval pair and
        looks their values up (``reference``); a separate reference model is freed after."""
        if not self.config.needs_reference:
            return

        def progress(p):
            self._poll_threads()
            self._emit("on_ref_progress", p)

        sharded = self.sharded_load
        self.reference = reference.fill_reference(
            self.config, self.model, self.tokenizer, self.train_data.examples,
            self.planned_indices(), self.eval_data.examples if self.eval_data else None,
            self.device, self.output_dir, stage=self._stage, progress=progress,
            root=self.forward if sharded else None, dist=self.dist,
            fsdp=modeling.fsdp_settings(self.config, self.device))

    def prepare_compute(self) -> None:
        """The step machinery of the current policy (``runner``); a sharded policy is read
        (and its packing checked) inside its root's forward, on every rank."""
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0

        def runner(lm):
            return StepRunner.for_model(lm, self.config, self.dist, self.device, pad or 0,
                                        poll=self._poll_threads, review=self._review)

        if self.sharded_load:
            with torch.no_grad():
                self.runner = self.gathered(runner)
        else:
            self.runner = runner(self.model)

    def prepare_training(self) -> None:
        """Dropout, LoRA, checkpointing; the step machinery, the DDP / FSDP2 wrap, optimizer,
        schedule and a fresh :class:`TrainState`."""
        cfg = self.config
        if not self.sharded_load:  # (a sharded policy was made trainable before sharding)
            self.model = modeling.make_trainable(self.model, cfg)
        self.prepare_compute()
        modeling.warn_compile_under_fsdp(cfg, self.dist.strategy, self.is_main)
        if not self.sharded_load:
            self.engine, self.forward = distributed.wrap(self.model, self.dist, self.device,
                                                         modeling.fsdp_settings(cfg, self.device))
        self.params = modeling.trainable_parameters(self.engine)
        self.optimizer = modeling.make_optimizer(self.params, cfg, self.device)
        self.scheduler = modeling.make_scheduler(self.optimizer, cfg, self.total_steps)
        self.state = TrainState(max_steps=self.total_steps)

    def resume(self) -> Optional[Path]:
        """Restores ``resume_from_checkpoint`` (model, optimizer, schedule, RNGs, state) and
        cuts ``metrics.jsonl`` back to its step; None for a fresh start."""
        if self.config.resume_from_checkpoint in (None, False):
            return None
        d = checkpoint.choose_resume(self.output_dir, self.config.resume_from_checkpoint,
                                     self.dist)
        if d is None:
            self._stage(f"no checkpoint in {self.output_dir}: starting from step 0")
            return None
        st = checkpoint.restore(d, self._checkpointed(), self.optimizer, self.scheduler,
                                self.dist)
        keep = {k: st[k] for k in asdict(self.state) if k in st}
        self.state = TrainState(**{**keep, "max_steps": self.state.max_steps})
        self._stage(f"resumed from {d} at step {self.state.global_step}")
        self.log.keep_until(self.state.global_step)
        return d

    # -- steps, evaluation, saving ----------------------------------------------------------

    def _step(self, pairs: np.ndarray, stop: bool, window: metrics.StepWindow) -> StepResult:
        """One timed optimizer step; updates the state and the window, refuses a run of
        non-finite steps."""
        cfg, st = self.config, self.state
        self._emit("on_step_begin", st, pairs)
        t0 = time.perf_counter()
        res = self.runner.train_step(self.train_data.examples, self.reference.train, pairs,
                                     self.engine, self.params, self.optimizer, self.scheduler,
                                     stop)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        st.global_step += 1
        st.step_in_epoch += 1
        st.train_seconds += dt
        st.num_tokens += int(res.sums["tokens"])
        window.add(res, dt)
        if res.finite:
            st.bad_streak = 0
            return res
        st.skipped_steps += 1
        st.bad_streak += 1
        warnings.warn(f"step {st.global_step}: non-finite loss or gradient (grad norm "
                      f"{res.grad_norm}); step skipped ({st.bad_streak} in a row)",
                      RuntimeWarning, stacklevel=3)
        if st.bad_streak >= cfg.max_bad_steps:
            raise TrainingError(
                f"{st.bad_streak} steps in a row had a non-finite loss or gradient (last: "
                f"step {st.global_step}); lower learning_rate, set max_grad_norm, or check "
                "the data and the model's dtype")
        return res

    def _log_window(self, window: metrics.StepWindow, res: StepResult,
                    steps_in_epoch: int) -> Dict[str, Any]:
        """Writes the window's log line (if it holds an applied step) and starts a new
        window; returns the line ({} if none)."""
        st = self.state
        logs: Dict[str, Any] = {}
        if window.steps:
            logs = window.record(res, step=st.global_step,
                                 epoch=st.epoch + st.step_in_epoch / steps_in_epoch,
                                 num_tokens=st.num_tokens, peak_memory_mb=self._peak_mb(),
                                 skipped_steps=st.skipped_steps)
            self.log.append(logs)
            self._emit("on_log", st, logs)
        window.reset()
        return logs

    def evaluate(self) -> Dict[str, float]:
        """Held-out metrics (``eval/loss``, ``eval/rewards/accuracies``, ...) of the current
        policy; {} without an eval split."""
        if self.eval_data is None:
            return {}
        module = self.forward if self.dist.active else None
        out = self.runner.held_out(self.eval_data.examples, self.reference.eval, module)
        if self.dist.strategy == "fsdp2":
            distributed.reshard(self.forward)
        return out

    def _evaluate_at_start(self) -> Dict[str, float]:
        if self.eval_data is None:
            return {}
        self._stage(f"evaluating {len(self.eval_data.examples)} held-out pairs")
        return self._evaluate_and_log()

    def _evaluate_and_log(self) -> Dict[str, float]:
        ev = self.evaluate()
        self.log.append({"step": self.state.global_step, **ev})
        self._emit("on_evaluate", self.state, ev)
        return ev

    def evaluate_against_cache(self, ref_cache_dir, ref_model: Optional[str] = None
                               ) -> Dict[str, Any]:
        """``dpo-fast eval``: see :func:`dpo_fast.train.evaluate.evaluate_against_cache`."""
        from .evaluate import evaluate_against_cache

        return evaluate_against_cache(self, ref_cache_dir, ref_model)

    def _checkpointed(self) -> torch.nn.Module:
        """What a checkpoint holds the parameters of: the FSDP2 root (sharded), else the
        policy itself (the same names with or without DDP)."""
        return self.forward if self.dist.strategy == "fsdp2" else self.model

    def save_checkpoint(self) -> Path:
        """``checkpoint-<global_step>`` in ``output_dir`` (keeping ``save_total_limit``)."""
        d = checkpoint.save_checkpoint(
            self.output_dir, self.state.global_step, self._checkpointed(), self.optimizer,
            self.scheduler, {**asdict(self.state), "config": self.config.to_dict(),
                             "attention": self.attention, "world_size": self.dist.world_size,
                             "strategy": self.dist.strategy},
            keep=self.config.save_total_limit, ctx=self.dist if self.dist.active else None)
        self._emit("on_save", self.state, d)
        return d

    def save_model(self, out: Path) -> Path:
        """``save_pretrained`` of the policy and tokenizer into ``out`` (LoRA: the adapter;
        with ``merge_lora`` also the merged model in ``out/merged``)."""
        merged = export.save_model(self.model, self.tokenizer, out, dist=self.dist,
                                   root=self.forward, merge_lora=self.config.merge_lora,
                                   base_model=self.config.model,
                                   dtype=modeling.model_dtype(self.config),
                                   max_shard_size=self.config.max_shard_size)
        if merged is not None:
            self.model = merged
        return Path(out)

    def sample_responses(self, when: str) -> List[str]:
        """Sampled responses for ``sample_prompts`` held-out prompts (train prompts if there
        is no eval split)."""
        cfg = self.config
        fsdp = self.dist.strategy == "fsdp2"
        if not cfg.sample_prompts or not (self.is_main or fsdp):
            return []  # DDP: rank 0 samples from its full copy, the others wait
        from .sampling import sample_responses, unique_prompts

        src = self.eval_data if self.eval_data is not None else self.train_data
        self.sample_prompts = unique_prompts(src.examples, cfg.sample_prompts)
        self._stage(f"sampling {len(self.sample_prompts)} responses to held-out prompts "
                    f"({when} training)")

        def sample(lm):
            return sample_responses(lm, self.tokenizer, self.sample_prompts,
                                    max_new_tokens=cfg.sample_max_new_tokens,
                                    temperature=cfg.sample_temperature, seed=cfg.seed,
                                    device=self.device, synced=fsdp)

        if not fsdp:
            return sample(self.model)
        # FSDP2: every rank generates the same prompts through the root module (its forward
        # gathers the embeddings / norm / head; each layer gathers in its own forward), kept in
        # lockstep by generate's synced_gpus; rank 0 keeps the texts.
        out = self.gathered(sample)
        return out if self.is_main else []

    # -- plumbing -----------------------------------------------------------------------

    def gathered(self, fn):
        """``fn(policy)`` inside the FSDP2 root's forward (no backward follows), every rank;
        the shards are restored after."""
        out = self.forward(fn)
        distributed.reshard(self.forward)
        return out

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _stage(self, message: str) -> None:
        self._emit("on_stage", message)

    def _review(self, batch, out):
        """Each callback's ``on_micro_batch`` may replace the micro-batch's loss output."""
        for cb in self.callbacks:
            new = cb.on_micro_batch(self, self.state, batch, out)
            if new is not None:
                out = new
        return out

    def _by_rank(self, value: float) -> List[float]:
        """``value`` of every rank, in rank order (a collective under torch.distributed)."""
        if not self.dist.active:
            return [round(float(value), 1)]
        v = torch.zeros(self.dist.world_size, dtype=torch.float64)
        v[self.dist.rank] = float(value)
        return [round(x, 1) for x in self.dist.all_sum(v).tolist()]

    def _peak_mb(self) -> float:
        """Peak memory of the loop: this process's, or the largest over the ranks."""
        peak = runtime.peak_memory_mb(self.device)
        if self.dist.active:
            peak = float(self.dist.all_max(torch.tensor(peak, dtype=torch.float64)))
        return peak

    def _poll_threads(self) -> None:
        """Lets the thread governor (``adaptive_threads``) follow other processes' CPU use;
        says so the first time it lowers the threads."""
        gov = self.threads
        changed = gov.poll() if gov is not None else None
        if changed and changed[1] < changed[0] and gov.switches == 1:
            self._stage(f"other processes are using {gov.others:.1f} of this process's "
                        f"{len(gov.cpus)} cores: CPU threads {changed[0]} -> {changed[1]} "
                        "while they do (adaptive_threads)")

    def _add_reporters(self) -> None:
        from .report import PlotCallback, TensorBoardCallback, tensorboard_available

        have = {type(cb) for cb in self.callbacks}
        if "tensorboard" in self.config.report_to and TensorBoardCallback not in have:
            if tensorboard_available():
                self.callbacks.append(TensorBoardCallback())
            else:
                warnings.warn("report_to has 'tensorboard' but tensorboard is not installed "
                              "(pip install tensorboard); metrics.jsonl is still written",
                              UserWarning, stacklevel=4)
        if "plots" in self.config.report_to and PlotCallback not in have:
            self.callbacks.append(PlotCallback())


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """``Trainer(config, **kwargs).train()``."""
    return Trainer(config, **kwargs).train()
