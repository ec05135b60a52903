"""Embeddings for SillyTavern's Vector Storage, served by a real bridge with real embedding GGUFs.

The reference vectors come from llama.cpp's low-level API called here directly (one text per context,
the model's own pooling), so the bridge's batching, prefixing and normalising are checked against llama.cpp
itself, not against the bridge's own code.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import llama_cpp
import numpy as np
import psutil
import pytest

from bridge.companions.families import BGE_QUERY

TEXTS = [
    "the cat sat on the mat", "hello world", "a dragon over the castle", "she said hello to the king",
    "rain and snow in the forest", "the knight went to the tavern", "bread and ale", "the quick brown fox",
    "sun moon and star", "water fire night day",
]


def reference(path: Path, text: str) -> np.ndarray:
    """llama.cpp's pooled embedding of `text` (with the model's special tokens), computed here directly."""
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.embeddings = True
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, cp)
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode()
    buf = (llama_cpp.llama_token * 512)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, 512, True, True)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    for i in range(n):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = buf[i], i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, True
    batch.n_tokens = n
    assert llama_cpp.llama_decode(ctx, batch) == 0
    n_embd = llama_cpp.llama_model_n_embd(model)
    pooled = llama_cpp.llama_get_embeddings_seq(ctx, 0)
    vector = np.ctypeslib.as_array(pooled, shape=(n_embd,)).astype(np.float64)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return vector / np.linalg.norm(vector)


def st_vectors(reply: dict) -> list[list[float]]:
    """ST's reading (src/vectors/llamacpp-vectors.js, kobold.js /embed): data[] by index, .embedding."""
    items = sorted(reply["data"], key=lambda x: (x[0] if isinstance(x, list) else x)["index"])
    return [(x[0] if isinstance(x, list) else x)["embedding"] for x in items]


@pytest.fixture(scope="module")
def embedding_bridge(tmp_path_factory, companion_models_dir):
    from tests.fixtures.server import start_server

    server = start_server(tmp_path_factory.mktemp("embed"), companion_models_dir, "--model",
                          "tiny-llama-Q8_0", "--ctx", "512", "--embedding-model", "embed/bge-tiny-en-F32")
    yield server
    server.stop()


async def _post(server, path: str, body: dict, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession(server.url) as http, http.post(path, json=body, **kwargs) as reply:
        return reply.status, await reply.json()


async def test_llamacpp_source_vectors_equal_llama_cpps_own_normalised_and_in_order(embedding_bridge,
                                                                                     bert_embedder):
    status, reply = await _post(embedding_bridge, "/v1/embeddings", {"input": TEXTS})  # ST: no `model`
    assert status == 200, reply
    vectors = st_vectors(reply)
    assert len(vectors) == 10 and [d["index"] for d in reply["data"]] == list(range(10))
    for text, vector in zip(TEXTS, vectors, strict=True):
        got = np.asarray(vector)
        assert abs(np.linalg.norm(got) - 1.0) < 1e-6  # bge normalises
        np.testing.assert_allclose(got, reference(bert_embedder, text), atol=1e-5)
    assert reply["model"] == "embed/bge-tiny-en-F32" and reply["usage"]["prompt_tokens"] > 10


async def test_koboldcpp_source_without_content_type_gets_a_stable_model_name(embedding_bridge,
                                                                             bert_embedder):
    # ST's server posts a JSON string with no Content-Type: node-fetch labels it text/plain.
    body = json.dumps({"input": TEXTS[:3]}).encode()
    replies = []
    for _ in range(2):
        async with aiohttp.ClientSession(embedding_bridge.url) as http, http.post(
            "/api/extra/embeddings", data=body, headers={"Content-Type": "text/plain;charset=UTF-8"}
        ) as reply:
            assert reply.status == 200, await reply.text()
            replies.append(await reply.json())
    assert replies[0]["model"] and replies[0]["model"] == replies[1]["model"]  # ST scopes its index by it
    for text, vector in zip(TEXTS[:3], st_vectors(replies[0]), strict=True):
        np.testing.assert_allclose(vector, reference(bert_embedder, text), atol=1e-5)


async def test_koboldcpp_source_learns_the_model_name_from_an_empty_list(embedding_bridge):
    """ST 1.19's KoboldCpp source embeds [] before each list or query of its index, for the index's scope."""
    async with aiohttp.ClientSession(embedding_bridge.url) as http, http.post(
            "/api/extra/embeddings", data=json.dumps({"input": []}).encode(),
            headers={"Content-Type": "text/plain;charset=UTF-8"}) as reply:
        assert reply.status == 200, await reply.text()
        answer = await reply.json()
    assert answer["data"] == [] and answer["model"] == "embed/bge-tiny-en-F32"


async def test_a_query_gets_its_familys_prefix(embedding_bridge, bert_embedder):
    status, reply = await _post(embedding_bridge, "/v1/embeddings",
                                {"input": "the cat", "input_type": "query", "model": "whatever"})
    assert status == 200
    expected = reference(bert_embedder, BGE_QUERY + "the cat")
    np.testing.assert_allclose(st_vectors(reply)[0], expected, atol=1e-5)


async def test_bad_embedding_requests_are_400s_that_say_why(embedding_bridge):
    for body, words in (({"input": 5}, "list of texts"), ({"input": [[1, 2, 3]]}, "token ids"),
                        ({"input": "x", "encoding_format": "hex"}, "encoding_format"), ({}, "`input`")):
        status, reply = await _post(embedding_bridge, "/v1/embeddings", body)
        assert status == 400 and words in reply["error"]["message"], (body, reply)


async def test_base64_and_dimensions(embedding_bridge):
    status, floats = await _post(embedding_bridge, "/v1/embeddings", {"input": "hello world"})
    status, packed = await _post(embedding_bridge, "/v1/embeddings",
                                 {"input": "hello world", "encoding_format": "base64", "dimensions": 16})
    assert status == 200
    import base64

    cut = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    expected = np.asarray(floats["data"][0]["embedding"][:16])
    np.testing.assert_allclose(cut, expected / np.linalg.norm(expected), atol=1e-6)


async def test_a_causal_embedding_model_pools_its_last_token_per_text(start_bridge, companion_models_dir,
                                                                      decoder_embedder):
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "512", "--embedding-model",
                          "embed/Qwen3-Embedding-tiny-F16", models=companion_models_dir)
    status, reply = await _post(server, "/v1/embeddings", {"input": TEXTS})
    assert status == 200, reply
    for text, vector in zip(TEXTS, st_vectors(reply), strict=True):
        np.testing.assert_allclose(vector, reference(decoder_embedder, text), atol=1e-5)
    assert server.status()["companions"]["embedding"]["pooling"] == "last"


async def test_swapping_the_embedding_model_is_announced_and_a_crash_touches_nothing_else(
    start_bridge, companion_models_dir
):
    server = start_bridge("--model", "tiny-llama-Q8_0", "--ctx", "512", models=companion_models_dir)
    status, reply = await _post(server, "/v1/embeddings", {"input": "hi"})
    assert status == 503 and "no embedding model" in reply["error"]["message"]
    events: list[tuple[str, dict]] = []

    async def listen() -> None:
        async with aiohttp.ClientSession(server.url) as http, http.get("/bridge/v1/events") as stream:
            name = None
            async for raw in stream.content:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:") and name:
                    events.append((name, json.loads(line[5:])))

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.5)
    for model in ("embed/bge-tiny-en-F32", "embed/Qwen3-Embedding-tiny-F16"):
        status, reply = await _post(server, "/bridge/v1/companions/embedding", {"model": model})
        assert status == 200, reply
    await asyncio.sleep(0.5)
    listener.cancel()
    changed = [data for name, data in events if name == "embedding_model_changed"]
    assert changed and changed[-1]["previous"] == "embed/bge-tiny-en-F32", events
    assert "vectorize" in changed[-1]["message"].lower()

    pid = server.status()["companions"]["embedding"]["pid"]
    chat_pid = server.status()["pid"]
    psutil.Process(pid).kill()
    status, reply = await _post(server, "/v1/embeddings", {"input": "hi"})
    if status == 200:  # the bridge had already noticed and was reloading: the request waited for it
        assert server.status()["companions"]["embedding"]["pid"] not in (None, pid)
    else:  # this request met the crash: it fails with the reason ...
        assert status in (502, 503), reply
        assert "SIGKILL" in reply["error"]["message"] or "not answer" in reply["error"]["message"] or \
            "loaded again" in reply["error"]["message"] or "restarting" in reply["error"]["message"]
    for _ in range(100):  # ... the same model comes back by itself
        if server.status()["companions"]["embedding"]["state"] == "ready":
            break
        await asyncio.sleep(0.1)
    status, reply = await _post(server, "/v1/embeddings", {"input": "hi"})
    assert status == 200 and reply["model"] == "embed/Qwen3-Embedding-tiny-F16"
    assert server.status()["pid"] == chat_pid and server.status()["state"] == "ready"  # chat untouched
    status, reply = await _post(server, "/completion", {"prompt": "hello", "n_predict": 2})
    assert status == 200
