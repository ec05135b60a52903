"""Vision projectors paired with their models: on download (the real huggingface_hub client against the
fake Hub), in the models folder, and in the catalog; small embedding models in the catalog."""

from __future__ import annotations

import os
import shutil

from bridge import catalog, library
from bridge.companions import pairing
from bridge.companions.recommend import pick_file
from bridge.downloads import DownloadManager
from bridge.hub import HubClient

REPO = "ggml-org/gemma-3-4b-it-GGUF"


def test_a_vision_models_download_brings_its_projector(fake_hub, tmp_path):
    for name in ("gemma-3-4b-it-Q4_K_M.gguf", "gemma-3-4b-it-f16.gguf", "mmproj-model-f16.gguf"):
        fake_hub.add_file(REPO, name, b"GGUF" + os.urandom(1 << 16), tmp_dir=tmp_path / "hub")
    downloads = DownloadManager(tmp_path / "models", HubClient(endpoint=fake_hub.endpoint),
                                hf_cache_dir=tmp_path / "hf-cache")
    dl = downloads.pull(REPO, quant="Q4_K_M")
    assert [d.name for d in dl.dest] == ["gemma-3-4b-it-Q4_K_M.gguf", "mmproj-model-f16.gguf"]
    assert dl.path.name == "gemma-3-4b-it-Q4_K_M.gguf" and all(d.exists() for d in dl.dest)
    f16 = downloads.pull(REPO, quant="F16")  # the projector's own quant never stands in for the weights
    assert [d.name for d in f16.dest] == ["gemma-3-4b-it-f16.gguf", "mmproj-model-f16.gguf"]
    assert [m.id for m in library.scan(tmp_path / "models")] == [
        "ggml-org/gemma-3-4b-it-GGUF/gemma-3-4b-it-Q4_K_M", "ggml-org/gemma-3-4b-it-GGUF/gemma-3-4b-it-f16"]


def test_the_projector_in_a_models_folder_is_the_models(companion_models_dir, tmp_path, tiny_model,
                                                          tiny_mmproj):
    vision = companion_models_dir / "tiny/vision-llama/vision-llama-Q8_0.gguf"
    found = pairing.local_projector(vision, companion_models_dir)
    assert found is not None and found.model_id == "tiny/vision-llama/mmproj-vision-llama-F32"
    alone = companion_models_dir / "tiny-llama-Q8_0.gguf"
    assert pairing.local_projector(alone, companion_models_dir) is None
    # a projector whose width is not the model's is never paired, whatever its name
    other = tmp_path / "models" / "other"
    other.mkdir(parents=True)
    shutil.copyfile(tiny_model, other / "small-llama-Q8_0.gguf")
    from tests.fixtures.companion_models import write_mmproj

    write_mmproj(other / "mmproj-small-llama-f16.gguf", text_embd=128)
    assert pairing.local_projector(other / "small-llama-Q8_0.gguf", tmp_path / "models") is None


def test_the_catalog_pairs_vision_models_and_offers_small_embedding_models():
    cat = catalog.bundled()
    gemma = cat.get(REPO)
    paired = pairing.catalog_projector(gemma)
    assert paired["file"] == "mmproj-model-f16.gguf" and paired["size_bytes"] > 0
    assert paired["paired_by"] == "same repository"
    hinted = pairing.catalog_projector(cat.get("lm-kit/gemma-3-12b-instruct-gguf"))
    assert hinted["repo"] == "koboldcpp/mmproj" and "suggestion" in hinted["paired_by"]
    embedders = [m for m in cat.models if m.kind == "embedding"]
    assert embedders
    for model in embedders:
        chosen = pick_file(model)
        assert chosen is not None and chosen.quant not in ("TQ1_0", "TQ2_0") and chosen.source_url
