"""The bundled catalog: each figure with its source and precision; a refresh takes exact ones from the Hub."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from bridge import catalog
from bridge.hub import HubClient


def test_bundled_catalog_has_the_guides_models_with_sources():
    cat = catalog.bundled()
    kunoichi = cat.get("brittlewis12/Kunoichi-DPO-v2-7B-GGUF")
    q6 = kunoichi.quant("Q6_K")
    assert q6.file == "kunoichi-dpo-v2-7b.Q6_K.gguf"
    assert q6.size_bytes == 5_940_000_000 and q6.parts[0].size_tolerance_bytes == 5_000_000
    assert q6.source == "hf_tree" and q6.source_url.startswith("https://huggingface.co/")
    assert kunoichi.prompt_format.startswith("Alpaca") and kunoichi.license == "cc-by-nc-4.0"
    mixtral = cat.get("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF")
    # No page gave Mixtral's parameter count: it is counted from the shape and says so.
    assert mixtral.params_estimated and 46 < mixtral.params_b < 47.5 and 12 < mixtral.active_params_b < 13.5
    assert mixtral.is_moe


def test_split_files_are_one_unit_and_missing_shapes_are_marked_estimated():
    cat = catalog.bundled()
    q8 = cat.get("bartowski/Meta-Llama-3.1-70B-Instruct-GGUF").quant("Q8_0")
    assert len(q8.parts) == 2 and q8.size_bytes == 75_000_000_000
    stheno = cat.get("QuantFactory/L3-8B-Stheno-v3.2-GGUF")
    assert stheno.shape.estimated and "Llama-3.1-8B" in stheno.shape.note
    assert all(p.sha256 is None for m in cat.models for f in m.files for p in f.parts)  # none was read


def test_refresh_takes_exact_sizes_sha256_and_headers_from_the_hub(fake_hub, sparse_model, tmp_path):
    repo = "brittlewis12/Kunoichi-DPO-v2-7B-GGUF"
    fake_hub.add_file(repo, "kunoichi-dpo-v2-7b.Q4_K_M.gguf", sparse_model("mistral-7b"), sha256="ab" * 32)
    cat = catalog.bundled()
    fresh = catalog.refresh(cat, HubClient(endpoint=fake_hub.endpoint), repos=[repo])
    model = fresh.get(repo)
    f = model.quant("Q4_K_M")
    assert f.exact and f.parts[0].sha256 == "ab" * 32
    assert f.size_bytes == sparse_model("mistral-7b").stat().st_size
    assert model.layout(f).info.n_layer == 32  # the exact planner input, from the header
    catalog.save_cache(fresh, tmp_path)
    again = catalog.load(tmp_path)
    assert again.origin == "hub" and again.get(repo).layout(again.get(repo).quant("Q4_K_M")) is not None
    assert not catalog.is_stale(tmp_path)
    assert catalog.load(tmp_path / "nowhere").origin == "bundled"  # offline, first run: the bundle serves


# --- today's models (the second survey) ------------------------------------------------------------------

# The two model surveys the bundled catalog is built from (copies of ../shared's, so CI has them too).
SEEDS = Path(__file__).resolve().parent / "data" / "catalog-seeds"
QUALITY = Path(__file__).resolve().parents[1] / "scripts" / "catalog" / "quality.json"


def test_the_second_survey_brings_newer_chat_models_vision_and_embedding_models():
    cat = catalog.bundled()
    kinds = {m.repo: m.kind for m in cat.models}
    counts = {kind: list(kinds.values()).count(kind) for kind in catalog.KINDS}
    assert counts == {"chat": 29, "vision": 5, "embedding": 5}
    for repo in ("bartowski/Mistral-Small-24B-Instruct-2501-GGUF", "bartowski/Llama-3.3-70B-Instruct-GGUF",
                 "mradermacher/phi-4-GGUF", "unsloth/gpt-oss-20b-GGUF", "bartowski/Qwen_Qwen3-8B-GGUF",
                 "lm-kit/gemma-3-12b-instruct-gguf", "mradermacher/MN-12B-Mag-Mell-R1-GGUF"):
        assert kinds[repo] == "chat", repo
    oss = cat.get("unsloth/gpt-oss-20b-GGUF")
    assert oss.is_moe and oss.params_b == 21 and oss.active_params_b == 3.6  # the page's figure, not counted
    # Sizes paired by position in one listing say so.
    llama33 = cat.get("bartowski/Llama-3.3-70B-Instruct-GGUF")
    assert all("paired to name by position" in f.note for f in llama33.files)
    # Shapes inferred from a base model are marked estimated, with the base named.
    mell = cat.get("mradermacher/MN-12B-Mag-Mell-R1-GGUF")
    assert mell.shape.estimated and "Mistral-Nemo" in mell.shape.note


def test_vision_models_keep_their_projector_beside_the_language_weights():
    cat = catalog.bundled()
    gemma = cat.get("ggml-org/gemma-3-4b-it-GGUF")
    assert [f.quant for f in gemma.files] == ["Q4_K_M", "Q8_0", "F16"]  # the projector is not a quant
    (mmproj,) = gemma.projectors
    assert mmproj.path == "mmproj-model-f16.gguf" and mmproj.size_bytes == 851_000_000
    assert mmproj.source_url.startswith("https://huggingface.co/ggml-org/gemma-3-4b-it-GGUF/")
    big = cat.get("ggml-org/gemma-3-27b-it-GGUF")
    assert big.quant("F16").size_bytes == 54_000_000_000 and len(big.quant("F16").parts) == 2
    assert big.projectors[0].size_bytes == 858_000_000  # same file name, another file
    kobold = cat.get("koboldcpp/mmproj")
    assert not kobold.files and len(kobold.projectors) == 13
    assert any(p.for_model == "google/gemma-3-12b-it" for p in kobold.projectors)
    hint = cat.get("lm-kit/gemma-3-12b-instruct-gguf").projector_hint
    assert hint["repo"] == "koboldcpp/mmproj" and hint["file"] == "gemma3-12b-mmproj.gguf"


def test_embedding_models_are_well_formed_with_sizes_and_sources():
    cat = catalog.bundled()
    embedders = [m for m in cat.models if m.kind == "embedding"]
    assert {m.repo for m in embedders} >= {"nomic-ai/nomic-embed-text-v1.5-GGUF", "vonjack/bge-m3-gguf"}
    for m in embedders:
        assert m.files, m.repo
        assert all(f.size_bytes > 0 and f.source_url.startswith("https://") for f in m.files), m.repo
        assert m.embedding is not None
    bge = cat.get("vonjack/bge-m3-gguf")
    assert [f.file for f in bge.files] == ["bge-m3-q8_0.gguf", "bge-m3-f16.gguf"]  # bert.cpp files left out
    nomic = cat.get("nomic-ai/nomic-embed-text-v1.5-GGUF")
    assert nomic.params_estimated and nomic.sources["params"] == "not read"


def test_every_quality_figure_says_where_it_comes_from_and_estimates_say_why():
    cat = catalog.bundled()
    for m in cat.models:
        if m.kind == "embedding" or m.repo in ("koboldcpp/mmproj",) or "Qwen2-VL" in m.repo:
            assert not m.quality, m.repo
            continue
        for board in ("arena", "ugi"):
            figure = m.quality[board]
            assert figure["source_url"].startswith("https://github.com/") and figure["as_of"], (m.repo, board)
            if figure.get("estimated"):
                assert figure["reason"], (m.repo, board)
            else:
                assert figure["name"] and figure["score"] is not None, (m.repo, board)
    rocinante = cat.get("TheDrummer/Rocinante-12B-v1-GGUF").quality
    assert rocinante["arena"]["estimated"] and "Mistral-Nemo-Instruct-2407" in rocinante["arena"]["reason"]
    assert rocinante["ugi"]["name"] == "TheDrummer/Rocinante-12B-v1" and not rocinante["ugi"].get("estimated")
    assert cat.get("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF").quality["arena"]["votes"] > 50_000


def test_the_bundled_catalog_is_what_the_build_makes_of_the_surveys():
    seeds = [json.loads((SEEDS / name).read_text(encoding="utf-8"))
             for name in ("catalog-seed.json", "catalog-seed-2.json")]
    built = catalog.build_from_seed(*seeds, quality=json.loads(QUALITY.read_text(encoding="utf-8")))
    bundled = json.loads(resources.files("bridge").joinpath("data/catalog.json").read_text(encoding="utf-8"))
    assert built == bundled
