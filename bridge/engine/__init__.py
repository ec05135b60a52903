"""The llama.cpp engine: a worker process that generates, and the server-side handle that drives it.

`Engine` (client.py) is what the HTTP layer uses; `types.py` holds the shared vocabulary of requests,
chunks and results. Importing this package does not import llama.cpp.
"""
