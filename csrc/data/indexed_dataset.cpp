// Streaming writer for Megatron's MMIDIDX v1 indexed datasets (.bin + .idx).
//
// The .bin is the tokens of every sequence, concatenated, no header. The .idx is
//   magic "MMIDIDX\0\0" | u64 version=1 | u8 dtype code | u64 N sequences | u64 D doc-index len
//   | int32[N] lengths | int64[N] byte offsets | int64[D] document boundaries
// little-endian, unpadded: byte-identical to megatron-core's IndexedDatasetBuilder.
//
// Tokens stream to disk as they arrive; only the per-sequence lengths stay in memory
// (4 bytes per sequence), so memory does not grow with the token count.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kHeaderSize = 9 + 8 + 1 + 8 + 8;

size_t itemsize_of(int code) {
  switch (code) {
    case 1: case 2: return 1;     // uint8, int8
    case 3: case 8: return 2;     // int16, uint16
    case 4: case 7: return 4;     // int32, float32
    case 5: case 6: return 8;     // int64, float64
    default: throw std::invalid_argument("unknown MMIDIDX dtype code " + std::to_string(code));
  }
}

bool is_integer_code(int code) { return code != 6 && code != 7; }

const char* name_of(int code) {
  static const char* names[] = {"?", "uint8", "int8", "int16", "int32",
                                "int64", "float64", "float32", "uint16"};
  return (code >= 1 && code <= 8) ? names[code] : "?";
}

void range_of(int code, int64_t* lo, int64_t* hi) {
  switch (code) {
    case 1: *lo = 0; *hi = 255; break;
    case 2: *lo = -128; *hi = 127; break;
    case 3: *lo = -32768; *hi = 32767; break;
    case 8: *lo = 0; *hi = 65535; break;
    case 4: *lo = std::numeric_limits<int32_t>::min(); *hi = std::numeric_limits<int32_t>::max(); break;
    default: *lo = std::numeric_limits<int64_t>::min(); *hi = std::numeric_limits<int64_t>::max();
  }
}

// Store one integer token as `code` at dst (little-endian host assumed, as Megatron does).
inline void store_token(char* dst, int code, int64_t v) {
  switch (code) {
    case 1: { uint8_t x = static_cast<uint8_t>(v); std::memcpy(dst, &x, 1); break; }
    case 2: { int8_t x = static_cast<int8_t>(v); std::memcpy(dst, &x, 1); break; }
    case 3: { int16_t x = static_cast<int16_t>(v); std::memcpy(dst, &x, 2); break; }
    case 8: { uint16_t x = static_cast<uint16_t>(v); std::memcpy(dst, &x, 2); break; }
    case 4: { int32_t x = static_cast<int32_t>(v); std::memcpy(dst, &x, 4); break; }
    default: std::memcpy(dst, &v, 8);
  }
}

[[noreturn]] void io_error(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " '" + path + "': " + std::strerror(errno));
}

// Convert a Python sequence of documents (each a sequence of ints) into `code` bytes.
// Appends `eod` to every document when eod >= 0. Lengths go to `lengths`.
void pack_into(py::handle docs, int code, int64_t eod, std::string* out,
               std::vector<int32_t>* lengths) {
  if (!is_integer_code(code)) throw std::invalid_argument("tokens need an integer dtype");
  const size_t isz = itemsize_of(code);
  int64_t lo, hi;
  range_of(code, &lo, &hi);
  if (eod >= 0 && (eod < lo || eod > hi))
    throw py::value_error("eod id " + std::to_string(eod) + " does not fit dtype " + name_of(code));
  py::sequence seq = py::reinterpret_borrow<py::sequence>(docs);
  const Py_ssize_t n = PySequence_Size(seq.ptr());
  if (n < 0) throw py::error_already_set();
  for (Py_ssize_t d = 0; d < n; ++d) {
    py::object doc = py::reinterpret_steal<py::object>(PySequence_GetItem(seq.ptr(), d));
    if (!doc) throw py::error_already_set();
    py::object fast = py::reinterpret_steal<py::object>(
        PySequence_Fast(doc.ptr(), "each document must be a sequence of token ids"));
    if (!fast) throw py::error_already_set();
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(fast.ptr());
    PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
    const int64_t total = static_cast<int64_t>(len) + (eod >= 0 ? 1 : 0);
    if (total > std::numeric_limits<int32_t>::max())
      throw py::value_error("document " + std::to_string(d) + " has more than 2^31-1 tokens");
    const size_t start = out->size();
    out->resize(start + static_cast<size_t>(total) * isz);
    char* dst = &(*out)[start];
    for (Py_ssize_t i = 0; i < len; ++i) {
      const long long v = PyLong_AsLongLong(items[i]);
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (v < lo || v > hi)
        throw py::value_error("token id " + std::to_string(v) + " in document " +
                              std::to_string(d) + " does not fit dtype " + name_of(code));
      store_token(dst + static_cast<size_t>(i) * isz, code, v);
    }
    if (eod >= 0) store_token(dst + static_cast<size_t>(len) * isz, code, eod);
    lengths->push_back(static_cast<int32_t>(total));
  }
}

struct IdxHeader {
  int code;
  uint64_t num_sequences;
  uint64_t num_doc_indices;
};

IdxHeader read_header(FILE* f, const std::string& path) {
  char buf[kHeaderSize];
  if (std::fread(buf, 1, kHeaderSize, f) != kHeaderSize)
    throw std::runtime_error("'" + path + "' is too short to be an MMIDIDX index");
  if (std::memcmp(buf, kMagic, 9) != 0)
    throw std::runtime_error("'" + path + "' is not an MMIDIDX index (bad magic)");
  uint64_t version;
  std::memcpy(&version, buf + 9, 8);
  if (version != 1)
    throw std::runtime_error("'" + path + "': unsupported MMIDIDX version " +
                             std::to_string(version));
  IdxHeader h;
  h.code = static_cast<uint8_t>(buf[17]);
  itemsize_of(h.code);
  std::memcpy(&h.num_sequences, buf + 18, 8);
  std::memcpy(&h.num_doc_indices, buf + 26, 8);
  return h;
}

class IndexedDatasetWriter {
 public:
  IndexedDatasetWriter(const std::string& bin_path, int code)
      : bin_path_(bin_path), code_(code), itemsize_(itemsize_of(code)) {
    bin_ = std::fopen(bin_path.c_str(), "wb");
    if (!bin_) io_error("cannot open for writing", bin_path);
    buffer_.resize(8 << 20);
    std::setvbuf(bin_, buffer_.data(), _IOFBF, buffer_.size());
    doc_indices_.push_back(0);
  }

  ~IndexedDatasetWriter() {
    if (bin_) std::fclose(bin_);
  }

  // Documents as Python lists of ids; each document becomes one sequence.
  void add_documents(py::handle docs, int64_t eod) {
    std::string bytes;
    std::vector<int32_t> lengths;
    pack_into(docs, code_, eod, &bytes, &lengths);
    write_packed(bytes.data(), bytes.size(), lengths.data(), lengths.size());
  }

  // Tokens already packed in this writer's dtype; lengths[i] tokens make document i.
  void add_packed(py::buffer tokens, py::array_t<int32_t, py::array::c_style | py::array::forcecast> lengths) {
    py::buffer_info info = tokens.request();
    const size_t nbytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    write_packed(static_cast<const char*>(info.ptr), nbytes, lengths.data(),
                 static_cast<size_t>(lengths.size()));
  }

  // One document made of several sequences (megatron-core's add_document(tokens, lengths)).
  void add_document(py::array tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths) {
    check_array_dtype(tokens);
    py::array flat = py::array::ensure(tokens, py::array::c_style);
    int64_t sum = 0;
    for (py::ssize_t i = 0; i < lengths.size(); ++i) {
      const int64_t l = lengths.data()[i];
      if (l < 0 || l > std::numeric_limits<int32_t>::max())
        throw py::value_error("sequence length " + std::to_string(l) + " out of range");
      sum += l;
    }
    if (sum != static_cast<int64_t>(flat.size()))
      throw py::value_error("sequence lengths sum to " + std::to_string(sum) + " but the document has " +
                            std::to_string(flat.size()) + " tokens");
    write_bytes(static_cast<const char*>(flat.data()), static_cast<size_t>(flat.nbytes()));
    for (py::ssize_t i = 0; i < lengths.size(); ++i)
      seq_lengths_.push_back(static_cast<int32_t>(lengths.data()[i]));
    num_tokens_ += sum;
    doc_indices_.push_back(static_cast<int64_t>(seq_lengths_.size()));
  }

  // Append a finished dataset (PREFIX.idx / PREFIX.bin) of the same dtype, keeping its documents.
  void append_dataset(const std::string& idx_path, const std::string& bin_path) {
    FILE* idx = std::fopen(idx_path.c_str(), "rb");
    if (!idx) io_error("cannot open", idx_path);
    std::vector<int32_t> lengths;
    std::vector<int64_t> docs;
    try {
      IdxHeader h = read_header(idx, idx_path);
      if (h.code != code_) {
        throw std::runtime_error("'" + idx_path + "' has dtype " + name_of(h.code) +
                                 " but the output has dtype " + name_of(code_) +
                                 "; merge only datasets made with the same vocabulary size");
      }
      lengths.resize(h.num_sequences);
      docs.resize(h.num_doc_indices);
      const bool ok =
          std::fread(lengths.data(), 4, h.num_sequences, idx) == h.num_sequences &&
          std::fseek(idx, static_cast<long>(8 * h.num_sequences), SEEK_CUR) == 0 &&
          std::fread(docs.data(), 8, h.num_doc_indices, idx) == h.num_doc_indices;
      if (!ok) throw std::runtime_error("'" + idx_path + "' is truncated");
    } catch (...) {
      std::fclose(idx);
      throw;
    }
    std::fclose(idx);
    if (docs.empty() || docs.front() != 0 ||
        docs.back() != static_cast<int64_t>(lengths.size()))
      throw std::runtime_error("'" + idx_path + "' has inconsistent document boundaries");
    int64_t tokens = 0;
    for (int32_t l : lengths) tokens += l;
    copy_bin(bin_path, static_cast<uint64_t>(tokens) * itemsize_);
    const int64_t base = static_cast<int64_t>(seq_lengths_.size());
    seq_lengths_.insert(seq_lengths_.end(), lengths.begin(), lengths.end());
    for (size_t i = 1; i < docs.size(); ++i) doc_indices_.push_back(base + docs[i]);
    num_tokens_ += tokens;
  }

  // Close the .bin and write the .idx. The writer cannot be used afterwards.
  void finalize(const std::string& idx_path) {
    close_bin();
    FILE* idx = std::fopen(idx_path.c_str(), "wb");
    if (!idx) io_error("cannot open for writing", idx_path);
    const uint64_t version = 1, n = seq_lengths_.size(), d = doc_indices_.size();
    const uint8_t code = static_cast<uint8_t>(code_);
    std::vector<int64_t> pointers(n);
    int64_t offset = 0;
    for (uint64_t i = 0; i < n; ++i) {
      pointers[i] = offset;
      offset += static_cast<int64_t>(seq_lengths_[i]) * static_cast<int64_t>(itemsize_);
    }
    bool ok = std::fwrite(kMagic, 1, 9, idx) == 9 && std::fwrite(&version, 8, 1, idx) == 1 &&
              std::fwrite(&code, 1, 1, idx) == 1 && std::fwrite(&n, 8, 1, idx) == 1 &&
              std::fwrite(&d, 8, 1, idx) == 1 &&
              std::fwrite(seq_lengths_.data(), 4, n, idx) == n &&
              std::fwrite(pointers.data(), 8, n, idx) == n &&
              std::fwrite(doc_indices_.data(), 8, d, idx) == d;
    ok = (std::fclose(idx) == 0) && ok;
    if (!ok) io_error("write failed", idx_path);
  }

  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_sequences() const { return static_cast<int64_t>(seq_lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(doc_indices_.size()) - 1; }
  int dtype_code() const { return code_; }

  void close_bin() {
    if (!bin_) return;
    const int rc = std::fclose(bin_);
    bin_ = nullptr;
    if (rc != 0) io_error("write failed", bin_path_);
  }

 private:
  void check_array_dtype(const py::array& a) const {
    const char kind = a.dtype().kind();
    const bool ok = static_cast<size_t>(a.itemsize()) == itemsize_ &&
                    ((is_integer_code(code_) && (kind == 'i' || kind == 'u')) ||
                     (!is_integer_code(code_) && kind == 'f'));
    if (!ok)
      throw py::value_error(std::string("array dtype does not match the dataset dtype ") +
                            name_of(code_) + "; cast it first");
  }

  void write_bytes(const char* data, size_t nbytes) {
    if (!bin_) throw std::runtime_error("writer for '" + bin_path_ + "' is already finalized");
    size_t written;
    {
      py::gil_scoped_release release;
      written = std::fwrite(data, 1, nbytes, bin_);
    }
    if (written != nbytes) io_error("write failed", bin_path_);
  }

  void write_packed(const char* data, size_t nbytes, const int32_t* lengths, size_t n) {
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      if (lengths[i] < 0) throw py::value_error("negative document length");
      total += lengths[i];
    }
    if (static_cast<size_t>(total) * itemsize_ != nbytes)
      throw py::value_error("lengths sum to " + std::to_string(total) + " tokens but " +
                            std::to_string(nbytes) + " bytes were given at itemsize " +
                            std::to_string(itemsize_));
    write_bytes(data, nbytes);
    for (size_t i = 0; i < n; ++i) {
      seq_lengths_.push_back(lengths[i]);
      doc_indices_.push_back(static_cast<int64_t>(seq_lengths_.size()));
    }
    num_tokens_ += total;
  }

  void copy_bin(const std::string& path, uint64_t expected) {
    if (!bin_) throw std::runtime_error("writer for '" + bin_path_ + "' is already finalized");
    FILE* src = std::fopen(path.c_str(), "rb");
    if (!src) io_error("cannot open", path);
    std::vector<char> chunk(4 << 20);
    uint64_t copied = 0;
    bool ok = true;
    {
      py::gil_scoped_release release;
      size_t got;
      while ((got = std::fread(chunk.data(), 1, chunk.size(), src)) > 0) {
        if (std::fwrite(chunk.data(), 1, got, bin_) != got) { ok = false; break; }
        copied += got;
      }
    }
    std::fclose(src);
    if (!ok) io_error("write failed", bin_path_);
    if (copied != expected)
      throw std::runtime_error("'" + path + "' has " + std::to_string(copied) +
                               " bytes but its index describes " + std::to_string(expected) +
                               "; the dataset is truncated or corrupt");
  }

  std::string bin_path_;
  int code_;
  size_t itemsize_;
  FILE* bin_ = nullptr;
  std::vector<char> buffer_;
  std::vector<int32_t> seq_lengths_;
  std::vector<int64_t> doc_indices_;
  int64_t num_tokens_ = 0;
};

py::tuple pack_documents(py::handle docs, int code, int64_t eod) {
  std::string bytes;
  std::vector<int32_t> lengths;
  pack_into(docs, code, eod, &bytes, &lengths);
  py::array_t<int32_t> out(static_cast<py::ssize_t>(lengths.size()));
  if (!lengths.empty()) std::memcpy(out.mutable_data(), lengths.data(), lengths.size() * 4);
  return py::make_tuple(py::bytes(bytes.data(), bytes.size()), out);
}

}  // namespace

PYBIND11_MODULE(_data_cpp, m) {
  m.doc() = "C++ writer for Megatron MMIDIDX indexed datasets";
  m.def("pack_documents", &pack_documents, py::arg("docs"), py::arg("dtype_code"),
        py::arg("eod") = -1,
        "Pack documents (sequences of ints) into (bytes, int32 lengths) in the given dtype; "
        "appends eod to each document when eod >= 0.");
  py::class_<IndexedDatasetWriter>(m, "IndexedDatasetWriter")
      .def(py::init<const std::string&, int>(), py::arg("bin_path"), py::arg("dtype_code"))
      .def("add_documents", &IndexedDatasetWriter::add_documents, py::arg("docs"),
           py::arg("eod") = -1)
      .def("add_packed", &IndexedDatasetWriter::add_packed, py::arg("tokens"), py::arg("lengths"))
      .def("add_document", &IndexedDatasetWriter::add_document, py::arg("tokens"),
           py::arg("lengths"))
      .def("append_dataset", &IndexedDatasetWriter::append_dataset, py::arg("idx_path"),
           py::arg("bin_path"))
      .def("finalize", &IndexedDatasetWriter::finalize, py::arg("idx_path"))
      .def("close", &IndexedDatasetWriter::close_bin)
      .def_property_readonly("num_tokens", &IndexedDatasetWriter::num_tokens)
      .def_property_readonly("num_sequences", &IndexedDatasetWriter::num_sequences)
      .def_property_readonly("num_documents", &IndexedDatasetWriter::num_documents)
      .def_property_readonly("dtype_code", &IndexedDatasetWriter::dtype_code);
}
