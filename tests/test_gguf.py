"""GGUF reader: header, tensor table and ModelInfo of real architectures, split models, range reads,
and hostile files rejected with a clear GGUFError, fast."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import gguf
from bridge.errors import GGUFError
from tests.fixtures.sparse_models import ALL_SPECS, write_small_gguf

# --- tensor sizes ------------------------------------------------------------------------------------


def test_tensor_bytes_of_known_types():
    assert gguf.tensor_nbytes(Q.F32, (4096,)) == 16384
    assert gguf.tensor_nbytes(Q.F16, (4096, 2)) == 16384
    assert gguf.tensor_nbytes(Q.Q8_0, (4096, 4096)) == 4096 * 4096 // 32 * 34
    assert gguf.tensor_nbytes(Q.Q4_K, (4096, 14336)) == 4096 // 256 * 144 * 14336
    assert gguf.tensor_nbytes(Q.Q6_K, (4096, 128256)) == 4096 // 256 * 210 * 128256


def test_every_ggml_type_matches_the_gguf_package_reader(tmp_path):
    """One tensor of each type, written by GGUFWriter; our sizes and offsets equal GGUFReader's."""
    path = tmp_path / "types.gguf"
    writer = GGUFWriter(path, "llama")
    for qtype, (block, type_size) in GGML_QUANT_SIZES.items():
        shape = (3, block * 2)  # numpy order: 3 rows of two blocks
        nbytes = 3 * 2 * type_size
        writer.add_tensor_info(f"t.{qtype.name}", shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as f:  # no data was written: pad the file so the tensors' bytes exist
        f.truncate(1 << 20)
    ours = {t.name: t for t in gguf.read_file(path).tensors}
    theirs = {t.name: t for t in GGUFReader(path).tensors}
    assert len(ours) == len(GGML_QUANT_SIZES)
    for name, t in theirs.items():
        assert ours[name].nbytes == int(t.n_bytes), name
        assert ours[name].shape == tuple(int(d) for d in t.shape), name
        assert ours[name].ggml_type == int(t.tensor_type), name


# --- real architectures (sparse files) -----------------------------------------------------------------


def test_llama31_8b_header_matches_the_gguf_package(llama8b_path):
    header = gguf.read_file(llama8b_path)
    reader = GGUFReader(llama8b_path)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.nbytes == int(theirs.n_bytes)
        assert header.data_offset + ours.offset == int(theirs.data_offset)
    last = header.tensors[-1]
    assert header.data_offset + last.offset + last.nbytes <= header.file_size


def test_llama31_8b_model_info(llama8b_path):
    info = gguf.model_info(gguf.read_file(llama8b_path))
    assert (info.architecture, info.n_layer, info.n_embd) == ("llama", 32, 4096)
    assert info.n_head == [32] * 32 and info.n_head_kv == [8] * 32
    assert (info.head_dim_k, info.head_dim_v) == (128, 128)
    assert info.n_ff == [14336] * 32
    assert (info.n_vocab, info.n_ctx_train) == (128256, 131072)
    assert 8.0e9 < info.n_params < 8.1e9 and info.n_params_active == info.n_params
    assert info.file_type == "Q4_K_M" and not info.tied_output and not info.is_moe
    assert (info.bos_token_id, info.eos_token_id, info.bos_token, info.eos_token) == (1, 2, "<t1>", "<t2>")
    assert info.swa_layers == [False] * 32 and not info.is_mla and not info.is_recurrent
    assert 4.3e9 < info.size_bytes < 4.7e9


def test_mistral_7b_model_info(sparse_model):
    info = gguf.model_info(gguf.read_file(sparse_model("mistral-7b")))
    assert (info.n_vocab, info.n_ctx_train, info.n_head_kv[0]) == (32768, 32768, 8)
    assert 7.2e9 < info.n_params < 7.3e9


@pytest.mark.parametrize("key", ["mixtral-8x7b", "mixtral-8x7b-split-experts"])
def test_mixtral_experts_in_both_layouts(sparse_model, key):
    """Stacked `ffn_up_exps` and the older one-tensor-per-expert layout give the same counts."""
    info = gguf.model_info(gguf.read_file(sparse_model(key)))
    assert (info.n_expert, info.n_expert_used) == (8, 2) and info.is_moe
    assert 46.5e9 < info.n_params < 46.9e9
    assert 12.8e9 < info.n_params_active < 13.0e9  # Mixtral's published 12.9B active


def test_gemma2_sliding_window_and_tied_output(sparse_model):
    info = gguf.model_info(gguf.read_file(sparse_model("gemma2-9b")))
    assert info.sliding_window == 4096
    assert info.swa_layers == [il % 2 == 0 for il in range(42)]  # llama.cpp: even layers slide
    assert info.tied_output and (info.head_dim_k, info.head_dim_v) == (256, 256)
    assert info.n_vocab == 256000


def test_deepseek_mla_caches_the_latent_only(sparse_model):
    info = gguf.model_info(gguf.read_file(sparse_model("deepseek-v2-lite")))
    assert info.is_mla and (info.kv_lora_rank, info.rope_dim) == (512, 64)
    assert (info.head_dim_k, info.head_dim_v) == (576, 512) and info.n_head_kv == [1] * 27
    assert (info.n_expert, info.n_expert_used, info.n_expert_shared) == (64, 6, 2)
    assert (info.n_ff_expert, info.n_layer_dense_lead) == (1408, 1)
    assert 15.5e9 < info.n_params < 16e9 and info.n_params_active < 3e9


def test_legacy_deepseek_conversion_is_ordinary_attention(sparse_model):
    """Files with one attn_kv_b tensor run without MLA in llama.cpp: full K and V for 16 heads."""
    info = gguf.model_info(gguf.read_file(sparse_model("deepseek-v2-lite-legacy")))
    assert not info.is_mla
    assert (info.head_dim_k, info.head_dim_v, info.n_head_kv[0]) == (192, 128, 16)


def test_mamba_recurrent_state(sparse_model):
    info = gguf.model_info(gguf.read_file(sparse_model("mamba-2.8b")))
    assert info.recurrent_layers == [True] * 64 and info.n_head_kv == [0] * 64
    assert info.n_embd_r == 3 * 5120 and info.n_embd_s == 16 * 5120
    assert 2.7e9 < info.n_params < 2.9e9


def test_per_layer_head_counts_with_zeros(tmp_path):
    """DeciLM-style arrays: layers without KV heads and a varying feed-forward width."""
    path = write_small_gguf(tmp_path / "decilm.gguf", "deci", n_layer=4, kv={
        "deci.attention.head_count": [4, 4, 4, 4], "deci.attention.head_count_kv": [2, 0, 2, 0],
        "deci.feed_forward_length": [128, 64, 128, 0],
    })
    info = gguf.model_info(gguf.read_file(path))
    assert info.n_head_kv == [2, 0, 2, 0] and info.n_ff == [128, 64, 128, 0]
    assert not info.is_recurrent  # zero KV heads without SSM keys is not a recurrent layer


def test_hybrid_recurrent_layers(tmp_path):
    ssm = {"ssm.conv_kernel": 4, "ssm.inner_size": 256, "ssm.state_size": 16, "ssm.group_count": 1}
    jamba = write_small_gguf(tmp_path / "jamba.gguf", "jamba", n_layer=4, kv={
        "jamba.attention.head_count_kv": [0, 0, 2, 0], **{f"jamba.{k}": v for k, v in ssm.items()},
    })
    info = gguf.model_info(gguf.read_file(jamba))
    assert info.recurrent_layers == [True, True, False, True]
    assert info.n_embd_r == 3 * (256 + 2 * 16) and info.n_embd_s == 16 * 256
    qwen = write_small_gguf(tmp_path / "qwen3next.gguf", "qwen3next", n_layer=8, kv={
        "qwen3next.full_attention_interval": 4, **{f"qwen3next.{k}": v for k, v in ssm.items()},
    })
    info = gguf.model_info(gguf.read_file(qwen))
    assert info.recurrent_layers == [True, True, True, False] * 2
    assert info.n_head_kv == [0, 0, 0, 2] * 2  # no KV cache in the recurrent layers


def test_swa_pattern_from_metadata(tmp_path):
    path = write_small_gguf(tmp_path / "swa.gguf", "gemma3", n_layer=6, kv={
        "gemma3.attention.sliding_window": 1024, "gemma3.attention.sliding_window_pattern": 3,
    })
    assert gguf.model_info(gguf.read_file(path)).swa_layers == [True, True, False] * 2


def test_window_without_a_pattern_llama_cpp_ignores_is_not_sliding(tmp_path):
    """Mistral-7B-v0.1 carries a window that llama.cpp's llama arch does not apply: plan for full KV."""
    path = write_small_gguf(tmp_path / "m.gguf", kv={"llama.attention.sliding_window": 4096})
    assert gguf.model_info(gguf.read_file(path)).swa_layers == [False, False]


# --- split models ------------------------------------------------------------------------------------


def test_split_model_reads_as_one_from_any_part(tmp_path):
    first = write_small_gguf(tmp_path / "split.gguf", split_max_tensors=2)
    assert first.name == "split-00001-of-00003.gguf"
    single = write_small_gguf(tmp_path / "single.gguf")
    whole = gguf.read_file(single)
    for part in sorted(tmp_path.glob("split-*.gguf")):
        header = gguf.read_file(part)
        assert header.shard_count == 3 and len(header.shard_data_offsets) == 3
        assert [t.name for t in header.tensors] == [t.name for t in whole.tensors]
        assert [t.nbytes for t in header.tensors] == [t.nbytes for t in whole.tensors]
    assert gguf.model_info(gguf.read_file(first)).shard_count == 3


def test_split_model_with_a_missing_part(tmp_path):
    first = write_small_gguf(tmp_path / "split.gguf", split_max_tensors=2)
    (tmp_path / "split-00002-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match=r"part 1 of a model split into 3 files; missing: split-00002-of"):
        gguf.read_file(first)


def test_split_parts_from_range_sources(tmp_path):
    write_small_gguf(tmp_path / "split.gguf", split_max_tensors=2)
    sources = [_bytes_source(p.name, p.read_bytes()) for p in sorted(tmp_path.glob("split-*.gguf"))]
    assert gguf.read_sources(sources).shard_count == 3
    with pytest.raises(GGUFError, match="says the model has 3 parts, 2 were given"):
        gguf.read_sources(sources[:2])


# --- range sources -----------------------------------------------------------------------------------


def test_range_source_fetches_only_the_header(llama8b_path):
    fetched = []

    def read_at(offset: int, size: int) -> bytes:
        fetched.append(size)
        with open(llama8b_path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    file_size = llama8b_path.stat().st_size
    header = gguf.read_sources([gguf.CallbackSource("remote", read_at, file_size)])
    assert header.tensors == gguf.read_file(llama8b_path).tensors
    assert sum(fetched) == header.bytes_read < 16 << 20  # a few MiB of a 4.6 GB file
    assert len(fetched) < 10


def test_range_source_with_short_answers_and_unknown_size(tmp_path):
    data = write_small_gguf(tmp_path / "m.gguf").read_bytes()
    stingy = gguf.CallbackSource("stingy", lambda off, n: data[off : off + min(n, 100)], None)
    header = gguf.read_header(stingy)
    assert len(header.tensors) == 6 and header.get("general.architecture") == "llama"


# --- hostile and broken files ------------------------------------------------------------------------


def _bytes_source(name: str, data: bytes, sized: bool = True) -> gguf.CallbackSource:
    return gguf.CallbackSource(name, lambda off, n: data[off : off + n], len(data) if sized else None)


def _rejected(data: bytes, sized: bool = True) -> str:
    start = time.monotonic()
    with pytest.raises(GGUFError) as err:
        gguf.model_info(gguf.read_header(_bytes_source("bad.gguf", data, sized)))
    assert time.monotonic() - start < 1.0
    return err.value.message


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    return write_small_gguf(tmp_path_factory.mktemp("valid") / "m.gguf").read_bytes()


def _gguf(n_tensors: int, kvs: list[bytes], tensors: list[bytes] = (), version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + b"".join(tensors)


def _s(text: bytes | str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", gguf.T_STRING) + _s(value)


def _tensor(name: str, shape: tuple[int, ...], ggml_type: int, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, offset)


ARCH = _kv_str("general.architecture", "llama")


HOSTILE = [
    (b"", "only 0 bytes long"),
    (b"PK\x03\x04" + bytes(60), "not a GGUF file"),
    (b"tjgg" + bytes(60), "old GGJT file"),
    (_gguf(0, [], version=1), "GGUF version 1"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (_gguf(0, [], version=99), "version 99 is not supported"),
    (_gguf(1 << 40, []), "claims 1099511627776 tensors"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 62), "keys; not a real model"),
    (_gguf(0, [struct.pack("<Q", 1 << 60) + b"k"]), "a metadata key claims to be"),
    (_gguf(0, [_s("k") + struct.pack("<I", gguf.T_STRING) + struct.pack("<Q", 1 << 23)]), "past the end"),
    (_gguf(0, [_s("k") + struct.pack("<I", 77) + bytes(8)]), "unknown value type 77"),
    (_gguf(0, [_s("k") + struct.pack("<IIQ", gguf.T_ARRAY, gguf.T_UINT32, 1 << 40)]), "claims 1099511627776"),
    (_gguf(0, [_s("k") + struct.pack("<IIQ", gguf.T_ARRAY, gguf.T_UINT32, 1 << 20)]), "more than the file"),
    (_gguf(0, [_s("k") + struct.pack("<IIQ", gguf.T_ARRAY, 99, 1)]), "unknown element type 99"),
    (_gguf(0, [_s("k") + struct.pack("<IIQIQIQ", gguf.T_ARRAY, gguf.T_ARRAY, 1, gguf.T_ARRAY, 1,
                                     gguf.T_ARRAY, 1) + bytes(16)]), "nests arrays"),
    (_gguf(0, [_s(b"\xff\xfekey") + struct.pack("<I", gguf.T_UINT8) + b"\x01"]), "not valid UTF-8"),
    (_gguf(0, [ARCH, ARCH]), "appears twice"),
    (_gguf(0, [_s("general.alignment") + struct.pack("<II", gguf.T_UINT32, 3)]), "not a power of two"),
    (_gguf(1, [ARCH], [_tensor("t", (32, 1, 1, 1, 1), 0)]), "5 dimensions"),
    (_gguf(1, [ARCH], [_tensor("t", (1 << 41, 1), 0)]), "absurd shape"),
    (_gguf(1, [ARCH], [_tensor("t", (1 << 39, 1 << 39), 0)]), "absurd shape"),
    (_gguf(1, [ARCH], [_tensor("t", (32,), 250)]), "unknown tensor type 250"),
    (_gguf(1, [ARCH], [_tensor("t", (32,), 31)]), "Q4_0_4_4 was removed"),
    (_gguf(1, [ARCH], [_tensor("t", (33,), int(Q.Q8_0))]), "not a multiple of the Q8_0 block size 32"),
    (_gguf(1, [ARCH], [_tensor("t", (32,), 0, offset=7)]), "not a multiple of the alignment"),
    (_gguf(2, [ARCH], [_tensor("t", (8,), 0), _tensor("t", (8,), 0, 32)]), "appears twice"),
    (_gguf(1, [ARCH], [_tensor("t", (1 << 20,), 0)]) + bytes(64), "is truncated: tensor 't' ends at byte"),
    (_gguf(0, []), "no general.architecture"),
    (_gguf(0, [ARCH]), "missing llama.block_count"),
    (_gguf(0, [ARCH, _kv_str("llama.block_count", "many"), _kv_str("llama.embedding_length", "x")]),
     "llama.block_count should be a whole number"),
    (_gguf(0, [ARCH, _s("llama.block_count") + struct.pack("<II", gguf.T_UINT32, 1 << 30),
               _s("llama.embedding_length") + struct.pack("<II", gguf.T_UINT32, 64)]), "that many layers"),
    (_gguf(0, [_kv_str("general.architecture", "clip")]), "multimodal projector"),
]


@pytest.mark.parametrize(("data", "message"), HOSTILE, ids=[m for _, m in HOSTILE])
def test_hostile_header_is_rejected_clearly(data, message):
    assert message in _rejected(data)


def test_non_utf8_value_is_shown_not_fatal():
    """Values are bytes to llama.cpp; a bad name is replaced, not a reason to refuse the file."""
    data = _gguf(0, [ARCH, _s("general.name") + struct.pack("<I", gguf.T_STRING) + _s(b"caf\xe9")])
    assert gguf.read_header(_bytes_source("x", data)).get("general.name") == "caf\ufffd"


def test_truncated_anywhere_says_so(valid):
    header = gguf.read_header(_bytes_source("ok", valid))
    regions = {"preamble": 10, "kv": 60, "tensor table": header.data_offset - 40, "data": len(valid) - 10}
    for region, cut in regions.items():
        for sized in (True, False):
            if region == "data" and not sized:
                continue  # without a known size, the data section is not checked (it is never read)
            message = _rejected(valid[:cut], sized=sized)
            assert "truncated" in message or "ends early" in message, (region, message)


def test_every_truncation_is_an_error(valid):
    for cut in range(0, len(valid), 97):
        with pytest.raises(GGUFError):
            gguf.read_header(_bytes_source("cut", valid[:cut]))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        gguf.read_file(tmp_path / "nope.gguf")


def _parse_or_gguf_error(data: bytes, sized: bool) -> None:
    start = time.monotonic()
    try:
        header = gguf.read_header(_bytes_source("fuzz", data, sized))
        gguf.model_info(header)
    except GGUFError as exc:
        assert exc.message
    assert time.monotonic() - start < 1.0


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.data())
def test_fuzz_mutated_header(valid, data):
    blob = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    _parse_or_gguf_error(bytes(blob[:cut]), sized=data.draw(st.booleans()))


@FUZZ
@given(st.binary(max_size=512), st.booleans())
def test_fuzz_random_bytes(blob, sized):
    _parse_or_gguf_error(b"GGUF" + blob, sized)
    _parse_or_gguf_error(blob, sized)


def test_sparse_specs_all_read(sparse_model):
    for key in ALL_SPECS:
        info = gguf.model_info(gguf.read_file(sparse_model(key)))
        assert info.n_layer > 0 and info.size_bytes > 0, key

