"""What the engine takes and gives back: a generation or a label-scoring request, its parameters,
its results and how it ended (finish_reason), and the two ways admission refuses one."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from common.serving.sampling import Sampling


class QueueFull(Exception):
    """Every slot and every queue place is taken."""


class Draining(Exception):
    """The server is shutting down and admits nothing new."""


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    deadline: float                      # time.monotonic() after which the generation stops
    sampling: Sampling = field(default_factory=Sampling)  # greedy unless it says otherwise
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    events: queue.Queue | None = None    # ("delta", text) ... ("done", None), for streaming
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                     # characters of `text` already streamed
    finish_reason: str | None = None     # stop | length | timeout | cancelled | queue_timeout | error |
    #                                      draining (never started) | shutdown (cut at the end of a drain)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    started_at: float | None = None      # its (latest) prefill began: the queue time ends here
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # seconds between successive tokens (inter-token latency)
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None  # seeded sampling, set at prefill

    def mark_token(self, now: float) -> None:
        """A token came out at `now` (monotonic): the first ends the time to first token, each later one
        adds an inter-token gap (vLLM's meaning: one observation per token, not a per-request mean)."""
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps.append(now - self.last_token_at)
        self.last_token_at = now

    @property
    def worst_tokens(self) -> int:
        """The longest this row's KV cache can grow: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_tokens


@dataclass
class ScoreRequest:
    prompt_ids: list[list[int]]
    labels: list[str]
    deadline: float
    label_tokens: int = 1                # the longest label's tokens (+ <|im_end|>): its KV cost per prompt
    chunk: int = 0                       # prompts per scoring pass, set when the engine takes it
    logprobs: torch.Tensor | None = None
    finish_reason: str | None = None
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    @property
    def tokens_per_prompt(self) -> int:
        """KV tokens one prompt takes while scored: its cache, repeated for every label."""
        return len(self.labels) * (max(map(len, self.prompt_ids)) + self.label_tokens)
