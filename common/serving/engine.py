"""Batched generation for the server: one scheduler thread owns the model; requests never call it.

Concurrent requests share one forward pass per decode step (continuous batching): a request that
arrives mid-flight is prefilled and joins the running batch at the next step boundary (its KV cache
left-padded to the batch's length), and a finished row leaves it. Admission is bounded: at most
`max_concurrent` rows decode at once and `max_queue` wait; beyond that `submit` raises QueueFull.
Memory is a budget: a request joins the batch only when the batch's KV cache at its worst (every row
at its longest prompt + max_tokens, the cache padded to the longest) fits `kv_budget` tokens; a
prefill pass takes at most `max_prefill_tokens` prompt tokens; label scoring runs in chunks that fit
what the batch leaves free.
A row's deadline is checked every step, so a timed-out generation really stops and frees its slot.
Label scoring (common/model/label_scoring.py) runs on the same thread, between decode steps.

Every admitted request ends with exactly one finish reason, whatever fails: a pass that raises fails
the requests in it at once (prefill: the joining ones; decode: the batch; scoring: that request) and
the loop goes on; between passes `admitted == waiting + running` is checked.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from common.model.batching import left_pad, left_pad_cache, position_ids
from common.model.label_scoring import score_label_ids
from common.model.loading import model_device
from common.serving.engine_requests import Draining, GenRequest, QueueFull, ScoreRequest
from common.serving.sampling import penalize, sample

__all__ = ["Engine", "Draining", "GenRequest", "QueueFull", "ScoreRequest"]

log = logging.getLogger("serve.engine")


class Engine:
    def __init__(self, model, tokenizer, max_concurrent: int, max_queue: int, max_queue_wait_s: float,
                 batch_wait_ms: float, eos_ids: list[int] | None = None, unhealthy_after: int = 3,
                 unhealthy_window_s: float = 60.0, kv_budget: int = 10**9, max_prefill_tokens: int = 10**9):
        self.model, self.tok = model, tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.max_queue_wait_s, self.batch_wait_s = max_queue_wait_s, batch_wait_ms / 1000
        self.eos_ids = set(eos_ids or [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id])
        self.device = model_device(model)
        self.kv_budget, self.max_prefill_tokens = kv_budget, max_prefill_tokens
        self.pending: list[GenRequest | ScoreRequest] = []
        self.rows: list[GenRequest] = []          # the running batch, in cache order
        self.cache = self.mask = self.pos = self.last = None
        self.wake = threading.Condition()  # guards pending and admitted; re-entrant (an RLock inside)
        self.draining, self.abort_reason = False, None
        self.decode_steps = 0
        # admitted counts every request from submit to finish: waiting, prefilling or decoding
        self.admitted = self.peak_admitted = 0
        self.peak_kv_reserved = self.peak_rows = 0  # the most the batch ever held: KV tokens reserved, rows
        self.phase = "idle"  # the pass running now: prefill | join | decode | score (logs; fault-injection tests)
        self.failures = self.consecutive_failures = self.accounting_errors = 0
        self.last_failure, self.last_failure_at = None, 0.0
        self.unhealthy_after, self.unhealthy_window_s = unhealthy_after, unhealthy_window_s
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ what request threads call
    def submit(self, req: GenRequest | ScoreRequest) -> None:
        with self.wake:
            if self.draining:
                raise Draining()
            if self.admitted >= self.max_concurrent + self.max_queue:
                raise QueueFull()
            self.pending.append(req)
            self.admitted += 1
            self.peak_admitted = max(self.peak_admitted, self.admitted)
            self.wake.notify()

    def occupancy(self) -> tuple[int, int]:
        """(in flight, waiting): decoding rows, and the rest of what is admitted. A row that finished this
        step is no longer admitted but leaves the batch only at the step's end: it is not counted."""
        with self.wake:
            running = sum(not r.done.is_set() for r in self.rows)
            return running, self.admitted - running

    def drain(self) -> None:
        """Admit nothing new; what waits and has not started ends now ('draining'); what runs goes on."""
        with self.wake:
            self.draining = True
            for r in self.pending:
                self._finish(r, "draining")
            self.pending.clear()
            self.wake.notify()

    def abort(self, reason: str) -> None:
        """End everything admitted at the next step boundary (a drain's grace period is over)."""
        with self.wake:
            self.abort_reason = reason
            self.wake.notify()

    def idle(self) -> bool:
        return self.occupancy() == (0, 0)

    def problem(self) -> str | None:
        """None while the engine works; otherwise why not: its thread died, or the last
        `unhealthy_after` passes all failed, the latest within `unhealthy_window_s`."""
        if not self.thread.is_alive():
            return "the engine thread has stopped"
        recent = time.monotonic() - self.last_failure_at < self.unhealthy_window_s
        if self.consecutive_failures >= self.unhealthy_after and recent:
            return f"the last {self.consecutive_failures} forward passes failed; last: {self.last_failure}"
        return None

    def report(self) -> dict:
        """The engine's own accounting, read under its lock: what it holds, its peaks, how its passes went."""
        with self.wake:
            admitted, waiting, running = self.admitted, len(self.pending), len(self.rows)
            reserved = self.kv_reserved(self.rows)
        return {"admitted": admitted, "waiting": waiting, "running": running, "kv_budget_tokens": self.kv_budget,
                "kv_tokens_reserved": reserved, "peak_kv_tokens_reserved": self.peak_kv_reserved,
                "peak_running": self.peak_rows, "peak_admitted": self.peak_admitted,
                "max_prefill_tokens": self.max_prefill_tokens, "failed_passes": self.failures,
                "consecutive_failures": self.consecutive_failures, "last_failure": self.last_failure,
                "accounting_errors": self.accounting_errors, "health": self.problem() or "ok"}

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        while True:
            try:
                self._cycle()
            except Exception as e:  # a bug between passes: end what is admitted rather than strand it
                with self.wake:
                    stranded, self.pending = list(self.pending), []
                self._fail(stranded + list(self.rows), "engine", e, reset=True)
            self._check_accounting()

    def _cycle(self) -> None:
        scores, joining = self._take()
        for s in scores:
            self._guarded("score", [s], self._score, s)
        if joining:
            self._prefill(joining)
        if self.rows:
            self._guarded("decode", list(self.rows), self._step, reset=True)

    def _guarded(self, phase: str, requests: list, work, *args, reset: bool = False) -> bool:
        """One pass; if it raises, exactly `requests` fail (a 5xx at once) and the loop goes on.
        `reset`: the pass touched the running batch, so the batch goes with them."""
        self.phase = phase
        try:
            work(*args)
        except Exception as e:
            self._fail(requests, phase, e, reset)
            return False
        finally:
            self.phase = "idle"
        self.consecutive_failures = 0
        return True

    def _fail(self, requests: list, phase: str, error: BaseException, reset: bool) -> None:
        log.error("%s failed for %d request(s): %s: %s", phase, len(requests), type(error).__name__, error,
                  exc_info=error, extra={"phase": phase, "requests": len(requests)})
        self.failures += 1
        self.consecutive_failures += 1
        self.last_failure, self.last_failure_at = f"{phase}: {type(error).__name__}: {error}", time.monotonic()
        for r in requests + (self.rows if reset else []):  # _finish ends a request once, whatever calls it
            self._finish(r, "error")
        if reset:  # the batch's cache may be half-updated: nothing in it can go on
            self.rows, self.cache = [], None
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_accounting(self) -> None:
        """Between passes what is admitted is waiting or running; a mismatch is a bug: logged, counted,
        and repaired, so capacity is never lost for good."""
        with self.wake:
            held = len(self.pending) + len(self.rows)
            if self.admitted != held:
                log.error("admission accounting: %d admitted but %d waiting or running", self.admitted, held)
                self.accounting_errors += 1
                self.admitted = held

    def _take(self) -> tuple[list[ScoreRequest], list[GenRequest]]:
        """Expire stale waiters; hand out score requests and as many generations as there are slots."""
        with self.wake:
            if not self.pending and not self.rows:
                self.wake.wait(timeout=0.5)
                if self.pending and self.batch_wait_s > 0:  # a first arrival: let a burst gather
                    self.wake.wait(timeout=self.batch_wait_s)
            if self.abort_reason:
                for r in self.pending + self.rows:
                    self._finish(r, self.abort_reason)
                self.pending, self.rows, self.cache, self.abort_reason = [], [], None, None
            now = time.monotonic()
            for r in [r for r in self.pending if r.cancelled or now - r.enqueued > self.max_queue_wait_s
                      or now > r.deadline]:
                self.pending.remove(r)
                self._finish(r, "cancelled" if r.cancelled else "queue_timeout")
            scores, joining = self._admit()
            for r in scores + joining:
                self.pending.remove(r)
            return scores, joining

    def kv_in_use(self) -> int:
        """KV tokens the running batch has reserved now."""
        with self.wake:
            return self.kv_reserved(self.rows)

    def kv_reserved(self, rows: list[GenRequest]) -> int:
        """KV tokens a batch of `rows` can reach: the cache is padded to its longest row."""
        return len(rows) * max((r.worst_tokens for r in rows), default=0)

    def _admit(self) -> tuple[list[ScoreRequest], list[GenRequest]]:
        """In arrival order, what fits now: a slot, the KV budget, the prefill pass's token cap. The
        first request that does not fit stops the rest, so a long one is never starved by short ones."""
        scores, joining, prefill = [], [], 0
        for r in self.pending:
            if isinstance(r, ScoreRequest):
                free = self.kv_budget - self.kv_reserved(self.rows + joining)
                r.chunk = min(len(r.prompt_ids), free // r.tokens_per_prompt)
                if r.chunk < 1:
                    break
                scores.append(r)
                continue
            batch = self.rows + joining + [r]
            if (len(batch) > self.max_concurrent or self.kv_reserved(batch) > self.kv_budget
                    or (joining and prefill + len(r.prompt_ids) > self.max_prefill_tokens)):
                break
            joining.append(r)
            prefill += len(r.prompt_ids)
        return scores, joining

    def _finish(self, r, reason: str) -> None:
        with self.wake:
            if r.done.is_set():  # the failure path may reach a row that already finished
                return
            self.admitted -= 1
        r.finish_reason = r.finish_reason or reason
        if isinstance(r, GenRequest) and r.out_ids and not r.stop:
            r.text = self.tok.decode(r.out_ids, skip_special_tokens=True)
        if isinstance(r, GenRequest) and r.events is not None:
            r.events.put(("done", None))
        r.done.set()

    @torch.no_grad()
    def _score(self, s: ScoreRequest) -> None:
        if s.cancelled:
            return self._finish(s, "cancelled")
        if time.monotonic() > s.deadline:
            return self._finish(s, "timeout")
        s.logprobs = score_label_ids(self.model, self.tok, s.prompt_ids, s.labels, s.chunk).logprobs
        self._finish(s, "stop")

    def _prefill(self, new: list[GenRequest], retry: bool = True) -> None:
        """Prefill the joining requests and merge them into the running batch. A failed prefill fails
        only them; an out-of-memory one is retried once with one request at a time."""
        self.phase = "prefill"
        try:
            out, mask, pos = self._prefill_forward(new)
        except torch.OutOfMemoryError as e:
            if not (retry and len(new) > 1):
                return self._fail(new, "prefill", e, reset=False)
            log.warning("prefill of %d prompts ran out of memory; trying them one at a time", len(new))
            del e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for r in new:
                self._prefill([r], retry=False)
            return
        except Exception as e:
            return self._fail(new, "prefill", e, reset=False)
        finally:
            self.phase = "idle"
        self._guarded("join", list(self.rows) + new, self._join, new, out, mask, pos, reset=True)

    @torch.no_grad()
    def _prefill_forward(self, new: list[GenRequest]):
        """Run the new prompts as one left-padded batch: (model output, attention mask, positions)."""
        now = time.monotonic()
        for r in new:
            r.started_at = now
            r.generator = torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else None
        ids, mask = (t.to(self.device) for t in left_pad([r.prompt_ids for r in new], self.tok.pad_token_id))
        pos = position_ids(mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out, mask, pos

    def _join(self, new: list[GenRequest], out, mask: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge prefilled rows into the running batch: both caches left-padded to the longer history."""
        cache, last_pos = out.past_key_values, pos[:, -1] + 1
        if self.rows:
            t = max(self.mask.shape[1], mask.shape[1])
            self.mask, mask = left_pad_cache(self.cache, self.mask, t), left_pad_cache(cache, mask, t)
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
            self.mask, self.pos = torch.cat([self.mask, mask]), torch.cat([self.pos, last_pos])
        else:
            self.cache, self.mask, self.pos = cache, mask, last_pos
        self.rows += new
        self.peak_rows = max(self.peak_rows, len(self.rows))
        self.peak_kv_reserved = max(self.peak_kv_reserved, self.kv_reserved(self.rows))
        self._advance(new, out.logits[:, -1], first=len(self.rows) - len(new))

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step for every running row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        out = self.model(input_ids=self.last, attention_mask=self.mask, position_ids=self.pos[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.pos = self.pos + 1
        self.decode_steps += 1
        self._advance(self.rows, out.logits[:, -1], first=0)

    def _advance(self, rows: list[GenRequest], logits: torch.Tensor, first: int) -> None:
        """Sample a token for each of `rows` (batch positions first..), emit text, retire finished rows."""
        greedy = logits.argmax(-1).tolist()  # one op for the whole batch; the other rows redo theirs
        tokens = [greedy[i] if r.sampling.temperature <= 0 and not r.sampling.penalized else
                  sample(penalize(logits[i], r.sampling, r.prompt_ids, r.out_ids), r.sampling, r.generator)
                  for i, r in enumerate(rows)]
        new_last = torch.tensor(tokens, device=self.device)[:, None]
        self.last = new_last if first == 0 else torch.cat([self.last[:first], new_last])
        now = time.monotonic()
        for r, token in zip(rows, tokens):
            r.mark_token(now)
            reason = self._append(r, token, now)
            if reason:
                self._finish(r, reason)
        keep = [i for i, r in enumerate(self.rows) if not r.done.is_set()]
        if len(keep) < len(self.rows):
            self._retire(keep)

    def _append(self, r: GenRequest, token: int, now: float) -> str | None:
        """Add a token to a row; the finish reason when the row is done."""
        if r.cancelled:
            return "cancelled"
        if token in self.eos_ids and not r.ignore_eos:
            if r.events is not None or r.stop:
                r.text = self.tok.decode(r.out_ids, skip_special_tokens=True)
                self._emit(r, final=True)
            return "stop"
        r.out_ids.append(token)
        full = len(r.out_ids) >= r.max_tokens
        hit = []
        if r.events is not None or r.stop or full:  # text is needed now; otherwise once, at the end
            r.text = self.tok.decode(r.out_ids, skip_special_tokens=True)
            hit = [r.text.index(s) for s in r.stop if s in r.text]
            if hit:
                r.text = r.text[:min(hit)]
            self._emit(r, final=bool(hit) or full)
        if hit:
            return "stop"
        if full:
            return "length"
        return "timeout" if now > r.deadline else None

    def _emit(self, r: GenRequest, final: bool) -> None:
        """Stream the text that can no longer change: not a half-decoded character, not a possible stop prefix."""
        if r.events is None:
            return
        hold = 0 if final else max((len(s) - 1 for s in r.stop), default=0)
        safe = len(r.text) - hold
        while safe > r.emitted and r.text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > r.emitted:
            r.events.put(("delta", r.text[r.emitted:safe]))
            r.emitted = safe

    def _retire(self, keep: list[int]) -> None:
        """Drop finished rows from the batch and trim history no remaining row attends to."""
        if not keep:
            self.rows, self.cache = [], None
            return
        idx = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(idx)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        start = int(self.mask.any(0).nonzero()[0])
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
