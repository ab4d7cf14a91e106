// Fused pooled lookups over product-quantized and full embedding tables, on the CPU.
//
// One call pools every feature of a collection: for each (feature, bag) it reads the bag's ids
// once, checks their range, gathers each id's M codes (uint8 / uint16, never widened to int64)
// and accumulates the addressed codewords, which stay in L1/L2 because a table's codebooks are
// [M, K, D/M] floats (128 KiB for M=8, K=256, D=128). Full tables are pooled row by row in the
// same pass. The backward partitions the codebook gradient by (table, subspace), so threads never
// write the same memory and need no private copies; it reads the codes the forward saved in
// [M, n] order instead of gathering them from the table again.
//
// A compressed table may have a fallback table for new ids: ids [0, coded) read their codes
// rows; a new id (in [coded, num_ids)) that is among the table's sorted promoted ids, at slot s,
// reads codes row coded + s; any other new id reads fallback row (id - coded) % fallback_rows,
// which the backward's gradient reaches (column bands, like a full table's).
//
// Nothing is read through an index that was not checked first, whoever calls the operator:
// offsets are checked (start at 0, never decrease, end at len(values)) before the pass starts;
// each id is checked against its table's rows before its row or codes are read, and each code
// against K before its codeword is read (a bad one is skipped). After the pass, the first bad
// feature or table is raised as a ValueError (TORCH_CHECK_VALUE) that names it, using the
// feature and table names the caller passes (newline-separated), or their positions without.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Compile the hot loops for AVX-512, AVX2 and baseline x86-64; the loader picks one per machine,
// so the extension built here also runs on an older CPU. Everything the cloned entry points call
// is force-inlined into them, or it would be compiled once, for baseline x86-64 only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MEC_INLINE inline __attribute__((always_inline))
#else
#define MEC_CLONES
#define MEC_INLINE inline
#endif

namespace torchrec_mec {
namespace {

using at::Tensor;

// How many ids ahead of the current one the forward prefetches the code row / table row.
constexpr int64_t kPrefetchDistance = 16;
// Bags handed to a thread at a time in the forward (dynamic scheduling: bags differ in length).
constexpr int64_t kBagsPerChunk = 32;
// Columns of a full table's gradient owned by one backward task (one 64-byte line).
constexpr int64_t kFullColumnsPerTask = 16;
// How many bags ahead the backward prefetches the output gradient row (one line per bag: the
// rows are far apart, and with one id per bag there is little work to hide the latency behind).
constexpr int64_t kPrefetchBags = 48;

struct Table {
  bool compressed = false;
  const uint8_t* codes = nullptr;  // [rows, M] codes of a compressed table
  int64_t code_bytes = 0;          // 1 (uint8) or 2 (uint16)
  const float* params = nullptr;   // codebooks [M, K, d] or full weight [rows, D]
  int64_t rows = 0, M = 1, K = 0, d = 0, D = 0;
  int64_t num_ids = 0;             // valid ids: [0, num_ids); rows without a fallback
  int64_t coded = 0;               // ids with codes of their own: [0, coded)
  const float* fallback = nullptr; // [fallback_rows, D], or nullptr: no fallback
  int64_t fallback_rows = 0;
  const int64_t* promoted = nullptr;  // [slots] promoted new ids, increasing (then unused slots)
  int64_t slots = 0;
};

// The codes row a valid id of a compressed table with a fallback reads, or -1 - r when it reads
// fallback row r. The search for a promoted id is branch-free (the last slot <= id; the loop
// count depends on the number of slots only), so new ids cost no mispredicted branches.
MEC_INLINE int64_t resolve_row(const Table& t, int64_t id) {
  if (id < t.coded) return id;
  if (t.slots > 0) {
    const int64_t* base = t.promoted;
    for (int64_t n = t.slots; n > 1;) {
      const int64_t half = n >> 1;
      base = base[half] <= id ? base + half : base;
      n -= half;
    }
    if (*base == id) return t.coded + (base - t.promoted);
  }
  return -1 - (id - t.coded) % t.fallback_rows;
}

struct Feature {
  int64_t table = 0;
  bool mean = false;
  int64_t col = 0;                       // first output column
  int64_t id_begin = 0, id_end = 0;      // its ids in `values`
  int64_t saved = 0;                     // byte offset of its saved codes [M, n] (compressed)
};

// Feature and table names for error messages: `joined` split at newlines, or "#i" if absent.
struct Names {
  std::vector<std::string> names;
  const char* kind;
  Names(const std::string& joined, const char* kind_) : kind(kind_) {
    if (joined.empty()) return;
    std::stringstream stream(joined);
    for (std::string name; std::getline(stream, name, '\n');) names.push_back(name);
  }
  std::string operator()(int64_t i) const {
    if (i >= 0 && i < static_cast<int64_t>(names.size())) {
      return std::string(kind) + " '" + names[i] + "'";
    }
    return std::string(kind) + " #" + std::to_string(i);
  }
};

struct Plan {
  std::vector<Table> tables;
  std::vector<Feature> features;
  int64_t batch = 0, total_dim = 0, num_values = 0;
  // Saved codes: feature f's [M, n_f] codes start at byte id_begin * saved_stride, where
  // saved_stride is the largest M * code_bytes of the tables; the size depends on len(values)
  // and the tables' shapes only, so a fake (meta) kernel can compute it.
  int64_t saved_stride = 0, saved_bytes = 0;
  const int64_t* offsets = nullptr;      // [F * B + 1], int64
  const void* values = nullptr;          // [n], int32 or int64
  bool int32_ids = false;
  const float* weights = nullptr;        // [n] or nullptr
  Names feature_names, table_names;
  Plan(const std::string& features_joined, const std::string& tables_joined)
      : feature_names(features_joined, "feature"), table_names(tables_joined, "table") {}
};

// Checks that the offsets of every feature's bags start at 0, never decrease and end at
// len(values), naming the first feature at fault.
void check_offsets(const Plan& plan, int64_t num_features) {
  const int64_t* offsets = plan.offsets;
  const int64_t batch = plan.batch, n = plan.num_values;
  TORCH_CHECK_VALUE(offsets[0] == 0, plan.feature_names(0), ": offsets must start at 0, got ",
                    offsets[0]);
  for (int64_t r = 0; r < num_features * batch; ++r) {
    TORCH_CHECK_VALUE(offsets[r + 1] >= offsets[r], plan.feature_names(r / batch), ": bag ",
                      r % batch, " has a negative length (", offsets[r + 1] - offsets[r], ")");
  }
  for (int64_t r = 0; r < num_features * batch; ++r) {
    TORCH_CHECK_VALUE(offsets[r + 1] <= n, plan.feature_names(r / batch),
                      ": its bags end at value ", offsets[r + 1], " but there are only ", n,
                      " values (the lengths sum to more than the number of values)");
  }
  const int64_t last = offsets[num_features * batch];
  TORCH_CHECK_VALUE(last == n, plan.feature_names(num_features - 1), ": the bags end at value ",
                    last, " but there are ", n,
                    " values (the lengths sum to less than the number of values)");
}

Plan make_plan(
    const Tensor& values,
    const Tensor& offsets,
    const std::optional<Tensor>& weights,
    at::TensorList codes,
    at::TensorList params,
    at::TensorList fallbacks,
    at::TensorList promoted,
    at::IntArrayRef num_ids,
    at::IntArrayRef feature_tables,
    at::IntArrayRef feature_pooling,
    at::IntArrayRef feature_slots,
    const std::string& feature_names,
    const std::string& table_names) {
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.device().is_cpu(),
              "values must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(values.scalar_type() == at::kInt || values.scalar_type() == at::kLong,
              "values must be int32 or int64");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous() && offsets.device().is_cpu(),
              "offsets must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(codes.size() == params.size() && !params.empty(), "one codes tensor per table");
  TORCH_CHECK(fallbacks.size() == params.size() && promoted.size() == params.size() &&
                  num_ids.size() == params.size(),
              "one fallback, promoted ids tensor and id count per table");
  TORCH_CHECK(feature_tables.size() == feature_pooling.size() &&
                  feature_tables.size() == feature_slots.size(),
              "one table, pooling mode and output slot per feature");
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  Plan plan(feature_names, table_names);
  TORCH_CHECK_VALUE(num_features > 0 && offsets.numel() >= 1 &&
                        (offsets.numel() - 1) % num_features == 0,
                    "offsets must hold num_features * batch + 1 entries: got ", offsets.numel(),
                    " for ", num_features, " features");
  plan.batch = (offsets.numel() - 1) / num_features;
  plan.num_values = values.numel();
  plan.offsets = offsets.data_ptr<int64_t>();
  plan.values = values.data_ptr();
  plan.int32_ids = values.scalar_type() == at::kInt;
  check_offsets(plan, num_features);
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->scalar_type() == at::kFloat && weights->is_contiguous() &&
                    weights->dim() == 1 && weights->device().is_cpu() &&
                    weights->numel() == values.numel(),
                "per_sample_weights must be contiguous float32, one per id");
    plan.weights = weights->data_ptr<float>();
  }
  for (size_t t = 0; t < params.size(); ++t) {
    const Tensor& p = params[t];
    TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.device().is_cpu(),
                "table parameters must be contiguous float32 CPU tensors");
    Table table;
    table.params = p.data_ptr<float>();
    if (p.dim() == 3) {  // codebooks [M, K, d]
      const Tensor& c = codes[t];
      TORCH_CHECK(c.dim() == 2 && c.size(1) == p.size(0) && c.is_contiguous() &&
                      c.device().is_cpu(),
                  "codes must be contiguous CPU [rows, M]");
      TORCH_CHECK(c.scalar_type() == at::kByte || c.scalar_type() == at::kUInt16,
                  "codes must be uint8 or uint16");
      table.compressed = true;
      table.codes = static_cast<const uint8_t*>(c.data_ptr());
      table.code_bytes = c.element_size();
      table.rows = c.size(0);
      table.M = p.size(0);
      table.K = p.size(1);
      table.d = p.size(2);
      table.D = table.M * table.d;
      plan.saved_stride = std::max(plan.saved_stride, table.M * table.code_bytes);
    } else {  // full weight [rows, D]
      TORCH_CHECK(p.dim() == 2, "a table is codebooks [M, K, d] or a weight [rows, D]");
      table.rows = p.size(0);
      table.D = table.d = p.size(1);
    }
    table.num_ids = table.coded = table.rows;
    const Tensor& fb = fallbacks[t];
    const Tensor& ids = promoted[t];
    if (fb.numel() == 0) {
      TORCH_CHECK(num_ids[t] == table.rows && ids.numel() == 0,
                  "a table without a fallback serves ids [0, rows): num_ids must be its rows and "
                  "promoted_ids empty");
    } else {
      TORCH_CHECK(table.compressed, "only compressed tables have fallback tables");
      TORCH_CHECK(fb.scalar_type() == at::kFloat && fb.is_contiguous() && fb.device().is_cpu() &&
                      fb.dim() == 2 && fb.size(1) == table.D,
                  "a fallback table must be contiguous float32 CPU [fallback_rows, D]");
      TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device().is_cpu() &&
                      ids.dim() == 1 && ids.numel() < table.rows,
                  "promoted_ids must be contiguous int64 CPU [slots], slots < rows of codes");
      table.fallback = fb.data_ptr<float>();
      table.fallback_rows = fb.size(0);
      table.promoted = ids.data_ptr<int64_t>();
      table.slots = ids.numel();
      table.coded = table.rows - table.slots;
      TORCH_CHECK(num_ids[t] >= table.coded, "num_ids must be at least the coded ids");
      table.num_ids = num_ids[t];
    }
    plan.tables.push_back(table);
  }
  // Output columns: feature f's block comes at position feature_slots[f], a permutation.
  std::vector<int64_t> slot_dims(num_features, -1);
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t t = feature_tables[f], slot = feature_slots[f];
    TORCH_CHECK(t >= 0 && t < static_cast<int64_t>(plan.tables.size()), "bad table index ", t);
    TORCH_CHECK(slot >= 0 && slot < num_features && slot_dims[slot] < 0,
                "feature_slots must be a permutation of 0..num_features-1");
    slot_dims[slot] = plan.tables[t].D;
  }
  std::vector<int64_t> slot_cols(num_features + 1, 0);
  for (int64_t i = 0; i < num_features; ++i) slot_cols[i + 1] = slot_cols[i] + slot_dims[i];
  plan.total_dim = slot_cols[num_features];
  for (int64_t f = 0; f < num_features; ++f) {
    Feature feature;
    feature.table = feature_tables[f];
    feature.mean = feature_pooling[f] != 0;
    feature.col = slot_cols[feature_slots[f]];
    feature.id_begin = plan.offsets[f * plan.batch];
    feature.id_end = plan.offsets[(f + 1) * plan.batch];
    feature.saved = feature.id_begin * plan.saved_stride;
    plan.features.push_back(feature);
  }
  plan.saved_bytes = plan.num_values * plan.saved_stride;
  return plan;
}

int64_t id_at(const Plan& plan, int64_t j) {
  return plan.int32_ids ? static_cast<const int32_t*>(plan.values)[j]
                        : static_cast<const int64_t*>(plan.values)[j];
}

int64_t code_at(const Table& table, int64_t row, int64_t m) {
  const int64_t i = row * table.M + m;
  return table.code_bytes == 1 ? table.codes[i] : reinterpret_cast<const uint16_t*>(table.codes)[i];
}

// Raises the ValueError for the first id of feature f outside its table (called after a pass
// found one, so the rescan costs nothing on good input).
[[noreturn]] void raise_bad_id(const Plan& plan, int64_t f) {
  const Feature& fe = plan.features[f];
  const Table& table = plan.tables[fe.table];
  for (int64_t j = fe.id_begin; j < fe.id_end; ++j) {
    const int64_t id = id_at(plan, j);
    TORCH_CHECK_VALUE(id >= 0 && id < table.num_ids, plan.feature_names(f), ": id ", id,
                      " is out of range for ", plan.table_names(fe.table), " with ",
                      table.num_ids, " rows");
  }
  TORCH_CHECK(false, "torchrec_mec: ", plan.feature_names(f), " was reported with a bad id");
}

// Raises the ValueError for the first code >= K that compressed table t holds for an id given.
[[noreturn]] void raise_bad_code(const Plan& plan, int64_t t) {
  const Table& table = plan.tables[t];
  for (const Feature& fe : plan.features) {
    if (fe.table != t) continue;
    for (int64_t j = fe.id_begin; j < fe.id_end; ++j) {
      const int64_t id = id_at(plan, j);
      if (id < 0 || id >= table.num_ids) continue;
      const int64_t row = table.fallback ? resolve_row(table, id) : id;
      if (row < 0) continue;  // a fallback row: no codes
      for (int64_t m = 0; m < table.M; ++m) {
        const int64_t k = code_at(table, row, m);
        TORCH_CHECK_VALUE(k < table.K, plan.table_names(t),
                          ": codes hold a value >= codebook_size ", table.K, " (row ", row,
                          ", subspace ", m, ": ", k, ")");
      }
    }
  }
  TORCH_CHECK(false, "torchrec_mec: ", plan.table_names(t), " was reported with a bad code");
}

// Floats are added in GCC vector types: after inlining, GCC cannot prove that the accumulator
// and the codeword do not overlap and would not vectorize a plain loop. Vec<16> is one AVX-512
// register, two AVX2 ones or four SSE ones, depending on the clone.
template <int N>
struct VecOf {
  typedef float type __attribute__((vector_size(N * sizeof(float)), aligned(4), may_alias));
};
template <int N>
using Vec = typename VecOf<N>::type;

template <int N>
MEC_INLINE Vec<N> load(const float* p) {
  return *reinterpret_cast<const Vec<N>*>(p);
}

template <int N>
MEC_INLINE void store(float* p, Vec<N> v) {
  *reinterpret_cast<Vec<N>*>(p) = v;
}

// y[0:n] += a * x[0:n]; N > 0 fixes n = N at compile time (N a multiple of 4).
template <int N>
MEC_INLINE void axpy(float* y, const float* x, float a, int64_t n) {
  if constexpr (N > 0) {
    store<N>(y, load<N>(y) + a * load<N>(x));
  } else {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) axpy<16>(y + i, x + i, a, 16);
    for (; i + 4 <= n; i += 4) axpy<4>(y + i, x + i, a, 4);
    for (; i < n; ++i) y[i] += a * x[i];
  }
}

MEC_INLINE void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 1);
}

MEC_INLINE void record_min(std::atomic<int64_t>& slot, int64_t value) {
  int64_t current = slot.load(std::memory_order_relaxed);
  while (value < current && !slot.compare_exchange_weak(current, value)) {
  }
}

struct ForwardState {
  const Plan& plan;
  float* out;
  uint8_t* saved;  // nullptr when no backward will run
  std::atomic<int64_t> bad_feature;
  std::atomic<int64_t> bad_table;
};

// Pools the ids [begin, end) of one bag of compressed feature `f` into `out` (D floats). With
// M_ and SUB fixed at compile time the bag's sum stays in registers (M_ vectors of SUB floats);
// M_ = 0 is the general case, summing in `out`. FB: the table has a fallback for new ids.
template <typename IdT, typename CodeT, int M_, int SUB, bool FB>
MEC_INLINE void pool_pq_bag(ForwardState& s, int64_t f, int64_t begin, int64_t end, float* out) {
  const Feature& fe = s.plan.features[f];
  const Table& t = s.plan.tables[fe.table];
  // Everything the loop reads is copied into locals first: the saved codes are stored through
  // a char type, which could alias anything reached through `s` and force reloads.
  const IdT* const ids = static_cast<const IdT*>(s.plan.values);
  const float* const weights = s.plan.weights;
  const CodeT* const codes = reinterpret_cast<const CodeT*>(t.codes);
  const float* const books = t.params;
  const int64_t M = M_ > 0 ? M_ : t.M, d = SUB > 0 ? SUB : t.d, K = t.K, rows = t.num_ids;
  const int64_t coded = t.coded;
  const int64_t id_begin = fe.id_begin, id_end = fe.id_end, n = id_end - id_begin;
  CodeT* const saved = s.saved ? reinterpret_cast<CodeT*>(s.saved + fe.saved) : nullptr;
  bool bad_id = false, bad_code = false;
  Vec<(SUB > 0 ? SUB : 4)> acc[M_ > 0 ? M_ : 1] = {};
  if constexpr (M_ == 0) std::fill(out, out + t.D, 0.0f);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchDistance < id_end) {
      const int64_t ahead = static_cast<int64_t>(ids[j + kPrefetchDistance]);
      if (ahead >= 0 && ahead < coded) __builtin_prefetch(codes + ahead * M, 0, 1);
    }
    const int64_t id = static_cast<int64_t>(ids[j]);
    if (id < 0 || id >= rows) {
      bad_id = true;
      continue;
    }
    const float w = weights ? weights[j] : 1.0f;
    int64_t code_row = id;
    if constexpr (FB) {
      code_row = resolve_row(t, id);
      if (code_row < 0) {  // a new id without codes: its fallback row
        const float* const fallback = t.fallback + (-1 - code_row) * t.D;
        if (saved) {
          for (int64_t m = 0; m < M; ++m) saved[m * n + (j - id_begin)] = 0;
        }
        if constexpr (M_ > 0) {
          for (int m = 0; m < M_; ++m) acc[m] += w * load<SUB>(fallback + m * SUB);
        } else {
          axpy<0>(out, fallback, w, t.D);
        }
        continue;
      }
    }
    const CodeT* const row = codes + code_row * M;
    if (saved) {
      for (int64_t m = 0; m < M; ++m) saved[m * n + (j - id_begin)] = row[m];
    }
#pragma GCC unroll 32
    for (int64_t m = 0; m < M; ++m) {
      int64_t k = row[m];
      if (k >= K) {  // never for uint8 codes with K = 256; reads codeword 0 instead
        bad_code = true;
        k = 0;
      }
      if constexpr (M_ > 0) {
        acc[m] += w * load<SUB>(books + (m * K + k) * SUB);
      } else {
        axpy<SUB>(out + m * d, books + (m * K + k) * d, w, d);
      }
    }
  }
  if (bad_id) record_min(s.bad_feature, f);
  if (bad_code) record_min(s.bad_table, fe.table);
  if constexpr (M_ > 0) {
    for (int m = 0; m < M_; ++m) store<SUB>(out + m * SUB, acc[m]);
  }
}

// Pools one bag of full-table feature `f` into `out`; D_ > 0 (a multiple of 16) keeps the sum
// in registers.
template <typename IdT, int D_>
MEC_INLINE void pool_full_bag(ForwardState& s, int64_t f, int64_t begin, int64_t end, float* out) {
  const Feature& fe = s.plan.features[f];
  const Table& t = s.plan.tables[fe.table];
  const IdT* const ids = static_cast<const IdT*>(s.plan.values);
  const float* const weights = s.plan.weights;
  const float* const table = t.params;
  const int64_t rows = t.rows, D = D_ > 0 ? D_ : t.D, id_end = fe.id_end;
  bool bad_id = false;
  Vec<16> acc[D_ > 0 ? D_ / 16 : 1] = {};
  if constexpr (D_ == 0) std::fill(out, out + D, 0.0f);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchDistance < id_end) {
      const int64_t ahead = static_cast<int64_t>(ids[j + kPrefetchDistance]);
      if (ahead >= 0 && ahead < rows) prefetch_lines(table + ahead * D, D * 4);
    }
    const int64_t id = static_cast<int64_t>(ids[j]);
    if (id < 0 || id >= rows) {
      bad_id = true;
      continue;
    }
    const float w = weights ? weights[j] : 1.0f;
    const float* const row = table + id * D;
    if constexpr (D_ > 0) {
      for (int i = 0; i < D_ / 16; ++i) acc[i] += w * load<16>(row + 16 * i);
    } else {
      axpy<0>(out, row, w, D);
    }
  }
  if (bad_id) record_min(s.bad_feature, f);
  if constexpr (D_ > 0) {
    for (int i = 0; i < D_ / 16; ++i) store<16>(out + 16 * i, acc[i]);
  }
}

// The (M, D/M) shapes compiled with register sums (common ones, D <= 256 floats); other shapes
// take the general loop.
#define MEC_PQ_SHAPE(M_, SUB) \
  if (t.M == M_ && t.d == SUB) return pool_pq_bag<IdT, CodeT, M_, SUB, FB>(s, f, begin, end, out);

template <typename IdT, typename CodeT, bool FB>
MEC_INLINE void pool_pq_bag_dispatch(ForwardState& s, int64_t f, int64_t begin, int64_t end, float* out) {
  const Table& t = s.plan.tables[s.plan.features[f].table];
  MEC_PQ_SHAPE(4, 4) MEC_PQ_SHAPE(8, 4) MEC_PQ_SHAPE(16, 4)
  MEC_PQ_SHAPE(4, 8) MEC_PQ_SHAPE(8, 8) MEC_PQ_SHAPE(16, 8)
  MEC_PQ_SHAPE(4, 16) MEC_PQ_SHAPE(8, 16) MEC_PQ_SHAPE(16, 16)
  MEC_PQ_SHAPE(4, 32) MEC_PQ_SHAPE(8, 32)
  pool_pq_bag<IdT, CodeT, 0, 0, FB>(s, f, begin, end, out);
}
#undef MEC_PQ_SHAPE

template <typename IdT>
MEC_INLINE void pool_full_bag_dispatch(ForwardState& s, int64_t f, int64_t begin, int64_t end, float* out) {
  switch (s.plan.tables[s.plan.features[f].table].D) {
    case 16: return pool_full_bag<IdT, 16>(s, f, begin, end, out);
    case 32: return pool_full_bag<IdT, 32>(s, f, begin, end, out);
    case 64: return pool_full_bag<IdT, 64>(s, f, begin, end, out);
    case 128: return pool_full_bag<IdT, 128>(s, f, begin, end, out);
    case 256: return pool_full_bag<IdT, 256>(s, f, begin, end, out);
    default: return pool_full_bag<IdT, 0>(s, f, begin, end, out);
  }
}

template <typename IdT>
MEC_INLINE void forward_rows_impl(ForwardState& s, int64_t row_begin, int64_t row_end) {
  const Plan& plan = s.plan;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t f = r / plan.batch, b = r % plan.batch;
    const Feature& fe = plan.features[f];
    const Table& t = plan.tables[fe.table];
    float* out = s.out + b * plan.total_dim + fe.col;
    const int64_t begin = plan.offsets[r], end = plan.offsets[r + 1];
    if (!t.compressed) {
      pool_full_bag_dispatch<IdT>(s, f, begin, end, out);
    } else if (t.fallback) {
      if (t.code_bytes == 1) {
        pool_pq_bag_dispatch<IdT, uint8_t, true>(s, f, begin, end, out);
      } else {
        pool_pq_bag_dispatch<IdT, uint16_t, true>(s, f, begin, end, out);
      }
    } else if (t.code_bytes == 1) {
      pool_pq_bag_dispatch<IdT, uint8_t, false>(s, f, begin, end, out);
    } else {
      pool_pq_bag_dispatch<IdT, uint16_t, false>(s, f, begin, end, out);
    }
    if (fe.mean && end > begin) {
      const float inv = 1.0f / static_cast<float>(end - begin);
      for (int64_t i = 0; i < t.D; ++i) out[i] *= inv;
    }
  }
}

MEC_CLONES void forward_rows(ForwardState& s, int64_t row_begin, int64_t row_end) {
  if (s.plan.int32_ids) {
    forward_rows_impl<int32_t>(s, row_begin, row_end);
  } else {
    forward_rows_impl<int64_t>(s, row_begin, row_end);
  }
}

// An uninitialised CPU tensor whose pages are marked for transparent huge pages before anything
// touches them. The pooled output is tens of MiB and fresh on every call (glibc maps allocations
// above 32 MiB anew each time), so its 4 KiB page faults would cost as much as the lookup itself:
// measured 24 ms for a 54 MiB output here, 5.5 ms with 2 MiB pages. Without THP the hint is
// ignored.
Tensor empty_in_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor tensor = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = 2 << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + tensor.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return tensor;
}

// Runs `task(i)` for i in [0, count) on torch's intra-op threads, handing indices out one at a
// time: one parallel region per call, balanced however uneven the tasks are.
template <typename F>
void run_dynamic(int64_t count, const F& task) {
  if (count <= 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < count; ++i) task(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1,
                   [&](int64_t, int64_t) {
                     for (int64_t i; (i = next.fetch_add(1)) < count;) task(i);
                   });
}

std::tuple<Tensor, Tensor> pooled_lookup_forward(
    const Tensor& values,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    at::TensorList codes,
    at::TensorList params,
    at::TensorList fallbacks,
    at::TensorList promoted_ids,
    at::IntArrayRef num_ids,
    at::IntArrayRef feature_tables,
    at::IntArrayRef feature_pooling,
    at::IntArrayRef feature_slots,
    bool save_codes,
    c10::string_view feature_names,
    c10::string_view table_names) {
  const Plan plan = make_plan(values, offsets, per_sample_weights, codes, params, fallbacks,
                              promoted_ids, num_ids, feature_tables, feature_pooling,
                              feature_slots, std::string(feature_names), std::string(table_names));
  Tensor out = empty_in_huge_pages({plan.batch, plan.total_dim}, params[0].options());
  Tensor saved =
      empty_in_huge_pages({save_codes ? plan.saved_bytes : 0}, values.options().dtype(at::kByte));
  const int64_t num_features = static_cast<int64_t>(plan.features.size());
  const int64_t num_tables = static_cast<int64_t>(plan.tables.size());
  ForwardState s{plan, out.data_ptr<float>(), save_codes ? saved.data_ptr<uint8_t>() : nullptr,
                 {num_features}, {num_tables}};
  if (save_codes) {
    // Zero the bytes no feature writes (full tables' ids, rows narrower than the stride), so
    // that the output is a function of the inputs.
    uint8_t* const bytes = saved.data_ptr<uint8_t>();
    for (const Feature& fe : plan.features) {
      const Table& t = plan.tables[fe.table];
      const int64_t used = t.compressed ? (fe.id_end - fe.id_begin) * t.M * t.code_bytes : 0;
      std::fill(bytes + fe.saved + used, bytes + fe.id_end * plan.saved_stride, uint8_t{0});
    }
  }
  const int64_t rows = num_features * plan.batch;
  run_dynamic((rows + kBagsPerChunk - 1) / kBagsPerChunk, [&](int64_t chunk) {
    forward_rows(s, chunk * kBagsPerChunk, std::min(rows, (chunk + 1) * kBagsPerChunk));
  });
  const int64_t bad_feature = s.bad_feature.load(), bad_table = s.bad_table.load();
  if (bad_feature < num_features) raise_bad_id(plan, bad_feature);
  if (bad_table < num_tables) raise_bad_code(plan, bad_table);
  return {out, saved};
}

// One id of a feature that reads a fallback row: the row, the bag (its output gradient row) and
// the id's weight in the bag (per-sample weight, times 1 / length for MEAN).
struct FallbackLookup {
  int64_t row, bag;
  float weight;
};

struct BackwardState {
  const Plan& plan;
  const float* grad_out;
  const uint8_t* saved;
  std::vector<float*> grads;
  std::vector<float*> fallback_grads;  // per table, nullptr without a fallback
  // Resolved once, before the tasks that read them, for the features of tables with a fallback:
  // per position in `values`, whether the id reads a fallback row; per feature, those ids.
  std::vector<uint8_t> in_fallback;
  std::vector<std::vector<FallbackLookup>> fallback_lookups;
  std::vector<std::vector<int64_t>> features_of_table;
  std::atomic<int64_t> bad_feature;  // first feature with an id outside its table
  std::atomic<int64_t> bad_table;    // first table whose saved codes hold a value >= K
};

// Calls add(begin, end, g, scale) for every non-empty bag of feature f, where g points at the
// bag's output gradient (plus `col`) and scale is 1 or, for MEAN, 1 / length. Rows of the output
// gradient are a whole output row apart, so the row a few bags ahead is prefetched.
template <typename F>
MEC_INLINE void for_each_bag(const BackwardState& s, int64_t f, int64_t col, const F& add) {
  const Plan& plan = s.plan;
  const Feature& fe = plan.features[f];
  const int64_t batch = plan.batch, ld = plan.total_dim;
  const int64_t* const offsets = plan.offsets + f * batch;
  const float* g = s.grad_out + fe.col + col;
  for (int64_t b = 0; b < batch; ++b, g += ld) {
    if (b + kPrefetchBags < batch) __builtin_prefetch(g + kPrefetchBags * ld, 0, 1);
    const int64_t begin = offsets[b], end = offsets[b + 1];
    if (begin == end) continue;
    add(begin, end, g, fe.mean ? 1.0f / static_cast<float>(end - begin) : 1.0f);
  }
}

// Accumulates subspace m of table t's codebook gradient over every feature that reads t.
template <typename CodeT, int SUB>
MEC_INLINE void codebook_grad(BackwardState& s, int64_t t, int64_t m) {
  const Table& table = s.plan.tables[t];
  const int64_t d = SUB > 0 ? SUB : table.d;
  const float* const weights = s.plan.weights;
  float* const grad = s.grads[t] + m * table.K * d;
  std::fill(grad, grad + table.K * d, 0.0f);
  for (int64_t f : s.features_of_table[t]) {
    const Feature& fe = s.plan.features[f];
    // This feature's codes of subspace m, indexed by position in `values` minus id_begin.
    const CodeT* const codes = reinterpret_cast<const CodeT*>(s.saved + fe.saved) +
        m * (fe.id_end - fe.id_begin) - fe.id_begin;
    const int64_t K = table.K;
    bool bad_code = false;
    // Ids that read a fallback row contribute nothing here (fallback_grad takes them).
    const uint8_t* const fallback = table.fallback ? s.in_fallback.data() : nullptr;
    const auto in_fallback = [&](int64_t j) { return fallback && fallback[j]; };
    for_each_bag(s, f, m * d, [&](int64_t begin, int64_t end, const float* g, float scale) {
      if constexpr (SUB > 0) {
        const Vec<SUB> gv = load<SUB>(g);  // one load per bag, not one per id
        for (int64_t j = begin; j < end; ++j) {
          if (in_fallback(j)) continue;
          const int64_t k = codes[j];
          if (k >= K) {
            bad_code = true;
            continue;
          }
          float* const y = grad + k * SUB;
          store<SUB>(y, load<SUB>(y) + (weights ? weights[j] * scale : scale) * gv);
        }
      } else {
        for (int64_t j = begin; j < end; ++j) {
          if (in_fallback(j)) continue;
          const int64_t k = codes[j];
          if (k >= K) {
            bad_code = true;
            continue;
          }
          axpy<0>(grad + k * d, g, weights ? weights[j] * scale : scale, d);
        }
      }
    });
    if (bad_code) record_min(s.bad_table, t);
  }
}

// Accumulates columns [16 part, 16 part + 16) of full table t's gradient.
template <typename IdT>
MEC_INLINE void full_grad(BackwardState& s, int64_t t, int64_t part) {
  const Table& table = s.plan.tables[t];
  const int64_t c0 = part * kFullColumnsPerTask, D = table.D;
  const int64_t width = std::min(kFullColumnsPerTask, D - c0);
  const IdT* const ids = static_cast<const IdT*>(s.plan.values);
  const float* const weights = s.plan.weights;
  float* const grad = s.grads[t] + c0;
  for (int64_t row = 0; row < table.rows; ++row) {
    std::fill(grad + row * D, grad + row * D + width, 0.0f);
  }
  const int64_t rows = table.rows;
  for (int64_t f : s.features_of_table[t]) {
    bool bad_id = false;
    for_each_bag(s, f, c0, [&](int64_t begin, int64_t end, const float* g, float scale) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t id = static_cast<int64_t>(ids[j]);
        if (id < 0 || id >= rows) {
          bad_id = true;
          continue;
        }
        float* const y = grad + id * D;
        const float w = weights ? weights[j] * scale : scale;
        if (width == kFullColumnsPerTask) {
          axpy<kFullColumnsPerTask>(y, g, w, width);
        } else {
          axpy<0>(y, g, w, width);
        }
      }
    });
    if (bad_id) record_min(s.bad_feature, f);
  }
}

// Accumulates columns [16 part, 16 part + 16) of compressed table t's fallback gradient, from the
// ids that read a fallback row.
MEC_INLINE void fallback_grad(BackwardState& s, int64_t t, int64_t part) {
  const Table& table = s.plan.tables[t];
  const int64_t c0 = part * kFullColumnsPerTask, D = table.D;
  const int64_t width = std::min(kFullColumnsPerTask, D - c0), ld = s.plan.total_dim;
  float* const grad = s.fallback_grads[t] + c0;
  for (int64_t row = 0; row < table.fallback_rows; ++row) {
    std::fill(grad + row * D, grad + row * D + width, 0.0f);
  }
  for (int64_t f : s.features_of_table[t]) {
    const float* const g = s.grad_out + s.plan.features[f].col + c0;
    for (const FallbackLookup& lookup : s.fallback_lookups[f]) {
      float* const y = grad + lookup.row * D;
      if (width == kFullColumnsPerTask) {
        axpy<kFullColumnsPerTask>(y, g + lookup.bag * ld, lookup.weight, width);
      } else {
        axpy<0>(y, g + lookup.bag * ld, lookup.weight, width);
      }
    }
  }
}

template <typename CodeT>
MEC_INLINE void codebook_grad_dispatch(BackwardState& s, int64_t t, int64_t m) {
  switch (s.plan.tables[t].d) {
    case 4: return codebook_grad<CodeT, 4>(s, t, m);
    case 8: return codebook_grad<CodeT, 8>(s, t, m);
    case 16: return codebook_grad<CodeT, 16>(s, t, m);
    case 32: return codebook_grad<CodeT, 32>(s, t, m);
    default: return codebook_grad<CodeT, 0>(s, t, m);
  }
}

MEC_CLONES void backward_task(BackwardState& s, int64_t t, int64_t part, bool fallback) {
  const Table& table = s.plan.tables[t];
  if (fallback) {
    fallback_grad(s, t, part);
  } else if (!table.compressed) {
    if (s.plan.int32_ids) {
      full_grad<int32_t>(s, t, part);
    } else {
      full_grad<int64_t>(s, t, part);
    }
  } else if (table.code_bytes == 1) {
    codebook_grad_dispatch<uint8_t>(s, t, part);
  } else {
    codebook_grad_dispatch<uint16_t>(s, t, part);
  }
}

std::vector<Tensor> pooled_lookup_backward(
    const Tensor& grad_output,
    const Tensor& values,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& saved_codes,
    at::TensorList codes,
    at::TensorList params,
    at::TensorList fallbacks,
    at::TensorList promoted_ids,
    at::IntArrayRef num_ids,
    at::IntArrayRef feature_tables,
    at::IntArrayRef feature_pooling,
    at::IntArrayRef feature_slots,
    c10::string_view feature_names,
    c10::string_view table_names) {
  const Plan plan = make_plan(values, offsets, per_sample_weights, codes, params, fallbacks,
                              promoted_ids, num_ids, feature_tables, feature_pooling,
                              feature_slots, std::string(feature_names), std::string(table_names));
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat && grad_output.is_contiguous() &&
                  grad_output.device().is_cpu() && grad_output.dim() == 2 &&
                  grad_output.size(0) == plan.batch && grad_output.size(1) == plan.total_dim,
              "grad_output must be contiguous float32 CPU [batch, total_dim]");
  TORCH_CHECK(saved_codes.scalar_type() == at::kByte && saved_codes.is_contiguous() &&
                  saved_codes.device().is_cpu() && saved_codes.numel() == plan.saved_bytes,
              "saved_codes do not match the inputs (the forward's, with save_codes=True)");
  std::vector<Tensor> grads, fallback_grads;
  const int64_t num_features = static_cast<int64_t>(plan.features.size());
  const int64_t num_tables = static_cast<int64_t>(plan.tables.size());
  BackwardState s{plan, grad_output.data_ptr<float>(), saved_codes.data_ptr<uint8_t>(),
                  {}, {}, {}, {}, {}, {num_features}, {num_tables}};
  for (const Table& table : plan.tables) {
    if (table.fallback) s.in_fallback.assign(plan.num_values, 0);
  }
  s.features_of_table.resize(plan.tables.size());
  for (size_t f = 0; f < plan.features.size(); ++f) {
    s.features_of_table[plan.features[f].table].push_back(static_cast<int64_t>(f));
  }
  s.fallback_lookups.resize(num_features);
  run_dynamic(num_features, [&](int64_t f) {
    const Feature& fe = plan.features[f];
    const Table& table = plan.tables[fe.table];
    if (!table.fallback) return;
    for (int64_t b = 0; b < plan.batch; ++b) {
      const int64_t begin = plan.offsets[f * plan.batch + b];
      const int64_t end = plan.offsets[f * plan.batch + b + 1];
      const float scale = fe.mean ? 1.0f / static_cast<float>(end - begin) : 1.0f;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t id = id_at(plan, j);
        if (id < 0 || id >= table.num_ids) {
          record_min(s.bad_feature, f);
          continue;
        }
        const int64_t row = resolve_row(table, id);
        if (row >= 0) continue;
        s.in_fallback[j] = 1;
        s.fallback_lookups[f].push_back(
            {-1 - row, b, plan.weights ? plan.weights[j] * scale : scale});
      }
    }
  });
  struct Task {
    int64_t table, part, cost;
    bool fallback;
  };
  std::vector<Task> tasks;
  for (size_t t = 0; t < plan.tables.size(); ++t) {
    const Table& table = plan.tables[t];
    // Each task zeroes the part it owns (a subspace, a band of columns) before adding to it.
    grads.push_back(at::empty_like(params[t]));
    s.grads.push_back(grads.back().data_ptr<float>());
    int64_t ids = 0;
    for (int64_t f : s.features_of_table[t]) ids += plan.features[f].id_end - plan.features[f].id_begin;
    const int64_t parts = table.compressed
        ? table.M
        : (table.D + kFullColumnsPerTask - 1) / kFullColumnsPerTask;
    for (int64_t p = 0; p < parts; ++p) {
      tasks.push_back({static_cast<int64_t>(t), p, ids * (table.compressed ? table.d : 16), false});
    }
    // A fallback table's gradient: column bands, like a full table's.
    fallback_grads.push_back(at::empty_like(fallbacks[t]));
    s.fallback_grads.push_back(table.fallback ? fallback_grads.back().data_ptr<float>() : nullptr);
    if (table.fallback) {
      for (int64_t p = 0; p * kFullColumnsPerTask < table.D; ++p) {
        tasks.push_back({static_cast<int64_t>(t), p, ids * 16, true});
      }
    }
  }
  // Longest first, so the last tasks to be handed out are short.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  run_dynamic(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    backward_task(s, tasks[i].table, tasks[i].part, tasks[i].fallback);
  });
  if (s.bad_feature.load() < num_features) raise_bad_id(plan, s.bad_feature.load());
  TORCH_CHECK_VALUE(s.bad_table.load() >= num_tables, plan.table_names(s.bad_table.load()),
                    ": saved_codes hold a value >= its codebook_size ",
                    s.bad_table.load() < num_tables ? plan.tables[s.bad_table.load()].K : 0);
  grads.insert(grads.end(), fallback_grads.begin(), fallback_grads.end());
  return grads;  // the params' gradients, then the fallback tables'
}

}  // namespace

TORCH_LIBRARY(torchrec_mec, m) {
  m.def(
      "pooled_lookup_forward(Tensor values, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor[] codes, Tensor[] params, Tensor[] fallbacks, Tensor[] promoted_ids, int[] num_ids, "
      "int[] feature_tables, int[] feature_pooling, int[] feature_slots, bool save_codes, "
      "str feature_names, str table_names) -> (Tensor, Tensor)");
  m.def(
      "pooled_lookup_backward(Tensor grad_output, Tensor values, Tensor offsets, "
      "Tensor? per_sample_weights, Tensor saved_codes, Tensor[] codes, Tensor[] params, "
      "Tensor[] fallbacks, Tensor[] promoted_ids, int[] num_ids, int[] feature_tables, "
      "int[] feature_pooling, int[] feature_slots, str feature_names, str table_names) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(torchrec_mec, CPU, m) {
  m.impl("pooled_lookup_forward", &pooled_lookup_forward);
  m.impl("pooled_lookup_backward", &pooled_lookup_backward);
}

}  // namespace torchrec_mec

// `import torchrec_mec._C` loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
