"""What llama.cpp can run a model on, and how a plan reaches it.

  ggml.py        ctypes bindings to llama.cpp's device registry (the libggml that libllama uses)
  inventory.py   the device list, read in a child process (a GPU context or an RPC connection in the
                 server process would hold memory and block the RPC server's one client slot)
  rpc_server.py  llama.cpp's RPC server started from the same library: a process that becomes an
                 offload device for another machine (or for tests, on 127.0.0.1)
  placement.py   the planner's placement as llama.cpp's model parameters: devices, layers per device,
                 MoE experts kept in host memory
  actual.py      what llama.cpp really allocated per device, read from its load log, and the comparison
                 with the plan
"""
