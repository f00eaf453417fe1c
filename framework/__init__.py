"""batchax: a JAX framework for batched training and inference."""
from framework import host_memory as _host_memory

_host_memory.keep_freed_memory()  # before jax's CPU client starts its threads: see framework/host_memory.py
