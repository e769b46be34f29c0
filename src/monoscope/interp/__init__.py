"""Interpretation: LLM explanations of features and their scores (`monoscope explain`)."""

from monoscope.interp.llm import (
    LLM,
    ChatRequest,
    ChatResponse,
    Usage,
    open_llm,
    parse_json_object,
    parse_number,
    parse_yes_no,
    yes_probability,
)

__all__ = [
    "LLM",
    "ChatRequest",
    "ChatResponse",
    "Usage",
    "open_llm",
    "parse_json_object",
    "parse_number",
    "parse_yes_no",
    "yes_probability",
]
