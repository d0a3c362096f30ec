"""Datasets, hints and prompt templates. Strings and files only: no model code."""

from nemo_guide.data.hints import DEFAULT_HINT_TEMPLATE, format_guided_prompt
from nemo_guide.data.jsonl import JsonlError, prepare_append, read_jsonl
from nemo_guide.data.records import DataError, Record, load_records, write_records
from nemo_guide.data.templates import PromptStyle, build_prompt

__all__ = [
    "DEFAULT_HINT_TEMPLATE",
    "DataError",
    "JsonlError",
    "PromptStyle",
    "Record",
    "build_prompt",
    "format_guided_prompt",
    "load_records",
    "prepare_append",
    "read_jsonl",
    "write_records",
]
