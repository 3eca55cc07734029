// Index helpers for GPT-style datasets: sample index, blending index, block shuffles.
//
// Everything that counts tokens or samples is int64: corpora of hundreds of billions of
// tokens (past 2^31) must work. Each function has a pure-NumPy reference in
// megatron_ext/data/index_helpers.py that gives identical output; the tests compare them.
// The GIL is released while the loops run.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Small inputs may be converted; big ones (sizes, doc_index) must come in the exact dtype, so
// they are never copied behind the caller's back (see the noconvert() bindings).
template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;
template <typename T>
using exact_array = py::array_t<T, py::array::c_style>;

// ---------------------------------------------------------------------------------------------
// Sample index
// ---------------------------------------------------------------------------------------------
//
// The documents listed in `doc_index` (ids into `sizes`) are concatenated into one token
// stream. Sample k is stream[k*L, k*L + L] (L + 1 tokens; consecutive samples share one
// token, so tokens/labels shifted by one cover every position once). Row k of the result is
// (position j in doc_index, offset within that document) of stream position k*L; rows run
// k = 0..num_samples, so sample k reads from row k to row k+1, both ends included.
template <typename SizeT, typename DocT>
py::array_t<int64_t> build_sample_index(const exact_array<SizeT>& sizes_arr,
                                        const exact_array<DocT>& doc_index_arr, int64_t seq_length,
                                        int64_t num_samples) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be at least 1");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be non-negative");
  const SizeT* sizes = sizes_arr.data();
  const DocT* doc_index = doc_index_arr.data();
  const int64_t num_docs = sizes_arr.size();
  const int64_t num_positions = doc_index_arr.size();

  if (num_docs == 0 && num_positions > 0) throw std::out_of_range("doc_index given but no sizes");
  py::array_t<int64_t> result({num_samples + 1, int64_t{2}});
  int64_t* out = result.mutable_data();
  int64_t bad_doc = -1, row = 0;
  {
    py::gil_scoped_release release;
    // sizes[] is read in shuffled order: gather a chunk of lengths first (independent loads,
    // so many cache misses are in flight at once), then walk the chunk sequentially.
    constexpr int64_t kChunk = 1 << 14;
    std::vector<int64_t> lengths(static_cast<size_t>(std::min(kChunk, num_positions)));
    int64_t doc_start = 0;  // stream position of the current document's first token
    int64_t next = 0;       // stream position of the next row to emit
    for (int64_t lo = 0; lo < num_positions && row <= num_samples && bad_doc < 0; lo += kChunk) {
      const int64_t hi = std::min(lo + kChunk, num_positions);
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t doc = static_cast<int64_t>(doc_index[j]);
        const bool ok = doc >= 0 && doc < num_docs;
        lengths[j - lo] = ok ? static_cast<int64_t>(sizes[ok ? doc : 0]) : -1;
      }
      for (int64_t j = lo; j < hi && row <= num_samples; ++j) {
        const int64_t length = lengths[j - lo];
        if (length < 0) {
          bad_doc = j;
          break;
        }
        const int64_t doc_end = doc_start + length;
        while (next < doc_end && row <= num_samples) {
          out[2 * row] = j;
          out[2 * row + 1] = next - doc_start;
          ++row;
          next += seq_length;
        }
        doc_start = doc_end;
      }
    }
  }
  if (bad_doc >= 0) {
    throw std::out_of_range("doc_index[" + std::to_string(bad_doc) +
                            "] is not a document id in 0.." + std::to_string(num_docs - 1) +
                            ", or that document's size is negative");
  }
  if (row <= num_samples) {
    throw std::invalid_argument("the documents hold too few tokens for " +
                                std::to_string(num_samples) + " samples of " +
                                std::to_string(seq_length) + " + 1 tokens");
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Blending index (Tijdeman's chairman-assignment algorithm)
// ---------------------------------------------------------------------------------------------
//
// Global sample t (1-based) goes to the source with the earliest deadline (c + 1 - s) / w
// among those whose release time (c + s) / w has come (release <= t), where c is the count
// so far and s = 1 / (2D - 2) for D sources of positive weight. Tijdeman ("The chairman
// assignment problem", Discrete Mathematics 32, 1980) proves
// |c_i(t) - w_i t| <= 1 - s < 1 for every source and every prefix t. Precisely, the winner
// minimises (not yet released, deadline, source index) lexicographically; at least one source
// is always released, so the first part only orders an unreachable case.
//
// Speed: the deadline (>= 0) is compared through its IEEE bits, with the "not released" flag
// in the top bit, so one unsigned compare orders both; sources are scanned heaviest first
// (the usual winner: fewer mispredicted branches), which the index tie-break keeps exact.
// The reference evaluates the same float64 expressions, so both choose identically.
inline uint64_t double_bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// The hot loop over `scan` sources (ids[j], 1 / normalised weight inv[j]), scanned heaviest
// first. It is instantiated for every source count up to kMaxFixed (D > 0: the count is a
// compile-time constant, the scan is unrolled: 1.3-3.6x faster than a runtime-length loop,
// measured with GCC 12) and once with a runtime count (D == 0) for bigger blends.
constexpr int kMaxFixed = 32;
constexpr uint64_t kPending = uint64_t{1} << 63;

template <int D>
void blending_loop(const int64_t* ids, const double* inverse, int scan_runtime, double s,
                   int64_t num_samples, int16_t* source, int64_t* sample, int64_t* count) {
  const int scan = D > 0 ? D : scan_runtime;
  const double one_minus_s = 1.0 - s;
  std::vector<double> inv(inverse, inverse + scan), rel(scan);
  std::vector<uint64_t> key(scan);  // deadline bits
  for (int j = 0; j < scan; ++j) {
    rel[j] = s * inv[j];
    key[j] = double_bits(one_minus_s * inv[j]);
    count[j] = 0;
  }
  for (int64_t n = 0; n < num_samples; ++n) {
    const double t = static_cast<double>(n + 1);
    int bj = 0;
    uint64_t best_key = ~uint64_t{0};
    for (int j = 0; j < scan; ++j) {
      const uint64_t k = key[j] | (rel[j] > t ? kPending : 0);
      if (k < best_key || (k == best_key && ids[j] < ids[bj])) {
        best_key = k;
        bj = j;
      }
    }
    source[n] = static_cast<int16_t>(ids[bj]);
    sample[n] = count[bj];
    const double c = static_cast<double>(++count[bj]);
    rel[bj] = (c + s) * inv[bj];
    key[bj] = double_bits((c + one_minus_s) * inv[bj]);
  }
}

using BlendingLoop = void (*)(const int64_t*, const double*, int, double, int64_t, int16_t*,
                              int64_t*, int64_t*);

template <int... Ds>
constexpr std::array<BlendingLoop, sizeof...(Ds)> blending_loops(
    std::integer_sequence<int, Ds...>) {
  return {&blending_loop<Ds>...};
}

constexpr auto kBlendingLoops = blending_loops(std::make_integer_sequence<int, kMaxFixed + 1>());

void build_blending(const double* w, int64_t num_sources, int64_t positive, double total,
                    int64_t num_samples, int16_t* source, int64_t* sample, int64_t* counts) {
  const double s = 1.0 / static_cast<double>(2 * (positive > 1 ? positive : 2) - 2);
  // Positive-weight sources only (a zero weight never wins), heaviest first.
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < num_sources; ++i) {
    if (w[i] > 0.0) ids.push_back(i);
  }
  std::stable_sort(ids.begin(), ids.end(), [w](int64_t a, int64_t b) { return w[a] > w[b]; });
  const int scan = static_cast<int>(ids.size());
  std::vector<double> inv(scan);
  for (int j = 0; j < scan; ++j) inv[j] = 1.0 / (w[ids[j]] / total);
  std::vector<int64_t> count(scan);
  kBlendingLoops[scan <= kMaxFixed ? scan : 0](ids.data(), inv.data(), scan, s, num_samples,
                                               source, sample, count.data());
  for (int64_t i = 0; i < num_sources; ++i) counts[i] = 0;
  for (int j = 0; j < scan; ++j) counts[ids[j]] = count[j];
}

py::tuple build_blending_index(const carray<double>& weights_arr, int64_t num_samples) {
  const int64_t num_sources = weights_arr.size();
  if (num_sources < 1 || num_sources > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("the number of sources must be in 1..32767");
  }
  if (num_samples < 0) throw std::invalid_argument("num_samples must be non-negative");
  const double* w = weights_arr.data();
  int64_t positive = 0;
  double total = 0.0;
  for (int64_t i = 0; i < num_sources; ++i) {
    if (!(w[i] >= 0.0) || w[i] > std::numeric_limits<double>::max()) {
      throw std::invalid_argument("weights must be finite and non-negative");
    }
    positive += w[i] > 0.0;
    total += w[i];
  }
  if (positive == 0) throw std::invalid_argument("at least one weight must be positive");
  if (!(total <= std::numeric_limits<double>::max())) {
    throw std::invalid_argument("weights overflow");
  }
  py::array_t<int16_t> source_arr(num_samples);
  py::array_t<int64_t> sample_arr(num_samples);
  py::array_t<int64_t> counts_arr(num_sources);
  {
    py::gil_scoped_release release;
    build_blending(w, num_sources, positive, total, num_samples, source_arr.mutable_data(),
                   sample_arr.mutable_data(), counts_arr.mutable_data());
  }
  return py::make_tuple(source_arr, sample_arr, counts_arr);
}

// ---------------------------------------------------------------------------------------------
// Block shuffle (Fisher-Yates with a counter-based generator)
// ---------------------------------------------------------------------------------------------
//
// Block b = values[bounds[b]:bounds[b+1]] is shuffled on its own: for i = n-1 .. 1, swap
// element i with element r(b, i) mod (i + 1), where r(b, i) = mix(mix(seed ^ (b * K)) + i * G)
// and mix is SplitMix64's finaliser. The draws do not depend on each other, so they can be
// computed ahead (here: to prefetch the element to swap; in NumPy: vectorised).
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kBlockMul = 0xD1B54A32D192ED03ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t block_key(uint64_t seed, uint64_t block) {
  return mix64(seed ^ (block * kBlockMul));
}

template <typename T>
void shuffle_blocks(exact_array<T>& values_arr,
                    const carray<int64_t>& bounds_arr, uint64_t seed) {
  if (!values_arr.writeable()) throw std::invalid_argument("values must be writeable");
  T* values = values_arr.mutable_data();
  const int64_t size = values_arr.size();
  const int64_t* bounds = bounds_arr.data();
  const int64_t num_blocks = bounds_arr.size() - 1;
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (bounds[b] < 0 || bounds[b] > bounds[b + 1] || bounds[b + 1] > size) {
      throw std::invalid_argument("bounds must be ascending within 0.." + std::to_string(size));
    }
  }
  py::gil_scoped_release release;
  constexpr int64_t kAhead = 16;
  for (int64_t b = 0; b < num_blocks; ++b) {
    T* block = values + bounds[b];
    const int64_t n = bounds[b + 1] - bounds[b];
    const uint64_t key = block_key(seed, static_cast<uint64_t>(b));
    auto draw = [key](int64_t i) {
      return static_cast<int64_t>(mix64(key + static_cast<uint64_t>(i) * kGolden) %
                                  static_cast<uint64_t>(i + 1));
    };
    for (int64_t i = n - 1; i > 0; --i) {
      if (i > kAhead) __builtin_prefetch(block + draw(i - kAhead), 1);
      const int64_t j = draw(i);
      const T tmp = block[i];
      block[i] = block[j];
      block[j] = tmp;
    }
  }
}

}  // namespace

PYBIND11_MODULE(_index_cpp, m) {
  m.doc() = "Index helpers for GPT datasets (sample index, blending index, block shuffle).";
  m.def("build_sample_index", &build_sample_index<int32_t, int32_t>, py::arg("sizes").noconvert(),
        py::arg("doc_index").noconvert(), py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_sample_index", &build_sample_index<int32_t, int64_t>, py::arg("sizes").noconvert(),
        py::arg("doc_index").noconvert(), py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_sample_index", &build_sample_index<int64_t, int32_t>, py::arg("sizes").noconvert(),
        py::arg("doc_index").noconvert(), py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_sample_index", &build_sample_index<int64_t, int64_t>, py::arg("sizes").noconvert(),
        py::arg("doc_index").noconvert(), py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_blending_index", &build_blending_index, py::arg("weights"), py::arg("num_samples"));
  m.def("shuffle_blocks", &shuffle_blocks<int32_t>, py::arg("values").noconvert(),
        py::arg("bounds"), py::arg("seed"));
  m.def("shuffle_blocks", &shuffle_blocks<int64_t>, py::arg("values").noconvert(),
        py::arg("bounds"), py::arg("seed"));
}
