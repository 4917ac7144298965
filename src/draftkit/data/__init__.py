"""Data: load sources into text or chat records, tokenize them, pack them, batch them, self-distill them.

load_records -> {"text"} -> pack_texts        -> {"input_ids", "labels"} -> collate
             -> {"messages"} -> tokenize_chat -> {"input_ids", "labels"} -> collate
prompts_from_records -> regenerate_responses (the target answers) -> tokenize_chat
"""

from draftkit.data.chat import prompt_ids, tokenize_chat
from draftkit.data.collate import collate
from draftkit.data.packing import pack_texts
from draftkit.data.selfdistill import prompts_from_records, regenerate_responses
from draftkit.data.sources import BUILTIN_SOURCES, DataError, DataFileNotFoundError, builtin_path, load_records

__all__ = [
    "BUILTIN_SOURCES",
    "DataError",
    "DataFileNotFoundError",
    "builtin_path",
    "collate",
    "load_records",
    "pack_texts",
    "prompt_ids",
    "prompts_from_records",
    "regenerate_responses",
    "tokenize_chat",
]
