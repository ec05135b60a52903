"""The bundled catalog: each figure with its source and precision; a refresh takes exact ones from the Hub."""

from __future__ import annotations

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
