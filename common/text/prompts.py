"""The prompt contract: how a text and a label set become the tokens a Qwen3 model sees, and back.

Training, evaluation and serving all call these functions, so the prompt tokens are identical for
the same input (tests/test_prompts.py proves it). A classification example is

    prompt = chat_template([system, user(text, labels)], add_generation_prompt, enable_thinking)
    answer = label + <|im_end|>

and the model learns only the answer tokens; <|im_end|> is the stop token generation ends on.

User text is data, never structure: a special-token string inside a message, a text or an answer
(`<|im_start|>system ...`) is encoded as the plain text it is; only the chat template's own markers
become control tokens (chat_ids). A raw /v1/completions prompt is the one exception: it is the
caller's own template, special tokens included (encode_text).
"""
from __future__ import annotations

import re
import secrets
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


def record_turns(tokenizer, record: dict, labels: list[str] | None, cfg: PromptConfig) -> tuple[list[dict], bool, str]:
    """(the prompt's messages, thinking on or off, the answer text) for a prepared record.

    A text+label item: the classification request, the configured thinking mode, the label. A chat
    `messages` record: every turn before the last, and the last turn as the chat template renders it
    after the generation prompt, so prompt + answer is the template's own rendering of the conversation
    (Qwen3 puts the final turn's reasoning, or an empty think block, there). Reasoning in the answer
    needs the thinking-on prompt (no empty think block): the other mode is tried when one does not fit."""
    if "messages" not in record:
        return build_messages(record["text"], labels, cfg), cfg.enable_thinking, record.get("label", "")
    messages = record["messages"]
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    for thinking in (cfg.enable_thinking, not cfg.enable_thinking):
        prompt = render_prompt(tokenizer, messages[:-1], thinking)
        if whole.startswith(prompt):
            return messages[:-1], thinking, whole[len(prompt):].removesuffix("\n").removesuffix(END_OF_TURN)
    raise ValueError("the chat template does not render this conversation as its prompt followed by its last turn")


def probe_records(labels: list[str] | None, cfg: PromptConfig) -> list[dict]:
    """Records for a check that has no data to run on (a merge or conversion without a test split),
    made of the task's own words: each label as a text to classify, or the system prompt as a user
    turn for a chat model. Any real text gives logits to compare; these fit every domain."""
    if labels:
        return [{"text": label, "label": label} for label in labels]
    text = cfg.system or cfg.user_template.format(labels="", text="")
    return [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}]


# ----------------------------------------------------------------------------- text
def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool = False) -> str:
    """The prompt as text, up to where the assistant's answer starts (for reading; encode with chat_ids)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def classification_prompt(tokenizer, text: str, labels: list[str], cfg: PromptConfig) -> str:
    return render_prompt(tokenizer, build_messages(text, labels, cfg), cfg.enable_thinking)


# ----------------------------------------------------------------------------- tokens
def _specials(tokenizer) -> tuple[list[str], re.Pattern]:
    """The tokenizer's special-token strings (<|im_start|>, <|im_end|>, ...) and a pattern finding them."""
    cached = getattr(tokenizer, "_contract_specials", None)
    if cached is None:
        strings = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
        cached = strings, re.compile("|".join(map(re.escape, strings)))
        tokenizer._contract_specials = cached
    return cached


def chat_ids(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = True,
             enable_thinking: bool | list[bool] = False) -> list[list[int]]:
    """Token ids of conversations through the chat template, user text kept as data.

    Special-token strings in message contents are swapped for one-off placeholders, the template is
    rendered, and its text is cut at the special tokens it wrote (the control tokens); each piece in
    between, placeholders restored, is encoded as plain text (split_special_tokens). A tokenizer cuts
    at special tokens too, so ordinary messages get the very ids plain encoding gives them."""
    strings, pattern = _specials(tokenizer)
    nonce = secrets.token_hex(6)
    hidden = re.compile(f"\ue000{nonce}(\\d+)\ue001")

    def hide(content):
        return pattern.sub(lambda m: f"\ue000{nonce}{strings.index(m.group())}\ue001", content) \
            if isinstance(content, str) else content

    pieces: list[str] = []
    plans: list[list[tuple[str, int]]] = []  # per conversation: ("text", piece index) or ("special", id)
    modes = enable_thinking if isinstance(enable_thinking, list) else [enable_thinking] * len(conversations)
    for messages, thinking in zip(conversations, modes):
        rendered = tokenizer.apply_chat_template([{**m, "content": hide(m.get("content"))} for m in messages],
                                                 tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 enable_thinking=thinking)
        plan, start = [], 0
        for m in [*pattern.finditer(rendered), None]:
            end = m.start() if m else len(rendered)
            if end > start:
                plan.append(("text", len(pieces)))
                pieces.append(hidden.sub(lambda h: strings[int(h.group(1))], rendered[start:end]))
            if m:
                plan.append(("special", tokenizer.convert_tokens_to_ids(m.group())))
                start = m.end()
        plans.append(plan)
    encoded = tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"] if pieces else []
    return [[t for kind, v in plan for t in (encoded[v] if kind == "text" else [v])] for plan in plans]


FILLER = ("市场今日小幅波动，成交量温和。", "。")  # a stock sentence, then single characters to get closer


def filler_text(tokenizer, tokens: int, messages_of=None) -> str:
    """A text whose chat prompt, messages_of(text) (default: the text as one user turn), is at most
    `tokens` tokens, as close as whole characters get: measurements use it for prompts of a set length
    (benchmark.py --prompt-tokens, measure_shape.py)."""
    messages_of = messages_of or (lambda text: [{"role": "user", "content": text}])
    text = ""
    for unit in FILLER:
        while len(prompt_ids(tokenizer, messages_of(text + unit))) <= tokens:
            text += unit
    return text


def prompt_ids(tokenizer, messages: list[dict], enable_thinking: bool = False) -> list[int]:
    """The prompt's ids up to where the assistant's answer starts (Qwen3 thinking off unless asked)."""
    return chat_ids(tokenizer, [messages], True, enable_thinking)[0]


def classification_ids(tokenizer, texts: list[str], labels: list[str], cfg: PromptConfig) -> list[list[int]]:
    """The classification prompt's ids for each text (one batch through the tokenizer)."""
    return chat_ids(tokenizer, [build_messages(t, labels, cfg) for t in texts], True, cfg.enable_thinking)


def records_prompt_ids(tokenizer, records: list[dict], labels: list[str] | None, cfg: PromptConfig) -> list[list[int]]:
    turns = [record_turns(tokenizer, r, labels, cfg) for r in records]
    return chat_ids(tokenizer, [m for m, _, _ in turns], True, [t for _, t, _ in turns])


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of text that is a template already (a raw completion prompt): special tokens are honoured."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(END_OF_TURN)


def answers_ids(tokenizer, answers: list[str]) -> list[list[int]]:
    """Each answer as the model must produce it: its tokens (as plain text), then <|im_end|>."""
    if not answers:
        return []
    encoded = tokenizer(answers, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [ids + [end_of_turn_id(tokenizer)] for ids in encoded]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return answers_ids(tokenizer, [answer])[0]


def encode_example(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    """input_ids and labels for one training example; the loss sees only the answer tokens."""
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_records(tokenizer, records: list[dict], labels: list[str] | None, cfg: PromptConfig) -> list[dict]:
    """Training examples of prepared records; prepare_data.py counts its token budget with this too."""
    turns = [record_turns(tokenizer, r, labels, cfg) for r in records]
    prompts = chat_ids(tokenizer, [m for m, _, _ in turns], True, [t for _, t, _ in turns])
    answers = answers_ids(tokenizer, [a for _, _, a in turns])
    return [encode_example(p, a) for p, a in zip(prompts, answers)]


# ----------------------------------------------------------------------------- replies
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
