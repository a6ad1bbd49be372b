"""The tiny model's chat template renders conversations exactly as Qwen3-8B's own template does.

Each case is a conversation and the exact string Qwen3's published template gives it (rendered with that
template when this table was written): the generation prompt with thinking on, off and unset; a final
assistant turn (an empty think block when it has no reasoning); reasoning kept after the last user query
and dropped before it; tools and the tools preamble; tool calls and grouped tool responses.
"""
import pytest

TOOL = {"type": "function", "function": {"name": "get_rate", "description": "汇率",
                                         "parameters": {"type": "object", "properties": {"pair": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_rate", "arguments": {"pair": "USD/CNY"}}}

CASES = [
    ('system+user, prompt, thinking off',
     [{"role": "system", "content": "S"}, {"role": "user", "content": "问"}],
     dict(add_generation_prompt=True, enable_thinking=False),
     '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),
    ('system+user, prompt, thinking on',
     [{"role": "system", "content": "S"}, {"role": "user", "content": "问"}],
     dict(add_generation_prompt=True, enable_thinking=True),
     '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n'),
    ('user, prompt, thinking unset',
     [{"role": "user", "content": "问"}],
     dict(add_generation_prompt=True),
     '<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n'),
    ('final assistant, no reasoning',
     [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
     dict(),
     '<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n答<|im_end|>\n'),
    ('final assistant, think block',
     [{"role": "user", "content": "问"}, {"role": "assistant", "content": "<think>\n想\n</think>\n\n答"}],
     dict(),
     '<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n<think>\n想\n</think>\n\n答<|im_end|>\n'),
    ('final assistant, reasoning_content',
     [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答", "reasoning_content": "想"}],
     dict(),
     '<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n<think>\n想\n</think>\n\n答<|im_end|>\n'),
    ('earlier assistant loses its reasoning',
     [{"role": "user", "content": "问1"}, {"role": "assistant", "content": "<think>想1</think>答1"}, {"role": "user", "content": "问2"}],
     dict(add_generation_prompt=True, enable_thinking=False),
     '<|im_start|>user\n问1<|im_end|>\n<|im_start|>assistant\n答1<|im_end|>\n<|im_start|>user\n问2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),
    ('multi-turn, final answer',
     [{"role": "system", "content": "S"}, {"role": "user", "content": "问1"}, {"role": "assistant", "content": "答1"}, {"role": "user", "content": "问2"}, {"role": "assistant", "content": "答2"}],
     dict(),
     '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n问1<|im_end|>\n<|im_start|>assistant\n答1<|im_end|>\n<|im_start|>user\n问2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n答2<|im_end|>\n'),
    ('tools with system',
     [{"role": "system", "content": "S"}, {"role": "user", "content": "汇率?"}],
     dict(tools=[TOOL], add_generation_prompt=True, enable_thinking=False),
     '<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_rate", "description": "汇率", "parameters": {"type": "object", "properties": {"pair": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n汇率?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),
    ('tools without system',
     [{"role": "user", "content": "汇率?"}],
     dict(tools=[TOOL], add_generation_prompt=True),
     '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_rate", "description": "汇率", "parameters": {"type": "object", "properties": {"pair": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n汇率?<|im_end|>\n<|im_start|>assistant\n'),
    ('tool call and tool responses',
     [{"role": "user", "content": "汇率?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "7.1"}, {"role": "tool", "content": "7.2"}],
     dict(tools=[TOOL], add_generation_prompt=True, enable_thinking=False),
     '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_rate", "description": "汇率", "parameters": {"type": "object", "properties": {"pair": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n汇率?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "get_rate", "arguments": {"pair": "USD/CNY"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n7.1\n</tool_response>\n<tool_response>\n7.2\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),
    ('tool call with text, reasoning after the query kept',
     [{"role": "user", "content": "汇率?"}, {"role": "assistant", "content": "<think>查一下</think>我来查", "tool_calls": [{"name": "get_rate", "arguments": "{\"pair\": \"USD/CNY\"}"}]}, {"role": "tool", "content": "7.1"}, {"role": "assistant", "content": "是7.1"}],
     dict(),
     '<|im_start|>user\n汇率?<|im_end|>\n<|im_start|>assistant\n<think>\n查一下\n</think>\n\n我来查\n<tool_call>\n{"name": "get_rate", "arguments": {"pair": "USD/CNY"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n7.1\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n是7.1<|im_end|>\n'),
    ('system later in the conversation',
     [{"role": "user", "content": "问"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "再问"}],
     dict(add_generation_prompt=True, enable_thinking=False),
     '<|im_start|>user\n问<|im_end|>\n<|im_start|>system\nS2<|im_end|>\n<|im_start|>user\n再问<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),
]


@pytest.mark.parametrize("name,messages,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_renders_as_qwen3_does(tokenizer, name, messages, kwargs, expected):
    assert tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_unknown_role_is_refused(tokenizer):
    with pytest.raises(Exception, match="unsupported role: robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False, add_generation_prompt=True)
