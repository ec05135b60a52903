"""Runnable llama-architecture GGUF files with random weights, written with the `gguf` package.

The bridge writes one to measure this machine's speed on first use (`bridge.calibrate`); the tests write
their fixture models with the same code. The vocabulary is SentencePiece-style with byte fallback, so any
text tokenizes, and the chat template is ChatML.

Two writers: `write_f16_model` (random normal weights, then `quantize` with llama.cpp's own quantizer into
the quants users download) and `write_q4k_model`, which writes Q4_K blocks of random bits directly. The
second takes well under a second for a 50 MB model, because nothing is quantized: a speed measurement
needs the bytes and the kernels of a real quant, not meaningful values. Its scales are small and finite,
so no NaN or denormal slows the arithmetic down.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Words whose pieces make the vocabulary merge text into fewer tokens than bytes (role-play flavoured).
WORD_TEXT = (
    "the and you that was for are with his they this have from one had word but not what all were when "
    "your can said there use each which she how their will other about out many then them these some her "
    "would make like him into time has look two more write see number way could people than first been "
    "call who its now find long down day did get come made may part hello world story tell once upon "
    "dragon castle knight smile look eyes voice hand softly whisper laugh night moon user assistant system "
    "character scene chat message reply name"
)
# Q4_K: 256 weights per 144-byte block (fp16 d, fp16 dmin, 12 bytes of 6-bit scales, 128 bytes of nibbles).
Q4K_BLOCK = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
Q4K_SCALE = 0.002  # d and dmin: any small finite fp16 keeps every dequantized weight finite


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of a llama model; every 2D row length is a multiple of 256 so K-quants apply."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    n_vocab: int | None = None  # None = the fixture vocabulary's own size
    n_expert: int = 0  # a mixture of experts: n_ff is each expert's width
    n_expert_used: int = 0


# ---------------------------------------------------------------------------------------------------------
# vocabulary


def vocabulary(n_vocab: int | None = None) -> tuple[list[bytes], list[float], list[int]]:
    """An SPM vocabulary: <unk> <s> </s>, the 256 byte tokens, ChatML markers, characters and word pieces.

    `n_vocab` pads with unused pieces up to that size (the 1B model's 32000, like Llama 2's).
    """
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += [b"<|im_start|>", b"<|im_end|>"]
    types += [TokenType.CONTROL] * 2
    pieces: list[str] = ["\u2581", *(chr(c) for c in range(0x21, 0x7F))]
    for word in WORD_TEXT.split():
        for prefix in ("\u2581", ""):
            full = prefix + word
            pieces += [full[:i] for i in range(2, len(full) + 1)]
    seen = {t for t in tokens}
    for piece in pieces:
        encoded = piece.encode()
        if encoded not in seen:
            seen.add(encoded)
            tokens.append(encoded)
            types.append(TokenType.NORMAL)
    filler = 0
    while n_vocab is not None and len(tokens) < n_vocab:
        tokens.append(f"\u2581unused{filler}".encode())
        types.append(TokenType.NORMAL)
        filler += 1
    # Higher score merges first: longer pieces are rarer, as in a trained SentencePiece model.
    scores = [0.0 if kind != TokenType.NORMAL else -float(len(tok))
              for tok, kind in zip(tokens, types, strict=True)]
    return tokens, scores, [int(t) for t in types]


# ---------------------------------------------------------------------------------------------------------
# writing


def tensor_shapes(shape: Shape, n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy-order shape) of every tensor of a llama model, in llama.cpp's naming."""
    e, hd = shape.n_embd, shape.n_embd // shape.n_head
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, e))]
    for i in range(shape.n_layer):
        b = f"blk.{i}"
        out += [
            (f"{b}.attn_norm.weight", (e,)),
            (f"{b}.attn_q.weight", (shape.n_head * hd, e)),
            (f"{b}.attn_k.weight", (shape.n_head_kv * hd, e)),
            (f"{b}.attn_v.weight", (shape.n_head_kv * hd, e)),
            (f"{b}.attn_output.weight", (e, shape.n_head * hd)),
            (f"{b}.ffn_norm.weight", (e,)),
        ]
        if shape.n_expert:
            x = shape.n_expert
            out += [
                (f"{b}.ffn_gate_inp.weight", (x, e)),
                (f"{b}.ffn_gate_exps.weight", (x, shape.n_ff, e)),
                (f"{b}.ffn_up_exps.weight", (x, shape.n_ff, e)),
                (f"{b}.ffn_down_exps.weight", (x, e, shape.n_ff)),
            ]
        else:
            out += [
                (f"{b}.ffn_gate.weight", (shape.n_ff, e)),
                (f"{b}.ffn_up.weight", (shape.n_ff, e)),
                (f"{b}.ffn_down.weight", (e, shape.n_ff)),
            ]
    out += [("output_norm.weight", (e,)), ("output.weight", (n_vocab, e))]
    return out


def _random_tensor(rng: np.random.Generator, name: str, dims: tuple[int, ...]) -> np.ndarray:
    """Norms are ones (F32); matrices are normal with std 1/sqrt(fan_in) (F16), the output a bit wider so
    the next-token distribution is peaked enough to be readable yet varied enough for seeds to matter."""
    if len(dims) == 1 or name.endswith("ffn_gate_inp.weight"):  # llama.cpp wants the router in F32
        return (np.ones(dims, dtype=np.float32) if len(dims) == 1
                else rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(dims[-1])))
    fan_in = dims[-1]
    std = 2.0 / np.sqrt(fan_in) if name == "output.weight" else 1.0 / np.sqrt(fan_in)
    if name == "token_embd.weight":
        std = 1.0
    data = rng.standard_normal(dims, dtype=np.float32)
    data *= std
    return data.astype(np.float16)


def _add_metadata(writer: GGUFWriter, shape: Shape, name: str, n_vocab: int,
                  file_type: int = gguf.LlamaFileType.MOSTLY_F16) -> None:
    tokens, scores, types = vocabulary(n_vocab)
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    if shape.n_expert:
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_f16_model(path: Path, shape: Shape, *, name: str, seed: int = 1234) -> Path:
    """Write an F16 llama GGUF tensor by tensor, so even a 1B model needs little memory."""
    n_vocab = len(vocabulary(shape.n_vocab)[0])
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    _add_metadata(writer, shape, name, n_vocab)
    layout = tensor_shapes(shape, n_vocab)
    for tensor_name, dims in layout:
        dtype = np.float32 if len(dims) == 1 or tensor_name.endswith("ffn_gate_inp.weight") else np.float16
        nbytes = int(np.prod(dims)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(tensor_name, dims, np.dtype(dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor_name, dims in layout:
        writer.write_tensor_data(_random_tensor(rng, tensor_name, dims))
    writer.close()
    return path


def write_q4k_model(path: Path, shape: Shape, *, name: str, seed: int = 1234) -> Path:
    """Write a dense llama GGUF whose matrices are Q4_K blocks of random bits (norms F32 ones)."""
    if shape.n_expert:
        raise ValueError("write_q4k_model writes dense models only")
    n_vocab = len(vocabulary(shape.n_vocab)[0])
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    _add_metadata(writer, shape, name, n_vocab, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for tensor_name, dims in tensor_shapes(shape, n_vocab):
        if len(dims) == 1:
            writer.add_tensor(tensor_name, np.ones(dims, dtype=np.float32))
        else:
            writer.add_tensor(tensor_name, _q4k_blocks(rng, int(np.prod(dims[:-1])), dims[-1]),
                              raw_dtype=GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _q4k_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """`rows` x `cols` weights as Q4_K bytes: random nibbles and scales, fixed small d and dmin."""
    per_block, block_bytes = Q4K_BLOCK
    blocks = rows * cols // per_block
    raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    scale = np.full(blocks, Q4K_SCALE, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
    raw[:, 0:2] = scale  # d
    raw[:, 2:4] = scale  # dmin
    return raw.reshape(rows, cols // per_block * block_bytes)


# ---------------------------------------------------------------------------------------------------------
# quantizing


def quantize(src: Path, dst: Path, quant: str, n_threads: int = 2) -> Path:
    """Quantize with llama.cpp itself, exactly as `llama-quantize` would (Q8_0, Q6_K, Q5_K_M, Q4_K_M)."""
    import llama_cpp

    from .engine import llama_log

    ftypes = {
        "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
        "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    }
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[quant]
    params.nthread = n_threads
    llama_log.install()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({quant}) failed with {rc}: {llama_log.recent()}")
    return dst
