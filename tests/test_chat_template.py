"""The ChatML template download_model.py writes: thinking switch, generation prompt, roles."""
import pytest

MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "问题"}]


def render(tokenizer, messages, **kw):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def test_generation_prompt_with_thinking_off(tokenizer):
    text = render(tokenizer, MESSAGES, add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n问题<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_generation_prompt_with_thinking_on_or_unset(tokenizer):
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n问题<|im_end|>\n<|im_start|>assistant\n"
    assert render(tokenizer, MESSAGES, add_generation_prompt=True, enable_thinking=True) == expected
    assert render(tokenizer, MESSAGES, add_generation_prompt=True) == expected


def test_no_generation_prompt_and_assistant_history(tokenizer):
    history = MESSAGES + [{"role": "assistant", "content": "<think>\n推理\n</think>\n\n答案"},
                          {"role": "user", "content": "再问"}]
    text = render(tokenizer, history, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n答案<|im_end|>\n<|im_start|>user\n再问<|im_end|>\n")
    assert "推理" not in text  # earlier turns' thinking is dropped, as Qwen3's template does


def test_unknown_role_is_refused(tokenizer):
    with pytest.raises(Exception, match="unsupported role: tool"):
        render(tokenizer, [{"role": "tool", "content": "x"}], add_generation_prompt=True)
