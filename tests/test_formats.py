"""Identification: every kind of file in the guide's "how to identify the model type", names parsed,
folders listed model by model, and pickles never unpickled."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from bridge import formats
from bridge.errors import NotFound
from tests.fixtures.sparse_models import write_small_gguf

# --- builders of real files --------------------------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors file: 8-byte header length, JSON header, zero data."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1, "U8": 1}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


PLAIN = {"model.embed_tokens.weight": ("BF16", [16, 8]), "lm_head.weight": ("BF16", [16, 8])}


def hf_folder(root: Path, name: str, quant: dict | None = None, tensors: dict | None = None,
              shards: int = 1) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    if quant is not None:
        config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors or PLAIN)
        return folder
    weight_map = {}
    for i in range(1, shards + 1):
        shard = f"model-{i:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / shard, {f"layer{i}.weight": ("BF16", [8, 8])})
        weight_map[f"layer{i}.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


class Trap:
    """Unpickling this creates the marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_trap_pickles(folder: Path, marker: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps({"state_dict": Trap(marker)}, protocol=4)
    raw = folder / "pytorch_model.bin"
    raw.write_bytes(payload)
    zipped = folder / "checkpoint.pt"  # torch.save's layout: a zip holding archive/data.pkl
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", payload)
    legacy = folder / "model.pth"
    legacy.write_bytes(pickle.dumps(Trap(marker), protocol=2))
    ckpt = folder / "sd.ckpt"
    ckpt.write_bytes(payload)
    return [raw, zipped, legacy, ckpt]


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "quant", "size", "n_params", "context", "part"), [
    ("kunoichi-dpo-v2-7b.Q6_K.gguf", "Q6_K", "7B", 7e9, None, None),
    ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Q4_K_M", "8B", 8e9, None, None),
    ("Mixtral-8x7B-Instruct-v0.1.IQ3_XS.gguf", "IQ3_XS", "8x7B", 56e9, None, None),
    ("Qwen2.5-1.5B-Instruct-Q4_0_4_4.gguf", "Q4_0_4_4", "1.5B", 1.5e9, None, None),
    ("llama-2-70b-chat.q8_0.gguf", "Q8_0", "70B", 70e9, None, None),
    ("SmolLM2-135M-Instruct-f16.gguf", "F16", "135M", 135e6, None, None),
    ("gemma-2-9b-it-BF16.gguf", "BF16", "9B", 9e9, None, None),
    ("Llama-3.3-70B-Instruct-UD-Q4_K_XL-00001-of-00002.gguf", "UD-Q4_K_XL", "70B", 70e9, None, (1, 2)),
    ("mythomax-l2-13b-16k.Q5_K_S.gguf", "Q5_K_S", "13B", 13e9, 16384, None),
    ("Yi-34B-200K-IQ2_XXS.gguf", "IQ2_XXS", "34B", 34e9, 204800, None),
    ("Qwen2.5-7B-Instruct-1M-IQ4_NL.gguf", "IQ4_NL", "7B", 7e9, None, None),
    ("model-00002-of-00003.safetensors", None, None, None, None, (2, 3)),
])
def test_parse_name(name, quant, size, n_params, context, part):
    hints = formats.parse_name(name)
    assert (hints.quant, hints.size, hints.context, hints.split_part) == (quant, size, context, part)
    assert hints.n_params == (round(n_params) if n_params else None)


def test_folder_name_fills_what_the_file_name_lacks():
    hints = formats.parse_name("model-00001-of-00002.safetensors", "Mistral-7B-Instruct-v0.2-32k-GPTQ")
    assert (hints.size, hints.context, hints.split_part) == ("7B", 32768, (1, 2))


# --- GGUF --------------------------------------------------------------------------------------------


def test_gguf_is_runnable_with_its_details(llama8b_path):
    (item,) = formats.identify(llama8b_path)
    assert (item.kind, item.runnable, item.unsafe, item.quant) == ("gguf", True, False, "Q4_K_M")
    assert item.info.n_layer == 32 and item.size_bytes == llama8b_path.stat().st_size
    assert "GGUF model" in item.explanation and "llama" in item.explanation


def test_split_gguf_is_one_model(tmp_path):
    write_small_gguf(tmp_path / "Big-70B.Q4_K_M.gguf", split_max_tensors=2)
    found = formats.identify(tmp_path)
    assert [(f.kind, len(f.files), f.runnable) for f in found] == [("gguf-split", 3, True)]
    assert "in 3 parts" in found[0].explanation
    (single,) = formats.identify(tmp_path / "Big-70B.Q4_K_M-00002-of-00003.gguf")
    assert single.kind == "gguf-split" and single.path.endswith("-00001-of-00003.gguf")


def test_split_gguf_with_a_missing_part_is_not_runnable(tmp_path):
    write_small_gguf(tmp_path / "m.gguf", split_max_tensors=2)
    (tmp_path / "m-00003-of-00003.gguf").unlink()
    (item,) = formats.identify(tmp_path)
    assert not item.runnable and "missing: m-00003-of-00003.gguf" in item.explanation


def test_mmproj_by_architecture_and_by_name(tmp_path):
    clip = write_small_gguf(tmp_path / "vision-projector.gguf", "clip")
    named = write_small_gguf(tmp_path / "mmproj-model-f16.gguf")
    for path in (clip, named):
        (item,) = formats.identify(path)
        assert (item.kind, item.runnable) == ("mmproj", False)
        assert "projector" in item.explanation and "images" in item.explanation


def test_truncated_gguf_says_why(tmp_path):
    path = write_small_gguf(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    (item,) = formats.identify(path)
    assert (item.kind, item.runnable) == ("gguf", False)
    assert "truncated" in item.explanation


def test_old_ggml_bin(tmp_path):
    path = tmp_path / "llama-2-7b.ggmlv3.q4_0.bin"
    path.write_bytes(b"tjgg" + bytes(100))
    (item,) = formats.identify(path)
    assert (item.kind, item.runnable, item.quant) == ("ggml-legacy", False, "Q4_0")
    assert "before GGUF" in item.explanation


# --- safetensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("quant", "kind", "words"), [
    (None, "safetensors", ["Unquantized", "-GGUF"]),
    ({"quant_method": "gptq", "bits": 4}, "gptq", ["GPTQ 4-bit", "GPU-only", "-GGUF"]),
    ({"quant_method": "awq", "bits": 4}, "awq", ["AWQ 4-bit", "GPU-only"]),
    ({"quant_method": "exl2", "bits": 4.65}, "exl2", ["EXL2 4.65-bit", "ExLlamaV2"]),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes", ["bitsandbytes 4-bit"]),
    ({"quant_method": "fp8"}, "fp8", ["FP8 8-bit"]),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors", ["compressed-tensors", "vLLM"]),
    ({"quant_method": "hqq"}, "safetensors-quantized", ["hqq"]),
])
def test_safetensors_by_config_quant_method(tmp_path, quant, kind, words):
    found = formats.identify(hf_folder(tmp_path, "Mistral-7B-x", quant))
    assert [(f.kind, f.runnable) for f in found] == [(kind, False)]
    for word in words:
        assert word in found[0].explanation


def test_sharded_safetensors_count_once(tmp_path):
    gptq = {"quant_method": "gptq", "bits": 4}
    folder = hf_folder(tmp_path, "Mistral-7B-Instruct-v0.2-GPTQ", gptq, shards=3)
    (item,) = formats.identify(folder)
    assert item.kind == "gptq" and len(item.files) == 3 and "in 3 parts" in item.explanation
    assert item.name_hints.size == "7B"


def test_exl2_by_measurement_json(tmp_path):
    folder = hf_folder(tmp_path, "Model-exl2-6.0bpw", None)  # config.json without quantization_config
    (folder / "measurement.json").write_text("{}")
    (item,) = formats.identify(folder)
    assert item.kind == "exl2" and item.bits == 6.0


@pytest.mark.parametrize(("tensors", "kind"), [
    ({"l.qweight": ("I32", [8, 8]), "l.g_idx": ("I32", [8]), "l.scales": ("F16", [8])}, "gptq"),
    ({"l.qweight": ("I32", [8, 8]), "l.qzeros": ("I32", [8]), "l.scales": ("F16", [8])}, "awq"),
    ({"l.q_weight": ("I32", [8, 8]), "l.q_invperm": ("I32", [8])}, "exl2"),
    ({"l.weight": ("F8_E4M3", [8, 8]), "l.weight_scale": ("F32", [1])}, "fp8"),
    ({"l.weight": ("U8", [8, 8]), "l.weight.absmax": ("F32", [8])}, "bitsandbytes"),
])
def test_lone_safetensors_recognised_by_tensor_names(tmp_path, tensors, kind):
    (item,) = formats.identify(write_safetensors(tmp_path / "weights.safetensors", tensors))
    assert (item.kind, item.runnable) == (kind, False)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (item,) = formats.identify(path)
    assert (item.kind, item.runnable) == ("unknown", False) and "corrupt" in item.explanation


def test_broken_config_json_does_not_stop_identification(tmp_path):
    folder = hf_folder(tmp_path, "m", None)
    (folder / "config.json").write_text("{not json")
    assert [f.kind for f in formats.identify(folder)] == ["safetensors"]


# --- pickles: flagged, never loaded ------------------------------------------------------------------


def test_pickles_are_flagged_unsafe_and_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    files = write_trap_pickles(tmp_path / "old-model", marker)
    found = formats.identify(tmp_path / "old-model")
    assert sorted(Path(f.path).name for f in found) == sorted(f.name for f in files)
    for item in found:
        assert (item.kind, item.runnable, item.unsafe) == ("pytorch-pickle", False, True)
        assert "unsafe" in item.explanation and "never opens" in item.explanation
    for path in files:
        formats.identify(path)
    assert not marker.exists()
    # The trap is real: loading one of these files does create the marker.
    pickle.loads(files[0].read_bytes())
    assert marker.exists()


def test_sharded_pickles_count_once(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    for i in (1, 2):
        (folder / f"pytorch_model-{i:05d}-of-00002.bin").write_bytes(pickle.dumps({"w": i}, protocol=2))
    (item,) = formats.identify(folder)
    assert item.kind == "pytorch-pickle" and len(item.files) == 2 and item.unsafe


# --- others and folders ------------------------------------------------------------------------------


def test_onnx_and_unknown(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x04test")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert [(f.kind, f.runnable) for f in formats.identify(onnx)] == [("onnx", False)]
    assert [(f.kind, f.runnable) for f in formats.identify(text)] == [("unknown", False)]


def test_missing_path():
    with pytest.raises(NotFound, match="no such file or folder"):
        formats.identify("/nonexistent/model.gguf")


def test_models_folder_lists_each_model(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    write_small_gguf(root / "tiny-1B.Q8_0.gguf")
    write_small_gguf(root / "big-70B.Q4_K_M.gguf", split_max_tensors=2)
    write_small_gguf(root / "mmproj-tiny-f16.gguf", "clip")
    hf_folder(root, "Mistral-7B-GPTQ", {"quant_method": "gptq", "bits": 4}, shards=2)
    hf_folder(root, "Mistral-7B", None)
    write_trap_pickles(root / "legacy", tmp_path / "marker")
    (root / "README.md").write_text("not a model")
    kinds = sorted(f.kind for f in formats.identify(root))
    assert kinds == sorted(["gguf", "gguf-split", "mmproj", "gptq", "safetensors"] + ["pytorch-pickle"] * 4)
    assert not (tmp_path / "marker").exists()
