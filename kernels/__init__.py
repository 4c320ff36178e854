"""The C++ sources of hcx-server's CPU kernels (installed as the package hcx_server_kernels).

server.build_kernels() compiles them once per machine; nothing here is Python code to import.
"""
