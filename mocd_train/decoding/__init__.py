"""Decoding-time teachers on one engine: RMOD, the CD baselines, Best-of-K and π_ref (engine, decoders), the worst-case
weights (weights), MOD (mod) and MAP-D (map_d)."""
