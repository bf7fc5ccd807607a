"""Decoding-time teachers: MAP-D now; the block engine (RMOD, CD, Best-of-K) and MOD join here."""
