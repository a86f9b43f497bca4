"""The bookkeeping around a training loop, shared by both stages, so each script's loop shows only
its step: the run folder claimed and locked, --resume, the JSONL log, the NaN guard, periodic
checkpoints, Ctrl-C, and the DONE mark.

    with Training(out, "stage1", params, optimizer, scaler, generator, steps, save_every,
                  resume, overwrite) as training:
        for step in tqdm(range(training.start, steps)):
            rng_before, t0 = training.begin_step()
            loss, terms = ...                                   # the step's math
            values, ms = training.record(step, loss, terms, rng_before, t0)
        ... save the outputs ...
    # DONE_stage1 is written only when the block finished without an exception

A Ctrl-C interrupts at once except while a step is being recorded (optimizer step, log line,
checkpoint); the interrupted run saves the state after the last finished step, so --resume always
works and continues exactly.
"""
import contextlib
import os
import time

import torch

from model import run
from model.errors import UserError


class Training:
    def __init__(self, out, stage, params, optimizer, scaler, generator, steps, save_every, resume, overwrite,
                 meta=None):
        self.out, self.stage, self.steps, self.save_every = out, stage, steps, save_every
        self.params, self.optimizer, self.scaler, self.generator = params, optimizer, scaler, generator
        self.resume, self.overwrite, self.meta = resume, overwrite, meta
        self.label = stage.replace("stage", "stage ")  # "stage1" -> "stage 1", as the messages say it

    def __enter__(self):
        stack = contextlib.ExitStack()
        try:
            self.checkpoint_path = stack.enter_context(run.claim_out(self.out, self.stage, self.resume,
                                                                     self.overwrite))
            self.start = 0
            if self.resume:
                self.start, _ = run.load_checkpoint(self.checkpoint_path, self.params, self.optimizer, self.generator)
                print(f"resuming at step {self.start}")
            self.log = run.Log(os.path.join(self.out, f"{self.stage}_log.jsonl"),
                               resume_step=self.start if self.resume else None)
            # what an interrupted run saves: the state after the last finished step
            self.finished, self.rng_finished = self.start, self.generator.get_state()
            self.boundary = stack.enter_context(run.StepBoundary())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def begin_step(self):
        """The generator's state before the step draws anything (a NaN stop saves it, so --resume
        replays the step) and its start time."""
        return self.generator.get_state(), time.perf_counter()

    def save(self, step):
        run.save_checkpoint(self.checkpoint_path, self.params, self.optimizer, self.generator, step, self.meta)

    def record(self, step, loss, terms, rng_before, t0):
        """Apply the step (backward, clip, optimizer), log it and checkpoint when due; returns the
        loss terms as numbers and the step's milliseconds. A non-finite loss stops the run with the
        state before the step saved."""
        if not torch.isfinite(loss):
            self.generator.set_state(rng_before)
            self.save(step)
            raise UserError(f"the loss became {loss.item()} at step {step}; the last good state (before step "
                            f"{step}) is saved, try a lower --lr and --resume")
        with self.boundary.deferred():  # a Ctrl-C from here on waits until the step is recorded
            run.optimizer_step(loss, self.optimizer, self.scaler, list(self.params.values()))
            values = {name: round(value.item(), 6) for name, value in terms.items()}
            if loss.is_cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1000
            self.log.write({"step": step + 1, "loss": round(loss.item(), 6), **values, "ms": round(ms, 2)})
            self.finished, self.rng_finished = step + 1, self.generator.get_state()
            if (step + 1) % self.save_every == 0 and step + 1 < self.steps:
                self.save(step + 1)
        return values, ms

    def __exit__(self, kind, value, tb):
        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt) and not issubclass(kind, run.Interrupted):
                self.boundary.hold()  # a second Ctrl-C must not cut this save short
                self.generator.set_state(self.rng_finished)
                self.save(self.finished)
                raise run.Interrupted(f"{self.label} stopped after step {self.finished} of {self.steps}; that state "
                                      f"is saved in {self.checkpoint_path}: continue with --resume") from None
            if kind is None:
                run.mark_done(self.out, self.stage)
        finally:
            self._stack.close()
        return False
