// Declarations of nudgefast's native CPU ops (implemented one per file in csrc/, registered in
// ops.cpp). Argument checks raise c10::TypeError / c10::ValueError, which reach Python as
// TypeError / ValueError naming the offending argument.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace nudgefast {

// kv_store.cpp: k, v [T, Hkv, D] -> k_pages, v_pages [num_pages, page_size, Hkv, D] at the flat
// slots slot_mapping[t] (int64; negative = skip), in place.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pages, at::Tensor& v_pages,
              const at::Tensor& slot_mapping);
// kv_store_rope.cpp: q rotated in place (float32), rotated k and v into the pages at slot_mapping;
// cos/sin [P, D / 2] rows at positions (kernels/kv_store.py store_kv_rope_ref).
void store_kv_rope(at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pages,
                   at::Tensor& v_pages, const at::Tensor& slot_mapping, const at::Tensor& positions,
                   const at::Tensor& cos, const at::Tensor& sin);

// paged_attention.cpp: causal attention of the last q_len_b tokens of every row over the paged
// KV cache (decode is q_len_b == 1). Returns [T, Hq, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& cu_q_lens, double scale, int64_t window, double softcap);

// nudge_gate.cpp: one fused nudging decode step in place (nudge_step_ref of kernels/nudge_gate.py),
// GateState (its per-row parameters included), both ModelCursors and GateParams passed field by
// field; see ops.cpp for the schema.
void nudge_step(const std::optional<at::Tensor>& base_logits, const std::optional<at::Tensor>& nudger_logits,
                const at::Tensor& seed, const at::Tensor& word_state, const at::Tensor& span,
                const at::Tensor& finished, const at::Tensor& n_out, const at::Tensor& n_nudged,
                const at::Tensor& out_tokens, const at::Tensor& out_from_nudger, const at::Tensor& stop_ids,
                const at::Tensor& word_start, const at::Tensor& gate, const at::Tensor& threshold,
                const at::Tensor& word_level, const at::Tensor& inv_temp, const at::Tensor& top_p,
                const at::Tensor& sample_mode, const at::Tensor& max_new,
                const std::optional<at::Tensor>& base_input_ids, const std::optional<at::Tensor>& base_positions,
                const std::optional<at::Tensor>& base_seq_lens, const std::optional<at::Tensor>& base_slot_mapping,
                const std::optional<at::Tensor>& base_block_tables, int64_t base_page_size,
                const std::optional<at::Tensor>& nudger_input_ids, const std::optional<at::Tensor>& nudger_positions,
                const std::optional<at::Tensor>& nudger_seq_lens,
                const std::optional<at::Tensor>& nudger_slot_mapping,
                const std::optional<at::Tensor>& nudger_block_tables, int64_t nudger_page_size,
                int64_t mode, int64_t max_sample);

// block_linear.cpp: y = x @ W.T, x float32 [M, K], W [N, K] as codes + per-block scale/offset
// (nudgefast/blocks.py); bits 4 with block 32, or bits 8 with block 32 or 16. Returns [M, N].
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& offset, int64_t bits, int64_t block);
// The same product with x quantized to int8 per block (integer block dots; not exact: see
// blocks.py block_linear_q8_ref). Rows of x beyond 16 (prefill) are multiplied exactly.
at::Tensor block_linear_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                           const at::Tensor& offset, int64_t bits, int64_t block);
// The kernels block_linear runs here: {"exact:<chosen>", "q8:<chosen>", every kernel this CPU runs...}.
std::vector<std::string> block_kernels();

// rms_norm.cpp: x float32 [..., n] / sqrt(mean(x^2) + eps) * weight (float32 [n], optional).
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps);

// block_linear.cpp: "kernel=isa;..." for every native kernel, as chosen on this CPU.
std::string kernel_isa();

}  // namespace nudgefast
