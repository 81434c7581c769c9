"""The device side of decoding: row batches with per-row state in device tensors, the decode step
and the speculative round, CUDA graphs, and the text-level path for different tokenizers. It never
imports engine/ and never allocates a KV page."""
