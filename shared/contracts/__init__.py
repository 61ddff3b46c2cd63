"""Python code generated from proto/agentforge/v1 (regenerate: `python -m shared.contracts.generate`).

Never edit the generated modules under agentforge/v1 by hand; a unit test regenerates them and compares.
"""
