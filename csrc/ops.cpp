// Registration of nudgefast's native CPU ops as torch ops (torch.ops.nudgefast.*), and the Python
// module init that lets `from nudgefast import _C` load this library (loading it runs the
// registrations below). The schemas are the contract with nudgefast/ops.py and nudgefast/native.py.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"
#include "sampler.h"

TORCH_LIBRARY(nudgefast, m) {
  // kv_store.cpp: k, v [T, Hkv, D] into pages [num_pages, page_size, Hkv, D] at slot_mapping (int64 [T],
  // negative = skip).
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor slot_mapping) -> ()");
  // kv_store_rope.cpp: float32 q [T, Hq, D] rotated in place; rotated k and v stored as store_kv does;
  // cos, sin [max_positions, D / 2] (kv_store.rope_cache) at positions int64 [T].
  m.def("store_kv_rope(Tensor(a!) q, Tensor k, Tensor v, Tensor(b!) k_pages, Tensor(c!) v_pages, "
        "Tensor slot_mapping, Tensor positions, Tensor cos, Tensor sin) -> ()");
  // paged_attention.cpp: q [T, Hq, D]; block_tables int32 [B, P]; seq_lens int32 [B]; cu_q_lens int32 [B+1].
  m.def("paged_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_tables, Tensor seq_lens, "
        "Tensor cu_q_lens, float scale, int window, float softcap) -> Tensor");
  // nudge_gate.cpp: GateState fields (per-row parameters included), then each ModelCursor's (input_ids,
  // positions, seq_lens, slot_mapping, block_tables, page_size) or Nones, then GateParams fields.
  // Everything marked ! is updated in place.
  m.def("nudge_step(Tensor? base_logits, Tensor? nudger_logits, Tensor seed, Tensor(a!) word_state, "
        "Tensor(b!) span, Tensor(c!) finished, Tensor(d!) n_out, Tensor(e!) n_nudged, Tensor(f!) out_tokens, "
        "Tensor(g!) out_from_nudger, Tensor stop_ids, Tensor word_start, Tensor gate, Tensor threshold, "
        "Tensor word_level, Tensor inv_temp, Tensor top_p, Tensor sample_mode, Tensor max_new, "
        "Tensor(h!)? base_input_ids, Tensor(i!)? base_positions, Tensor(j!)? base_seq_lens, "
        "Tensor(k!)? base_slot_mapping, Tensor? base_block_tables, int base_page_size, "
        "Tensor(l!)? nudger_input_ids, Tensor(m!)? nudger_positions, Tensor(n!)? nudger_seq_lens, "
        "Tensor(o!)? nudger_slot_mapping, Tensor? nudger_block_tables, int nudger_page_size, "
        "int mode, int max_sample) -> ()");
  // sampler.cpp: one candidate per row (sample_ref; sample_rows_ref with per-row parameters), and the
  // RNG's hashes and noise (rng.hash_ref, gumbel_ref).
  m.def("sample(Tensor logits, Tensor seed, Tensor step, int stream, float temperature, float top_p) -> Tensor");
  m.def("sample_rows(Tensor logits, Tensor seed, Tensor step, int stream, Tensor inv_temp, Tensor top_p, "
        "Tensor mode, int max_sample) -> Tensor");
  m.def("rng_noise(Tensor seed, Tensor step, int stream, int n) -> (Tensor, Tensor)");
  // block_linear.cpp: x float32 [M, K] @ W.T for W in quantized blocks (nudgefast/blocks.py BlockWeight).
  m.def("block_linear(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int block) -> Tensor");
  // the same with x quantized to int8 per block (weights="gguf-q8"); the kernels chosen and available
  m.def("block_linear_q8(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int block) -> Tensor");
  m.def("block_kernels() -> str[]", &nudgefast::block_kernels);  // no tensors: a catch-all kernel
  // rms_norm.cpp: x float32 [..., n] / sqrt(mean(x^2) + eps) * weight [n] (weight optional).
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  // block_linear.cpp: the instruction set each kernel runs on this CPU (no tensors: a catch-all kernel).
  m.def("kernel_isa() -> str", &nudgefast::kernel_isa);
}

TORCH_LIBRARY_IMPL(nudgefast, CPU, m) {
  m.impl("store_kv", &nudgefast::store_kv);
  m.impl("store_kv_rope", &nudgefast::store_kv_rope);
  m.impl("paged_attention", &nudgefast::paged_attention);
  m.impl("nudge_step", &nudgefast::nudge_step);
  m.impl("sample", &nudgefast::sample);
  m.impl("sample_rows", &nudgefast::sample_rows);
  m.impl("rng_noise", &nudgefast::rng_noise);
  m.impl("block_linear", &nudgefast::block_linear);
  m.impl("block_linear_q8", &nudgefast::block_linear_q8);
  m.impl("rms_norm", &nudgefast::rms_norm);
}

// A module with no functions: the ops are reached through torch.ops.nudgefast.
static PyModuleDef nudgefast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "nudgefast native CPU ops (see torch.ops.nudgefast)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&nudgefast_c_module); }
