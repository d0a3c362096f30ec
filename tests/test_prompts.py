"""Prompt preparation names the record and the dataset of any prompt it cannot build."""

import pytest

from nemo_guide.data.records import Record
from nemo_guide.errors import RunError
from nemo_guide.prompts import PromptSettings, encode_prompts

RECORDS = [Record("r1", "1+1=", "2", hint="add"), Record("r2", "2+2=", "4", hint="add them")]


class CharTok:
    """A minimal PromptTokenizer: one id per character, no chat template."""

    chat_tokenizer = None
    max_length = 1024

    def encode(self, text, *, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class BrokenTok(CharTok):
    """Fails on the second record's hinted prompt with an error that is not a user's."""

    def encode(self, text, *, add_special_tokens=True):
        if "them" in text:
            raise IndexError("tokenizer internals")
        return super().encode(text)


class UnknownCharTok(CharTok):
    def encode(self, text, *, add_special_tokens=True):
        if "2" in text:
            raise ValueError("cannot encode '2'")
        return super().encode(text)


def test_a_template_error_names_the_record_and_the_dataset():
    with pytest.raises(RunError, match=r"record 'r1' of data/train.jsonl: cannot build its prompt: prompt style 'chat' needs a tokenizer"):
        encode_prompts(RECORDS, CharTok(), PromptSettings(style="chat"), source="data/train.jsonl")
    with pytest.raises(RunError, match=r"record 'r1' of data/train.jsonl: cannot build its hinted prompt: hint template must contain"):
        encode_prompts(RECORDS, CharTok(), PromptSettings(hint_template="no placeholders"), source="data/train.jsonl")


def test_any_other_tokenizer_error_keeps_its_type_and_names_the_record():
    with pytest.raises(IndexError) as info:
        encode_prompts(RECORDS, BrokenTok(), PromptSettings(), source="gsm8k.jsonl")
    assert "while building the hinted prompt of record 'r2' of gsm8k.jsonl" in info.value.__notes__


def test_characters_the_tokenizer_lacks_make_an_unusable_prompt_not_an_error():
    prompts = encode_prompts(RECORDS, UnknownCharTok(), PromptSettings(), source="gsm8k.jsonl")
    assert prompts.plain[0].problem is None
    assert prompts.plain[1].problem == "cannot be tokenised: cannot encode '2'"
