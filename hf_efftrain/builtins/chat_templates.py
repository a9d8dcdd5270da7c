"""Named chat templates for ``model.chat_template``: a base model fine-tuned on conversations in the format of its
family's instruct model (LLaMA-Factory's ``template``, Axolotl's ``chat_template``).

Each renders exactly the text of the family's published template and adds ``{% generation %}`` markers around
what an assistant turn writes after its role header: the answer and the end-of-turn token (and the newline after
it), so the model learns to stop. transformers' ``return_assistant_tokens_mask`` turns the markers into the loss mask.

- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` (Qwen 2/2.5, SmolLM, the built-in tokenizer).
- ``llama3``: Meta-Llama-3-Instruct's: BOS, then ``<|start_header_id|>role<|end_header_id|>\\n\\n`` + the trimmed
  content + ``<|eot_id|>`` per turn, no default system prompt.
- ``gemma``: Gemma 3's (and Gemma 2's without a system turn): BOS, ``<start_of_turn>user|model\\n`` + the trimmed
  content + ``<end_of_turn>\\n``; a system turn is prepended to the first user turn with a blank line; roles must
  alternate user/assistant.

``TEMPLATE_TOKENS``: the control tokens a template needs as single tokens of the tokenizer. A template of another
family would split them into pieces the model never saw, so it is refused (chatml is written as text there).
"""

# The answer and its end-of-turn marker (and the newline after it) are inside {% generation %}: the tokens an
# assistant turn adds, the same span a render-by-prefix finds for a template without markers.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- generation %}{{- message['content'] | trim + '<end_of_turn>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "gemma": GEMMA_TEMPLATE}
TEMPLATE_TOKENS = {
    "chatml": (),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
