"""The prompt contract: how a text and a label set become the tokens a Qwen3 model sees, and back.

Training, evaluation and serving all call these functions, so the prompt bytes are identical for
the same input (tests/test_prompts.py proves it). A classification example is

    prompt = chat_template([system, user(text, labels)], add_generation_prompt, enable_thinking)
    answer = label + <|im_end|>

and the model learns only the answer tokens; <|im_end|> is the stop token generation ends on.
"""
from __future__ import annotations

import re
import unicodedata

from common.config import PromptConfig

END_OF_TURN = "<|im_end|>"
IGNORE_INDEX = -100  # label id the loss skips (the prompt tokens)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


def build_messages(text: str, labels: list[str], cfg: PromptConfig) -> list[dict]:
    """The chat messages that ask the model to classify `text` into one of `labels`."""
    try:
        user = cfg.user_template.format(labels=cfg.label_separator.join(labels), text=text)
    except (KeyError, IndexError) as e:
        raise ValueError(f"prompt.user_template may only use {{labels}} and {{text}}; it uses {e}") from None
    messages = [{"role": "user", "content": user}]
    return [{"role": "system", "content": cfg.system}] + messages if cfg.system else messages


def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool = False) -> str:
    """The prompt text up to where the assistant's answer starts (Qwen3 thinking off unless asked)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def classification_prompt(tokenizer, text: str, labels: list[str], cfg: PromptConfig) -> str:
    return render_prompt(tokenizer, build_messages(text, labels, cfg), cfg.enable_thinking)


def prompt_and_answer(tokenizer, record: dict, labels: list[str] | None, cfg: PromptConfig) -> tuple[str, str]:
    """The prompt contract for both kinds of prepared data: a text+label item, or a chat `messages`
    record whose last (assistant) turn is the answer."""
    if "messages" in record:
        return render_prompt(tokenizer, record["messages"][:-1], cfg.enable_thinking), record["messages"][-1]["content"]
    return classification_prompt(tokenizer, record["text"], labels, cfg), record.get("label", "")


def probe_records(labels: list[str] | None, cfg: PromptConfig) -> list[dict]:
    """Records for a check that has no data to run on (a merge or conversion without a test split),
    made of the task's own words: each label as a text to classify, or the system prompt as a user
    turn for a chat model. Any real text gives logits to compare; these fit every domain."""
    if labels:
        return [{"text": label, "label": label} for label in labels]
    text = cfg.system or cfg.user_template.format(labels="", text="")
    return [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text; the template already holds every special token it needs."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(END_OF_TURN)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The assistant's answer as the model must produce it: its tokens, then <|im_end|>."""
    return encode_text(tokenizer, answer) + [end_of_turn_id(tokenizer)]


def encode_example(tokenizer, prompt: str, answer: str) -> dict[str, list[int]]:
    """input_ids and labels for one training example; the loss sees only the answer tokens."""
    prompt_ids, target_ids = encode_text(tokenizer, prompt), answer_ids(tokenizer, answer)
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def strip_thinking(reply: str) -> str:
    """Drop a Qwen3 <think>...</think> block (also an unclosed one) and the end-of-turn marker."""
    reply = _THINK_BLOCK.sub("", reply)
    if "<think>" in reply:
        reply = reply.split("<think>")[0]
    return reply.replace(END_OF_TURN, "").strip()


def _normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip().lower()
    return s.strip(" \t\n\"'“”‘’`。.,，:：;；!！?？()（）[]【】")


def parse_label(reply: str, labels: list[str]) -> str | None:
    """Map a generated reply back to a label: exact match, else the one label it mentions, else None."""
    answer = _normalize(strip_thinking(reply))
    by_norm = {_normalize(label): label for label in labels}
    if answer in by_norm:
        return by_norm[answer]
    found = [label for norm, label in by_norm.items() if norm and norm in answer]
    # a reply that names one label inside a longer sentence counts; two different labels do not
    longest = [label for label in found if not any(label != o and label in o for o in found)]
    return longest[0] if len(longest) == 1 else None
