"""Agent Forge's shared library: the phase interface, models, data, evaluation and the fabric."""
import os

# OpenMP threads that spin while waiting steal the cores from each other when several torch processes
# share a small machine (the services, the tests, the servers); passive waiting measured ~8x faster there.
# It must be set before torch loads its OpenMP runtime, hence here, at the package's first import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
