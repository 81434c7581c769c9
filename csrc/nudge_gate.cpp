// nudge_step: the fused nudging decode step on the CPU, with the semantics of nudge_step_ref in
// kernels/nudge_gate.py (its docstring states the rule, the ending and the splice). Every row carries its
// own parameters (gate, threshold, granularity, sampler, max_new, stop ids); mode and max_sample are
// the batch's. Per running row (finished == 0; finished rows are not touched, cursors included):
//   candidates b (base logits, stream 0) and n (nudger logits, stream 1) at step n_out, and the
//   gate statistics of the base row from the same first pass (sampler.h); the rule; the ending;
//   and the splice into each given cursor.
//
// Phase 1 draws the candidates, one work item per (row, model), in parallel: at batch 1 the base
// and nudger rows run side by side. Phase 2 applies the rule, ending and splice row by row (a few
// scalar operations each).
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "ops.h"
#include "sampler.h"

namespace nudgefast {
namespace {

// Constants of kernels/nudge_gate.py.
enum Mode : int64_t { kModeNudging = 0, kModeBaseOnly = 1, kModeNudgerOnly = 2 };
enum Gate : int64_t { kGateTopProb = 0, kGateEntropy = 1 };
enum WordState : int32_t { kStateNudge = 0, kStateBase = 1 };
enum Finish : int32_t { kFinishNone = 0, kFinishStop = 1, kFinishLength = 2 };

void check_state_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "nudge_step: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "nudge_step: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "nudge_step: ", name, " must be contiguous (it is updated in place)");
  if (rows >= 0) {
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == rows, "nudge_step: ", name, " must have ", rows,
                      " rows, got shape ", t.sizes());
  }
}

// One model's cursor: all five tensors, or none.
struct Cursor {
  int64_t* input_ids = nullptr;
  int64_t* positions = nullptr;
  int32_t* seq_lens = nullptr;
  int64_t* slot_mapping = nullptr;
  const int32_t* block_tables = nullptr;
  int64_t pages = 0, page_size = 1;

  static Cursor from(const char* name, const std::optional<at::Tensor>& ids, const std::optional<at::Tensor>& pos,
                     const std::optional<at::Tensor>& lens, const std::optional<at::Tensor>& slots,
                     const std::optional<at::Tensor>& tables, int64_t page_size, int64_t B) {
    Cursor c;
    const bool any = ids || pos || lens || slots || tables;
    if (!any) return c;
    TORCH_CHECK_VALUE(ids && pos && lens && slots && tables, "nudge_step: the ", name,
                      " cursor needs all of input_ids, positions, seq_lens, slot_mapping, block_tables");
    check_state_tensor(*ids, "cursor.input_ids", at::kLong, B);
    check_state_tensor(*pos, "cursor.positions", at::kLong, B);
    check_state_tensor(*lens, "cursor.seq_lens", at::kInt, B);
    check_state_tensor(*slots, "cursor.slot_mapping", at::kLong, B);
    check_state_tensor(*tables, "cursor.block_tables", at::kInt, B);
    TORCH_CHECK_VALUE(tables->dim() == 2, "nudge_step: ", name, " block_tables must be [B, P], got ",
                      tables->sizes());
    TORCH_CHECK_VALUE(page_size >= 1, "nudge_step: ", name, " page_size must be >= 1, got ", page_size);
    c.input_ids = ids->mutable_data_ptr<int64_t>();
    c.positions = pos->mutable_data_ptr<int64_t>();
    c.seq_lens = lens->mutable_data_ptr<int32_t>();
    c.slot_mapping = slots->mutable_data_ptr<int64_t>();
    c.block_tables = tables->const_data_ptr<int32_t>();
    c.pages = tables->size(1);
    c.page_size = page_size;
    return c;
  }

  // input_ids = token, one position further, and the slot of the new position (-1 past the table).
  void advance(int64_t row, int64_t token) const {
    if (input_ids == nullptr) return;
    const int64_t pos = positions[row] + 1, page = pos / page_size;
    input_ids[row] = token;
    positions[row] = pos;
    seq_lens[row] += 1;
    slot_mapping[row] = page < pages ? int64_t{block_tables[row * pages + page]} * page_size + pos % page_size : -1;
  }
};

struct Candidates {
  int64_t b = 0, n = 0;
  bool confident = false;
};

bool in_set(int64_t token, const int64_t* ids, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] == token) return true;
  return false;
}

}  // namespace

void nudge_step(const std::optional<at::Tensor>& base_logits_in, const std::optional<at::Tensor>& nudger_logits_in,
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
                int64_t mode, int64_t max_sample) {
  TORCH_CHECK_VALUE(mode == kModeNudging || mode == kModeBaseOnly || mode == kModeNudgerOnly,
                    "nudge_step: mode must be MODE_NUDGING, MODE_BASE_ONLY or MODE_NUDGER_ONLY, got ", mode);
  TORCH_CHECK_VALUE(max_sample >= kSampleGreedy && max_sample <= kSampleNucleus,
                    "nudge_step: max_sample must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, got ", max_sample);

  TORCH_CHECK_VALUE(seed.dim() == 1, "nudge_step: seed must be a 1-D int64 tensor, got shape ", seed.sizes());
  const int64_t B = seed.size(0);
  check_state_tensor(seed, "seed", at::kLong, B);
  check_state_tensor(word_state, "word_state", at::kInt, B);
  check_state_tensor(span, "span", at::kInt, B);
  check_state_tensor(finished, "finished", at::kInt, B);
  check_state_tensor(n_out, "n_out", at::kInt, B);
  check_state_tensor(n_nudged, "n_nudged", at::kInt, B);
  check_state_tensor(out_tokens, "out_tokens", at::kInt, B);
  check_state_tensor(out_from_nudger, "out_from_nudger", at::kChar, B);
  TORCH_CHECK_VALUE(out_tokens.dim() == 2 && out_tokens.size(1) >= 1 && out_from_nudger.sizes() == out_tokens.sizes(),
                    "nudge_step: out_tokens and out_from_nudger must both be [B, Wout], Wout >= 1, got ",
                    out_tokens.sizes(), " and ", out_from_nudger.sizes());
  check_state_tensor(stop_ids, "stop_ids", at::kLong, B);
  check_state_tensor(word_start, "word_start", at::kBool, -1);
  TORCH_CHECK_VALUE(stop_ids.dim() == 2 && stop_ids.size(1) >= 1,
                    "nudge_step: stop_ids must be int64 [B, S] with S >= 1 (-1 = none), got ", stop_ids.sizes());
  check_state_tensor(gate, "gate", at::kInt, B);
  check_state_tensor(threshold, "threshold", at::kFloat, B);
  check_state_tensor(word_level, "word_level", at::kInt, B);
  check_state_tensor(inv_temp, "inv_temp", at::kFloat, B);
  check_state_tensor(top_p, "top_p", at::kFloat, B);
  check_state_tensor(sample_mode, "sample_mode", at::kInt, B);
  check_state_tensor(max_new, "max_new", at::kInt, B);
  TORCH_CHECK_VALUE(word_start.dim() == 1 && word_start.size(0) >= 1, "nudge_step: word_start must be bool [W]");

  const bool need_base = mode != kModeNudgerOnly, need_nudger = mode != kModeBaseOnly;
  at::Tensor base_logits, nudger_logits;
  for (auto [given, out, name, needed] :
       {std::tuple{&base_logits_in, &base_logits, "base_logits", need_base},
        std::tuple{&nudger_logits_in, &nudger_logits, "nudger_logits", need_nudger}}) {
    if (!needed) continue;
    TORCH_CHECK_VALUE(given->has_value(), "nudge_step: ", name, " is required in this mode");
    const at::Tensor& t = given->value();
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) >= 1, "nudge_step: ", name,
                      " must be [B, V] with B=", B, " and V >= 1, got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                     "nudge_step: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), "nudge_step: ", name, " must be on the CPU, got ", t.device());
    *out = t.stride(1) == 1 ? t : t.contiguous();
  }
  const Cursor cursors[2] = {
      Cursor::from("base", base_input_ids, base_positions, base_seq_lens, base_slot_mapping, base_block_tables,
                   base_page_size, B),
      Cursor::from("nudger", nudger_input_ids, nudger_positions, nudger_seq_lens, nudger_slot_mapping,
                   nudger_block_tables, nudger_page_size, B)};

  const int64_t* seeds = seed.const_data_ptr<int64_t>();
  int32_t* ws = word_state.mutable_data_ptr<int32_t>();
  int32_t* sp = span.mutable_data_ptr<int32_t>();
  int32_t* fin = finished.mutable_data_ptr<int32_t>();
  int32_t* nout = n_out.mutable_data_ptr<int32_t>();
  int32_t* nnud = n_nudged.mutable_data_ptr<int32_t>();
  int32_t* otok = out_tokens.mutable_data_ptr<int32_t>();
  int8_t* ofrom = out_from_nudger.mutable_data_ptr<int8_t>();
  const int64_t width = out_tokens.size(1);
  const int64_t* stop_rows = stop_ids.const_data_ptr<int64_t>();
  const int64_t n_stops = stop_ids.size(1);
  const int32_t* gates = gate.const_data_ptr<int32_t>();
  const float* thresholds = threshold.const_data_ptr<float>();
  const int32_t* words = word_level.const_data_ptr<int32_t>();
  const float* inv_temps = inv_temp.const_data_ptr<float>();
  const float* top_ps = top_p.const_data_ptr<float>();
  const int32_t* modes = sample_mode.const_data_ptr<int32_t>();
  const int32_t* max_news = max_new.const_data_ptr<int32_t>();
  const bool* wstart = word_start.const_data_ptr<bool>();
  const int64_t n_words = word_start.size(0);

  // Phase 1: candidates, one item per (running row, model).
  std::vector<int64_t> items;  // row * 2 + (0 base, 1 nudger)
  for (int64_t r = 0; r < B; ++r) {
    if (fin[r] != kFinishNone) continue;
    TORCH_CHECK_VALUE(modes[r] >= kSampleGreedy && modes[r] <= kSampleNucleus, "nudge_step: sample_mode[", r,
                      "] must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, got ", modes[r]);
    TORCH_CHECK_VALUE(gates[r] == kGateTopProb || gates[r] == kGateEntropy, "nudge_step: gate[", r,
                      "] must be GATE_TOP_PROB or GATE_ENTROPY, got ", gates[r]);
    if (need_base) items.push_back(r * 2);
    if (need_nudger) items.push_back(r * 2 + 1);
  }
  std::vector<Candidates> cand(B);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = items[i] / 2;
      const bool nudger = items[i] % 2 == 1;
      const at::Tensor& lg = nudger ? nudger_logits : base_logits;
      const void* row = static_cast<const char*>(lg.const_data_ptr()) + r * lg.stride(0) * lg.element_size();
      const SampleSpec spec = row_sample_spec(modes[r], inv_temps[r], top_ps[r], max_sample);
      if (nudger) {
        cand[r].n = sample_row(row, lg.scalar_type(), lg.size(1), seeds[r], nout[r], 1, spec, nullptr);
      } else if (mode == kModeNudging) {
        GateStats stats;
        cand[r].b = sample_row(row, lg.scalar_type(), lg.size(1), seeds[r], nout[r], 0, spec, &stats);
        cand[r].confident = gates[r] == kGateTopProb ? stats.p_top >= thresholds[r] : stats.entropy <= thresholds[r];
      } else {
        cand[r].b = sample_row(row, lg.scalar_type(), lg.size(1), seeds[r], nout[r], 0, spec, nullptr);
      }
    }
  });

  // Phase 2: the rule, the ending and the splice.
  for (int64_t r = 0; r < B; ++r) {
    if (fin[r] != kFinishNone) continue;
    const int64_t b = need_base ? cand[r].b : cand[r].n, n = need_nudger ? cand[r].n : cand[r].b;
    const int64_t* stops = stop_rows + r * n_stops;
    bool take_b = mode == kModeBaseOnly;
    if (mode == kModeNudging) {
      const bool confident = cand[r].confident, b_ok = !in_set(b, stops, n_stops);
      if (words[r] != 0) {
        const bool in_base = ws[r] == kStateBase;
        const bool n_word_start = n >= 0 && n < n_words && wstart[n];
        const bool to_base = sp[r] >= 1 && n_word_start && (confident || b == n) && b_ok;
        take_b = in_base ? confident && b_ok : to_base;
        if (!take_b) sp[r] = in_base ? 1 : sp[r] + 1;
        ws[r] = take_b ? kStateBase : kStateNudge;
      } else {
        take_b = confident && b_ok;
      }
    }
    const int64_t token = take_b ? b : n;
    const bool from_nudger = !take_b;
    if (in_set(token, stops, n_stops)) {  // a stop ends the row and is not written
      fin[r] = kFinishStop;
      continue;
    }
    const int64_t col = ((nout[r] % width) + width) % width;  // the ring's column of output step n_out
    otok[r * width + col] = static_cast<int32_t>(token);
    ofrom[r * width + col] = from_nudger ? 1 : 0;
    nout[r] += 1;
    nnud[r] += from_nudger ? 1 : 0;
    if (nout[r] >= max_news[r]) {
      fin[r] = kFinishLength;
      continue;
    }
    for (const Cursor& c : cursors) c.advance(r, token);
  }
}

}  // namespace nudgefast
