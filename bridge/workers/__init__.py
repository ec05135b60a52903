"""Other machines lending their GPU or CPU to the bridge, through llama.cpp's RPC backend.

  info.py      what a worker reports beside its RPC port: the real device kind, name, memory, bandwidth
               and the versions (RPC itself reports every device as a GPU with the host's RAM)
  serve.py     `st-bridge worker`: llama.cpp's RPC server plus that small HTTP endpoint
  registry.py  the bridge's side: the workers it is told about, their state, and their devices as the
               planner's offload devices
"""
