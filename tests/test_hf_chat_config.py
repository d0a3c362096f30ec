"""conf/hf_chat.yaml: the starter config for a Hugging Face chat model (issue 11, item 14)."""

import json
from pathlib import Path

import pytest

from conftest import build_char_tokenizer_dir
from nemo_guide.cli import main, make_backend
from nemo_guide.config import load_config
from nemo_guide.data.hints import DEFAULT_HINT_TEMPLATE
from nemo_guide.data.records import Record, write_records
from nemo_guide.data.templates import REASONING_SYSTEM_PROMPT
from nemo_guide.prompts import PromptSettings, encode_prompts

HF_CHAT = Path(__file__).resolve().parents[1] / "conf" / "hf_chat.yaml"
PLACEHOLDER = "/path/to/hf_chat_model"
# ChatML, the template family of Qwen2.5 chat models.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The tiny tokenizer is character-level, so the Appendix I system prompt plus an Appendix G
# hint (~1,200 characters) takes more than the shipped 1024 tokens (a BPE tokenizer: about 300).
CHAR_LEVEL = ["data.max_prompt_tokens=4096", "backend.device=cpu"]


def test_hf_chat_config_validates_with_the_paper_settings():
    cfg = load_config(HF_CHAT)
    assert (cfg.data.prompt_style, cfg.data.hint_template, cfg.data.system_prompt) == ("chat", None, None)  # Appendix I + G
    assert cfg.data.reward == "math" and cfg.data.reward_workers > 1
    assert cfg.optim.lr == 1e-6 and cfg.algorithm.group_size == 8  # paper, Table 11
    assert cfg.generation.max_new_tokens == 3072 and cfg.data.max_prompt_tokens == 1024  # paper, Table 11
    assert (cfg.backend.name, cfg.backend.device, cfg.backend.model) == ("torch", "cuda", PLACEHOLDER)
    # no bfloat16: the torch backend has no float32 master weights (see the comment in the file)
    assert cfg.backend.dtype == "float32"


def test_hf_chat_placeholder_model_is_a_one_line_error(capsys):
    rc = main(["train", str(HF_CHAT), "backend.device=cpu", "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1  # one line (besides the thread-count note)
    assert errors[0].startswith(f"error: backend.model = '{PLACEHOLDER}': not a Hugging Face model directory")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random Qwen2 model whose tokenizer has a ChatML chat template, 8K positions."""
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("chat_model")
    fast, vocab = build_char_tokenizer_dir(path)
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _chatml(user):
    return f"<|im_start|>system\n{REASONING_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_hf_chat_prompts_from_a_chat_template(chat_model_dir):
    cfg = load_config(HF_CHAT, [f"backend.model={chat_model_dir}", *CHAR_LEVEL])
    backend = make_backend(cfg)
    record = Record("r1", "What is $2+3$?", "5", hint="1. Add.\n2. Count.\n3. Check.")
    prompts = encode_prompts([record], backend, PromptSettings.from_config(cfg))
    plain, hinted = prompts.plain[0], prompts.hinted[0]
    assert plain.text == _chatml("What is $2+3$?")
    # Appendix G's template inside the user turn; the system prompt is unchanged
    assert hinted.text == _chatml(DEFAULT_HINT_TEMPLATE.replace("{problem}", record.problem).replace("{hint}", record.hint))
    assert "[HINT_START]\n1. Add.\n2. Count.\n3. Check.\n[HINT_END]" in hinted.text
    # both are tokenised and fit (data.max_prompt_tokens, and the context with max_new_tokens)
    assert 0 < len(plain.ids) < len(hinted.ids) and plain.problem is None and hinted.problem is None


def test_hf_chat_config_trains_one_step(chat_model_dir, tmp_path):
    """The shipped settings end to end on the tiny model, made small: a random policy fails every
    plain rollout, so every prompt is guided with its hinted chat prompt and verified by math-verify."""
    from nemo_guide.loop import train

    data = tmp_path / "train.jsonl"
    write_records(data, [Record(f"p{i}", f"What is {i}+{i}?", str(2 * i), hint="1. Add.\n2. Double.\n3. Check.") for i in range(2)])
    small = ["data.prompt_batch_size=2", "algorithm.group_size=2", "generation.max_new_tokens=4", "run.steps=1", "run.save_every=0", "data.reward_workers=2"]
    cfg = load_config(HF_CHAT, [f"backend.model={chat_model_dir}", f"data.train={data}", f"run.output_dir={tmp_path}", *CHAR_LEVEL, *small])
    summary = train(cfg, make_backend(cfg), progress=False, log=lambda _: None)
    assert summary["steps"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "hf_chat" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "train/guided_frac" in m)
    assert step["train/reward"] == 0.0 and step["train/guided_frac"] == 1.0
