"""Embedding families: how each one wants its texts prefixed, pooled and normalised.

A GGUF holds the pooling (`<arch>.pooling_type`, written by llama.cpp's converter from the model's
sentence-transformers config) but not the prefixes: those are in each model card. The family is read from
the GGUF's own names (`general.name`, `general.basename`, the architecture) and, failing those, the file
name. Sources of the prefixes (model cards):

- nomic-embed-text v1/v1.5: "search_query: " / "search_document: " (required).
- bge en v1.5 (small/base/large): queries "Represent this sentence for searching relevant passages: ",
  passages bare; bge-m3 needs no instruction.
- multilingual-e5 / e5: "query: " / "passage: "; "query: " on both sides for symmetric tasks.
- snowflake-arctic-embed v1/v1.5: the bge query instruction; arctic-embed v2.0: "query: "; documents bare.
- Qwen3-Embedding: queries "Instruct: {task}\\nQuery:{text}", documents bare; last-token pooling.

All of them are compared by cosine similarity of L2-normalised vectors, so every family normalises.

SillyTavern does not say whether a text is a query or a document: its Vector Storage compares chat
messages with chat messages, so both sides get the same treatment (`unspecified`: the document form, or
the card's symmetric form), and a text's vector is the same whether it is stored or searched. A client
that knows may send `input_type: "query"` or `"document"`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..gguf import GGUFHeader

Role = Literal["query", "document", "unspecified"]
# llama.cpp's enum llama_pooling_type
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
BGE_QUERY = "Represent this sentence for searching relevant passages: "
QWEN3_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # matched against the GGUF's names and the file name, case-insensitively
    query_prefix: str = ""
    document_prefix: str = ""
    symmetric_prefix: str | None = None  # None: the document prefix
    pooling: str | None = None  # the family's pooling when the GGUF does not say
    normalize: bool = True
    source: str = ""

    def prefix(self, role: Role) -> str:
        if role == "query":
            return self.query_prefix
        if role == "document":
            return self.document_prefix
        return self.document_prefix if self.symmetric_prefix is None else self.symmetric_prefix

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "pattern"}


# Most specific first: bge-m3 before bge, arctic v2 before arctic.
FAMILIES = (
    Family("nomic-embed-text", r"nomic[-_ ]?embed", "search_query: ", "search_document: ", pooling="mean",
           source="https://huggingface.co/nomic-ai/nomic-embed-text-v1.5"),
    Family("bge-m3", r"bge[-_ ]?m3", pooling="cls", source="https://huggingface.co/BAAI/bge-m3"),
    Family("bge", r"\bbge", BGE_QUERY, pooling="cls", source="https://huggingface.co/BAAI/bge-base-en-v1.5"),
    Family("multilingual-e5", r"\be5[-_ ]|multilingual[-_ ]e5", "query: ", "passage: ",
           symmetric_prefix="query: ", pooling="mean", source="https://huggingface.co/intfloat/multilingual-e5-large"),
    Family("snowflake-arctic-embed-v2", r"arctic[-_ ]?embed.*v2", "query: ", pooling="cls",
           source="https://huggingface.co/Snowflake/snowflake-arctic-embed-l-v2.0"),
    Family("snowflake-arctic-embed", r"arctic[-_ ]?embed", BGE_QUERY, pooling="cls",
           source="https://huggingface.co/Snowflake/snowflake-arctic-embed-m-v1.5"),
    Family("qwen3-embedding", r"qwen3[-_ ]?embedding", QWEN3_QUERY, pooling="last",
           source="https://huggingface.co/Qwen/Qwen3-Embedding-0.6B"),
)
UNKNOWN = Family("unknown", r"$^", pooling="mean")


def family_of(header: GGUFHeader, file_name: str = "") -> Family:
    """The family a GGUF belongs to, from its names; UNKNOWN (no prefixes, mean pooling, normalised)."""
    names = [str(header.get(key) or "") for key in ("general.name", "general.basename", "general.finetune")]
    text = " ".join([*names, file_name]).lower()
    for family in FAMILIES:
        if re.search(family.pattern, text, re.IGNORECASE):
            return family
    return UNKNOWN


def gguf_pooling(header: GGUFHeader) -> str | None:
    """The pooling the GGUF declares (`<arch>.pooling_type`), or None when it declares none."""
    arch = header.get("general.architecture")
    value = header.get(f"{arch}.pooling_type")
    return POOLING_NAMES.get(int(value)) if isinstance(value, int) and value > 0 else None


def is_embedding_model(header: GGUFHeader) -> bool:
    """Whether a GGUF is an embedding model: an encoder architecture, or a declared pooling."""
    arch = str(header.get("general.architecture") or "")
    return arch in ENCODER_ARCHITECTURES or gguf_pooling(header) is not None


ENCODER_ARCHITECTURES = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                         "xlm-roberta", "modern-bert", "neo-bert", "eurobert", "t5encoder"}
