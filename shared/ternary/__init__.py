"""Ternary (BitNet b1.58) layers, their packed codecs and the packed model file: made by Phase 4 (BitNet),
and kept by every later phase, which receives a ternary model and must hand one on."""
