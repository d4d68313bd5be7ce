"""The one training loop, shared by every method; a method supplies its data and its loss.

Why sums: the loss of an optimiser step is the mean over every loss-carrying unit of the step,
across micro-batches and processes. A mean of per-micro-batch means would weight a token of a short
micro-batch more than one of a long one. So the loop counts the step's units first (one
all-reduce), then back-propagates each micro-batch's sum divided by that count: accumulation and
sharding give the gradient of one big batch.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer_lib.checkpointing.checkpointer import BestFigureWatch, Checkpointer
from trainer_lib.checkpointing.identity import run_identity
from trainer_lib.checkpointing.layout import STATE_FILE
from trainer_lib.checkpointing.resume import skip_batches
from trainer_lib.config import Config
from trainer_lib.data.mixture import loader_epochs, mixture_examples
from trainer_lib.data.pipeline import build_data
from trainer_lib.errors import CheckpointWriteError, DataError, MetricFnError
from trainer_lib.model.loading import align_special_tokens, load_model, load_tokenizer
from trainer_lib.model.card import ModelCard, describe_run, hub_datasets
from trainer_lib.model.probe import LossPath, adopt, check_model, decision
from trainer_lib.model.saving import save_pretrained
from trainer_lib.runtime.accelerator import build_accelerator
from trainer_lib.runtime.fsdp import check_sharded_model, is_fsdp
from trainer_lib.runtime.processes import (
    align_micro_batches,
    batches_per_process,
    device_vector,
    reduce_sum,
    shared_value,
)
from trainer_lib.training import preflight
from trainer_lib.training.callbacks import Callbacks, EarlyStopping
from trainer_lib.training.evaluation import GenerationEval, format_table
from trainer_lib.training.interrupts import (
    InterruptGuard,
    quiet_interrupt_exit,
    training_interrupted,
)
from trainer_lib.training.optim import build_optimizer, build_scheduler
from trainer_lib.training.step import NonFiniteSteps, apply_update, step_grad_norm
from trainer_lib.training.tracking import build_tracker, format_log_line, log_with, run_dir


class Trainer:
    def __init__(self, config: Config, samples: Any = None, eval_samples: Any = None,
                 eval_prompts: Any = None, metric_fn: Any = None, callbacks: Any = None):
        self.config = config.validate()
        self.eval_prompts = eval_prompts
        self.metric_fn = metric_fn
        self.log_history: list[dict] = []
        self.step = 0
        self.callbacks = Callbacks(callbacks)
        # named in the model card
        self.dataset_names = hub_datasets(samples, eval_samples,
                                          *(e["path"] for e in config.data.mixture or []))
        if config.train.early_stopping is not None:
            self.callbacks.add(EarlyStopping.from_config(config.train.early_stopping))
        self.accelerator = build_accelerator(config, log_with=log_with(config),
                                             project_dir=str(run_dir(config)))
        set_seed(config.train.seed)
        # everything that can be wrong is found before anything heavy is loaded: the settings,
        # eval prompts and output folders first, then the data, then the checkpoint to resume
        model_config = preflight.check_run(
            config, self.accelerator, eval_samples is not None or config.train.eval_split > 0,
            eval_prompts, metric_fn, self.callbacks)
        self.tokenizer = load_tokenizer(config)
        self.train_items, self.eval_items = self.build_datasets(samples, eval_samples)
        self.generation_eval = GenerationEval.build(self, eval_prompts, metric_fn)
        self.checkpoints = Checkpointer(config)
        self.checkpoints.choose_start(self, run_identity(self, model_config))
        self.nonfinite_steps = NonFiniteSteps(config.train.skip_nonfinite_steps)
        self.model = load_model(config)
        align_special_tokens(self.model, self.tokenizer)
        self.setup_model()  # may change how the items are batched (the load-time check)
        loader = self.make_loader(self.train_items, shuffle=True)
        k = config.train.gradient_accumulation_steps
        self.total_steps = min(config.train.total_steps, sum(
            math.ceil(batches_per_process(self.accelerator, n) / k)
            for n in loader_epochs(loader, config.train.epochs)))
        self.optimizer = build_optimizer(self.model, config.optimizer)
        self.model, self.optimizer, self.train_loader = self.accelerator.prepare(
            self.model, self.optimizer, loader
        )
        if is_fsdp(self.accelerator):
            check_sharded_model(self.model)
        self.setup_prepared_model()
        # stepped by hand once per optimiser step (accelerate would step it once per process)
        self.scheduler = build_scheduler(self.optimizer, config.scheduler, self.total_steps)
        self.tracker = build_tracker(config, self.accelerator)
        if getattr(self, "data_report", None) is not None:  # what happened to the samples
            self.tracker.log({f"data/{k}": v for k, v in self.data_report.as_dict().items()}, 0)

    # ------------------------------------------------------------------ method hooks

    def data_recipe(self):
        """The method's normalise and tokenise functions (a `DataRecipe`)."""
        raise NotImplementedError

    def arrange(self, data, recipe) -> tuple[Any, Any]:
        """(train items, eval items) from the prepared data; by default single examples (of a
        mixture: each epoch's draw, with `self.epoch_ranges` saying where each epoch is)."""
        if data.mixture is not None:
            items, self.epoch_ranges = mixture_examples(data, self.config.train, self.accelerator)
            return items, data.eval
        return data.train, data.eval

    def collate(self, items: list) -> dict:
        """Loader items -> one batch: tensors, and counts such as `num_tokens`."""
        raise NotImplementedError

    def loss_weight(self, batch: dict) -> float:
        """How much the batch counts in the step's mean (loss-carrying tokens for SFT, examples
        for KTO), known before the forward pass."""
        raise NotImplementedError

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(the SUM of the loss over the batch, {name: (sum, count)} of figures to log); the loop
        divides by the step's total `loss_weight`."""
        raise NotImplementedError

    def setup_model(self) -> None:
        """Called once the model is loaded, before the training loader and the optimiser are
        built: the place for the load-time check, which may change `self.train_items`."""

    def check_loss_path(self, packing: bool, attentions: tuple = ()) -> LossPath:
        """The load-time check (`trainer_lib.model.probe`) on the loaded model: the head, the
        way packed rows keep documents apart (None: padded batches), the MoE load-balancing
        term; each fallback said in one line."""
        self.loss_path = check_model(
            self.model, self.tokenizer.pad_token_id, packing=packing, attentions=attentions,
            router_aux_loss_coef=self.config.method.router_aux_loss_coef)
        # every process takes the main process's decision (the same shapes on all of them)
        adopt(self.loss_path, self.model,
              shared_value(self.accelerator, decision(self.loss_path, self.model)))
        if self.accelerator.is_main_process:
            for note in self.loss_path.notes:
                print(note, flush=True)
        return self.loss_path

    def setup_prepared_model(self) -> None:
        """Called once the model is prepared (wrapped, sharded, on its device), before the first
        step: the place for passes that need the initial model in its training layout."""

    def before_step(self, micro: list[dict]) -> list[float]:
        """Called once per optimiser step, before any pass with gradients, with the step's
        micro-batches (a process short of data gets stand-ins marked `batch["padding"]`, which
        must count for nothing). A method's forward-only passes go here; the numbers it returns
        (the same count on every process; numbers or 0-d tensors) are summed over processes and
        left in `self.step_totals`, a float64 tensor on the device, for `compute_loss`: use it in
        tensor arithmetic, since reading it on the host would make the step wait for the
        device."""
        return []

    def eval_items_per_batch(self) -> int:
        """How many loader items make one evaluation forward pass."""
        return self.config.train.eval_batch_size or self.config.train.batch_size

    def build_datasets(self, samples: Any, eval_samples: Any) -> tuple[Any, Any]:
        """Samples -> the shared pipeline (read, normalise, tokenise, cache, share, report) ->
        the method's loader items. Runs before the model loads, so bad input fails in seconds."""
        recipe = self.data_recipe()
        data = build_data(self.accelerator, self.config, recipe, samples, eval_samples)
        self.data_report = data.report
        items = self.arrange(data, recipe)
        if data.mixture is not None and getattr(self, "epoch_ranges", None) is None:
            raise DataError(f"{type(self).__name__}.arrange() does not draw a Mixture's epochs "
                            "(it sets no epoch_ranges), so the weights would be ignored; pass "
                            "one dataset, or draw them as Trainer.arrange does")
        data.release()
        if self.accelerator.is_main_process:
            print(self.data_report.summary(), flush=True)
        return items

    # ------------------------------------------------------------------ data

    def make_loader(self, items: list, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        batch_size = batch_size or self.config.train.batch_size
        epochs = getattr(self, "epoch_ranges", None)  # a mixture: each epoch has its own items
        if shuffle and epochs is not None:
            return DataLoader(items, batch_size=batch_size, sampler=epochs.sampler(),
                              collate_fn=self.collate)
        generator = torch.Generator().manual_seed(self.config.train.seed)
        return DataLoader(items, batch_size=batch_size, shuffle=shuffle,
                          collate_fn=self.collate, generator=generator)

    def to_device(self, batch: dict) -> dict:
        # copies that do not wait for the device's queue (a batch's tensors are fresh host
        # memory that nothing writes to afterwards)
        return {k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop

    def train(self) -> "Trainer":
        """Trains to `total_steps`, or until a callback asks to stop (`stop_training`). Ctrl-C
        (or SIGTERM) finishes the step, saves a checkpoint and raises KeyboardInterrupt carrying
        `.checkpoint` and `.trainer`; a second one stops at once (see training/interrupts.py)."""
        acc = self.accelerator
        epoch, done = self.checkpoints.restore(self)  # (0, 0) unless resuming: where data resumes
        self.tracker.start(self.step)  # a resumed run's logs continue after the resumed step
        self.num_tokens = getattr(self, "num_tokens", 0)
        self.callbacks.call("on_train_begin", self)
        with InterruptGuard(announce=acc.is_main_process) as self._interrupts:
            try:
                self._loop(epoch, done)
            except KeyboardInterrupt as stop:
                self._report_interrupt(stop)
                raise
        self.callbacks.call("on_train_end", self)
        self._raise_callback_error()
        self.tracker.finish()
        return self

    def stop_training(self, reason: str = "stop_training() was called") -> None:
        """Ends the run after the current step, on every process (call it on any one, from a
        callback): a checkpoint is saved, `reason` is logged as `stop_reason`, and `train()`
        returns normally. Called outside a callback, the run ends after the next step."""
        self.callbacks.request_stop(reason)

    def _loop(self, epoch: int, done: int) -> None:
        acc, cfg = self.accelerator, self.config.train
        k = cfg.gradient_accumulation_steps
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.progress_bar))
        window = _Window()
        best_watch = BestFigureWatch(cfg.save_best)
        self.model.train()
        while self.step < self.total_steps:
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            batches = iter(self.train_loader)
            skip_batches(batches, done * k)  # a resumed epoch: the same order, from where it was
            while self.step < self.total_steps:
                micro = list(itertools.islice(batches, k))
                # a process short of data joins the step with empty (None) micro-batches
                micro = align_micro_batches(acc, micro)
                if not micro:
                    break
                out = self.training_step(micro)
                # a step with a non-finite loss or gradient norm was not applied: it is skipped
                # (within train.skip_nonfinite_steps) or the run stops, naming the last checkpoint
                skipped = self.nonfinite_steps.check(out, micro, self.step + 1,
                                                     self.checkpoints.last_saved,
                                                     acc.is_main_process)
                self.step += 1
                done += 1
                if not skipped:
                    window.add(out)
                self.num_tokens += out["num_tokens"]
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}",
                                tok_s=f"{window.tokens / max(window.seconds, 1e-9):,.0f}")
                if out["stop"] == "error":  # a callback raised, on some process: train() raises
                    self.callbacks.halt()   # it; nothing more is run or written
                    bar.close()
                    return
                self.callbacks.call("on_step_end", self)
                last = self.step == self.total_steps
                if self.step % cfg.log_interval == 0 or last:
                    self._log_window(window, epoch, best_watch)
                    window = _Window()
                if self.step % cfg.eval_interval == 0 or last:
                    self._log_evaluation((epoch, done), best_watch)
                # what this step's hooks asked (stop_training, an error), agreed by every process
                stop = self.callbacks.settle(acc, out["stop"])
                if stop == "error":
                    self.callbacks.halt()
                    bar.close()
                    return
                stopping = stop == "request"
                if stopping:
                    self._log_window(window, epoch, best_watch)  # the steps since the last line
                    window = _Window()
                    self.log({"stop_reason": self.callbacks.agreed_reason(acc)})
                if self.step % cfg.checkpoint_interval == 0 or last or stopping \
                        or out["interrupted"]:
                    self.save_checkpoint((epoch, done))
                self.save_best((epoch, done))
                if out["interrupted"]:
                    bar.close()
                    path = self.checkpoints.last_saved
                    raise training_interrupted(
                        f"training interrupted at step {self.step}: saved {path}; resume with "
                        f"train.resume_from_checkpoint={path}", path, self)
                if stopping:
                    bar.close()
                    self._say_stopped()
                    return
            epoch, done = epoch + 1, 0
        bar.close()

    def _log_window(self, window: "_Window", epoch: int, best_watch: BestFigureWatch) -> None:
        """The training figures of the steps since the last log line."""
        if not (window.weight or window.metrics):
            return
        values = {**window.summary(), "num_tokens": self.num_tokens, "epoch": epoch}
        if self.nonfinite_steps.skipped:
            values["skipped_steps"] = self.nonfinite_steps.skipped
        self.log(values)
        best_watch.see(values, self.step, evaluation=False)

    def _log_evaluation(self, position: tuple[int, int], best_watch: BestFigureWatch) -> None:
        values = self.run_evaluation(position)
        best_watch.see(values, self.step, evaluation=True)
        entry = self.log(values)
        if entry:
            self.callbacks.call("on_evaluate", self,
                                {k: v for k, v in entry.items() if k != "step"})

    def _say_stopped(self) -> None:
        """The line a stop asked by a callback ends the run with (main process)."""
        if self.accelerator.is_main_process:
            print(f"stopped at step {self.step}: {self.log_history[-1]['stop_reason']}; saved "
                  f"{self.checkpoints.last_saved}", flush=True)

    def _raise_callback_error(self) -> None:
        """After the loop: a callback's error on any process is raised on every process (one
        exchange per run), with no checkpoint written after it."""
        error = self.callbacks.agreed_error(self.accelerator)
        if error is None:
            return
        self.tracker.finish()
        last = self.checkpoints.last_saved
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(
                f"the run stopped after step {self.step}; " + (
                    f"the last checkpoint is {last}: resume with "
                    f"train.resume_from_checkpoint={last}" if last else "no checkpoint was written"))
        raise error

    def _report_interrupt(self, stop: KeyboardInterrupt) -> None:
        """One line on the main process, then no traceback for a script that does not catch it."""
        if not getattr(stop, "from_trainer_lib", False):
            return  # a KeyboardInterrupt of the user's own (e.g. from a callback)
        stop.trainer = self
        if stop.checkpoint is None:
            last = self.checkpoints.last_saved
            stop.args = (f"{stop.args[0]} after step {self.step}; "
                         + (f"the last checkpoint is {last}: resume with "
                            f"train.resume_from_checkpoint={last}" if last
                            else "no checkpoint was written"),)
        if self.accelerator.is_main_process:
            print(stop.args[0], file=sys.stderr, flush=True)
        self.tracker.finish()
        quiet_interrupt_exit(stop)

    def training_step(self, micro: list[dict]) -> dict:
        """One optimiser step over `micro`. Everything it measures stays on the device until
        its end, where the figures, the stop flags and the gradient norm are summed over the
        processes and read back in one transfer: the only time the host waits for the device
        (with several processes, `align_micro_batches` waits once more)."""
        acc, model = self.accelerator, self.model
        start = time.perf_counter()
        local_weight = sum(self.loss_weight(b) for b in micro if b is not None)
        # a process short of data joins with a real batch of weight 0 (for the collectives),
        # marked so that a method leaves it out of its cross-process figures
        micro = [self._stand_in() if b is None else b for b in micro]
        totals = reduce_sum(acc, [local_weight, *self.before_step(micro)])
        total_weight, self.step_totals = totals[0], totals[1:]
        # accelerate divides by gradient_accumulation_steps in backward and DDP averages over
        # processes; undo both so the gradient is that of sum(loss) / total_weight
        scale = acc.num_processes * acc.gradient_accumulation_steps / total_weight.clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        metric_sums: dict[str, list] = {}
        num_tokens = 0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            padding = batch.get("padding", False)
            self._last_batch = batch
            acc.gradient_state._set_sync_gradients(last)
            with nullcontext() if last else acc.no_sync(model):
                batch_loss, metrics = self.compute_loss(model, self.to_device(batch))
                acc.backward(batch_loss * (0.0 if padding else scale.to(batch_loss.dtype)))
            for name, (s, c) in metrics.items():
                # a padding batch adds nothing but its metric names: every process must reduce
                # the same vector. A sum may be a tensor: it is read with the step's figures
                acc_s = metric_sums.setdefault(name, [0.0, 0.0])
                acc_s[0] = acc_s[0] + (0.0 if padding else s)
                acc_s[1] = acc_s[1] + (0.0 if padding else c)
            if padding:
                continue
            loss_sum = loss_sum + batch_loss.detach().double()
            num_tokens += int(batch.get("num_tokens", 0))
        norm = step_grad_norm(self)
        names = sorted(metric_sums)
        # one all-reduce for the figures and for stopping (Ctrl-C, a callback's stop request or
        # error): every process stops after the same step
        interrupts = getattr(self, "_interrupts", None)
        stops = [bool(interrupts and interrupts.requested), self.callbacks.stop_reason is not None,
                 self.callbacks.error is not None]
        flat = [loss_sum, num_tokens, *stops]
        flat += [v for n in names for v in metric_sums[n]]
        # the step's total weight (summed already) and the norm are the same on every process:
        # they ride along, not summed again
        same = [total_weight] + ([norm] if torch.is_tensor(norm) else [])
        figures = torch.cat([reduce_sum(acc, flat), device_vector(same, acc.device)])
        totals = figures.tolist()  # the step's one read
        loss_sum, num_tokens = totals[0], int(totals[1])
        interrupted, stop_asked, failed = (v > 0 for v in totals[2:5])
        metrics = {n: (totals[5 + 2 * j], totals[6 + 2 * j]) for j, n in enumerate(names)}
        total_weight = totals[len(flat)]
        norm = totals[-1] if torch.is_tensor(norm) else norm
        loss = loss_sum / max(total_weight, 1)
        lr = self.scheduler.get_last_lr()[0]
        update = apply_update(self, loss, norm)  # checked before it is applied
        stop = "error" if failed else "request" if stop_asked else None
        return {
            "loss_sum": loss_sum, "weight": total_weight, "loss": loss,
            "num_tokens": num_tokens, "learning_rate": lr, "interrupted": interrupted,
            "stop": stop, **update, "metrics": metrics, "seconds": time.perf_counter() - start,
        }

    def _stand_in(self) -> dict:
        batch = getattr(self, "_last_batch", None) or self.collate(self.train_items[:1])
        return {**batch, "padding": True}

    def run_evaluation(self, position: tuple[int, int]) -> dict:
        """`eval/loss` on the validation examples and `metrics/*` from generation on the eval
        prompts. A failing metric_fn stops the run, once this step is checkpointed."""
        values = self.evaluate() if self.eval_items else {}
        if self.generation_eval is None:
            return values
        try:
            metrics, columns, rows = self.generation_eval.run(self)
        except MetricFnError as e:
            path = self.checkpoints.save(self, position)
            raise MetricFnError(f"{e} (at step {self.step}; the run is saved in {path})") from e
        if self.accelerator.is_main_process:
            print(f"samples at step {self.step}:\n{format_table(columns, rows)}", flush=True)
        self.tracker.log_table("samples", columns, rows, self.step)
        return {**values, **metrics}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss on the validation examples (`eval/loss`), the same mean as in training, and the
        method's figures from `compute_loss` as `eval/<name>`."""
        acc, model = self.accelerator, self.model
        was_training = model.training
        model.eval()
        bs = self.eval_items_per_batch()
        shard = self.eval_items[acc.process_index::acc.num_processes]
        batches = [shard[i:i + bs] for i in range(0, len(shard), bs)]
        # every process runs the same number of forward passes (sharded models need all ranks)
        n_batches = len(batches)
        if acc.num_processes > 1:
            n_batches = int(acc.gather(torch.tensor([n_batches], device=acc.device)).max())
        loss_sum, weight, metric_sums = 0.0, 0.0, {}
        for i in range(n_batches):
            real = i < len(batches)
            items = batches[i] if real else batches[-1] if batches else self.eval_items[:1]
            batch = self.to_device(self.collate(items))
            if not real:  # a repeat that keeps the processes in step: it counts for nothing
                batch["padding"] = True
            s, metrics = self.compute_loss(model, batch)
            if real:
                loss_sum += float(s)
                weight += float(self.loss_weight(batch))
            for name, (ms, mc) in metrics.items():  # every process reduces the same names
                sums = metric_sums.setdefault(name, [0.0, 0.0])
                sums[0] += float(ms) if real else 0.0
                sums[1] += float(mc) if real else 0.0
        names = sorted(metric_sums)
        total = reduce_sum(acc, [loss_sum, weight] + [v for n in names for v in metric_sums[n]])
        total = total.tolist()
        model.train(was_training)
        values = {"eval/loss": total[0] / max(total[1], 1.0)}
        for j, name in enumerate(names):
            s, c = total[2 + 2 * j], total[3 + 2 * j]
            if c:  # nothing measured: left out rather than logged as 0
                values[f"eval/{name}"] = s / c
        return values

    # ------------------------------------------------------------------ logging and saving

    def log(self, values: dict) -> dict:
        """Records `values` at this step (in `log_history`, the trackers, the callbacks' `on_log`);
        returns the entry, {} when there was nothing to record."""
        entry = {"step": self.step, **{k: v for k, v in values.items() if v is not None}}
        if len(entry) == 1:
            return {}  # nothing to record (e.g. an evaluation with nothing to evaluate)
        if self.log_history and self.log_history[-1]["step"] == self.step:
            self.log_history[-1].update(entry)
        else:
            self.log_history.append(entry)
        if hasattr(self, "tracker"):  # absent while __init__ is still running
            self.tracker.log(entry, self.step)
        if self.accelerator.is_main_process and not self.config.train.progress_bar:
            print(format_log_line(entry, self.step, self.total_steps), flush=True)
        self.callbacks.call("on_log", self, entry)
        return entry

    def save_checkpoint(self, position: tuple[int, int]) -> Path:
        """Writes this step's checkpoint (every process calls it), then `on_save`."""
        path = self.checkpoints.save(self, position)
        self.callbacks.call("on_save", self, path)
        return path

    def save_best(self, position: tuple[int, int]) -> None:
        """Keeps `best/` when this step's `train.save_best` figure is the best so far."""
        path = self.checkpoints.maybe_save_best(self, position)
        if path is not None:
            self.callbacks.call("on_save", self, path)

    def save_pretrained(self, path: str, merge_adapters: bool = False) -> None:
        """Writes the model as an ordinary Hugging Face folder, with its tokenizer and a model
        card (README.md); every process calls this. A write that fails (a full disk) leaves
        `path` as it was and raises CheckpointWriteError on every process, naming the folder, the
        space needed and the last checkpoint's copy."""
        try:
            save_pretrained(self.accelerator, self.model, self.tokenizer, path,
                            merge_adapters=merge_adapters, card=self.model_card(path))
        except CheckpointWriteError as e:
            last = self.checkpoints.last_saved
            if last is None or not (last / "hf_model").is_dir():
                raise
            step = json.loads((last / STATE_FILE).read_text())["step"]
            error = CheckpointWriteError(f"{e}; the last checkpoint holds the model as of step "
                                         f"{step}, as a Hugging Face folder: {last / 'hf_model'}")
            error.errno = e.errno
            raise error from e.__cause__

    def model_card(self, folder: Any = None) -> ModelCard:
        """The model card of the run as it stands (`folder`: where it is saved)."""
        return describe_run(self.config, step=self.step, total_steps=self.total_steps,
                            processes=self.accelerator.num_processes,
                            log_history=self.log_history,
                            data_report=getattr(self, "data_report", None),
                            datasets=self.dataset_names, folder=folder)


class _Window:
    """Figures accumulated between two log lines."""

    def __init__(self):
        self.loss_sum = self.weight = self.tokens = self.seconds = 0.0
        self.metrics: dict[str, list[float]] = {}
        self.last: dict = {}

    def add(self, out: dict) -> None:
        self.loss_sum += out["loss_sum"]
        self.weight += out["weight"]
        self.tokens += out["num_tokens"]
        self.seconds += out["seconds"]
        for name, (s, c) in out["metrics"].items():
            m = self.metrics.setdefault(name, [0.0, 0.0])
            m[0] += s
            m[1] += c
        self.last = out

    def summary(self) -> dict:
        values = {
            "loss": self.loss_sum / max(self.weight, 1.0),
            "learning_rate": self.last["learning_rate"],
            "grad_norm": self.last["grad_norm"],
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }
        for name, (s, c) in self.metrics.items():
            if c:  # nothing measured in the window (a class absent): left out, not logged as 0
                values[name] = s / c
        return values
