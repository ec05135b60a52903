"""Companion models: what SillyTavern asks of a local backend besides chat, served beside the chat model.

- `embedding_worker.py` runs an embedding GGUF in its own child process (the engine's worker lifecycle,
  `bridge.engine.client._Worker`), `embedder.py` is its server-side handle, and `families.py` holds each
  embedding family's pooling, normalisation and query/document prefixes.
- Vision is the chat model's own: a projector (`mmproj`) loaded by llama.cpp's `mtmd` inside the chat
  worker (`bridge.engine.vision`). `pairing.py` finds the projector of a model in the catalog, on the Hub
  and in the models folder; `images.py` checks and decodes the images clients send.
- `plans.py` places the companions and the chat model in one memory budget; `manager.py` loads, drops and
  reports them; `recommend.py` picks small embedding models from the catalog for this machine.

A crash in one worker never touches another: each runs in its own process.
"""
