"""Agent Forge's shared library: the phase interface, models, data, evaluation and the fabric."""
import os

# OpenMP threads that spin while waiting steal the cores from each other when several torch processes
# share a small machine (the services, the tests, the servers); passive waiting measured ~8x faster there.
# It must be set before torch loads its OpenMP runtime, hence here, at the package's first import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Our progress reaches users as progress events and bars per phase; the hub's and transformers' own bars for
# every checkpoint save and load would interleave with those and flood the services' logs.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
