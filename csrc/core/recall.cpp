#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "knnmem/knnmem.hpp"

namespace knnmem {

Metric parse_metric(const std::string& name) {
  if (name == "ip") return Metric::kInnerProduct;
  if (name == "cosine") return Metric::kCosine;
  if (name == "l2") return Metric::kL2;
  throw InvalidArgument("metric: expected one of 'ip', 'cosine', 'l2', got '" + name + "'");
}

const char* metric_name(Metric metric) {
  switch (metric) {
    case Metric::kInnerProduct:
      return "ip";
    case Metric::kCosine:
      return "cosine";
    case Metric::kL2:
      return "l2";
  }
  return "?";
}

KeyFormat parse_key_format(const std::string& name) {
  if (name == "float32") return KeyFormat::kFloat32;
  if (name == "bfloat16") return KeyFormat::kBFloat16;
  if (name == "float16") return KeyFormat::kFloat16;
  if (name == "int8") return KeyFormat::kInt8;
  throw InvalidArgument("dtype: expected one of 'float32', 'bfloat16', 'float16', 'int8', got '" +
                        name + "'");
}

KeyFormat parse_score_format(const std::string& name) {
  if (name == "float32") return KeyFormat::kFloat32;
  if (name == "bfloat16") return KeyFormat::kBFloat16;
  if (name == "int8") return KeyFormat::kInt8;
  throw InvalidArgument("precision: expected one of 'float32', 'bfloat16', 'int8', got '" + name +
                        "'");
}

const char* key_format_name(KeyFormat format) {
  switch (format) {
    case KeyFormat::kBFloat16:
      return "bfloat16";
    case KeyFormat::kFloat16:
      return "float16";
    case KeyFormat::kInt8:
      return "int8";
    default:
      return "float32";
  }
}

RowFormat parse_row_format(const std::string& name, const char* what) {
  if (name == "float32") return RowFormat::kFloat32;
  if (name == "bfloat16") return RowFormat::kBFloat16;
  if (name == "float16") return RowFormat::kFloat16;
  throw InvalidArgument(std::string(what) +
                        ": expected one of 'float32', 'bfloat16', 'float16', got '" + name + "'");
}

const char* row_format_name(RowFormat format) {
  switch (format) {
    case RowFormat::kBFloat16:
      return "bfloat16";
    case RowFormat::kFloat16:
      return "float16";
    default:
      return "float32";
  }
}

float max_key_magnitude(KeyFormat format) {
  switch (format) {
    case KeyFormat::kFloat16:
      return 65504.0f;
    case KeyFormat::kBFloat16: {  // 0x7F7F8000 and up round (to nearest even) to infinity
      const uint32_t bits = 0x7F7F7FFFu;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }
    case KeyFormat::kInt8:
      return std::nextafter(std::numeric_limits<float>::max(), 0.0f);
    default:
      return std::numeric_limits<float>::max();
  }
}

double expected_recall(int64_t num_bins, int64_t k) {
  if (num_bins < 1 || k < 1) {
    throw InvalidArgument("expected_recall: num_bins and k must be >= 1, got num_bins=" +
                          std::to_string(num_bins) + ", k=" + std::to_string(k));
  }
  const double L = static_cast<double>(num_bins);
  const double kk = static_cast<double>(k);
  // 1 - (1 - 1/L)^k, computed without cancellation for large L.
  const double hit = -std::expm1(kk * std::log1p(-1.0 / L));
  return (L / kk) * hit;
}

namespace {

// The shortest text that reads back as `x`, with ".0" on whole numbers: as
// Python's repr() writes the number (messages read the same from every layer).
std::string shortest(double x) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  std::string s(buf, r.ptr);
  if (s.find_first_not_of("-0123456789") == std::string::npos) s += ".0";
  return s;
}

void check_recall_target(double recall_target) {
  if (!(recall_target > 0.0 && recall_target <= 1.0)) {  // also NaN
    throw InvalidArgument("recall_target: expected a number in (0, 1], got " +
                          shortest(recall_target));
  }
}

}  // namespace

void check_search_options(int64_t k, double recall_target, int64_t capacity) {
  if (k < 1 || k > capacity) {
    throw InvalidArgument("k: expected an integer in [1, capacity=" + std::to_string(capacity) +
                          "], got " + std::to_string(k));
  }
  check_recall_target(recall_target);
}

int64_t bins_for_recall(int64_t k, double recall_target) {
  if (k < 1) throw InvalidArgument("k: expected an integer >= 1, got " + std::to_string(k));
  check_recall_target(recall_target);
  if (recall_target >= 1.0 || k > kMaxBins) return 0;
  if (expected_recall(k, k) >= recall_target) return k;
  // r(L) >= 1 - (k - 1) / (2L), so this upper bound always meets the target. It is
  // computed in double and capped at kMaxBins before any integer sees it: a target
  // within 1e-16 of 1 asks for ~1e19 bins, which would overflow int64.
  const double bound = std::ceil((k - 1) / (2.0 * (1.0 - recall_target))) + static_cast<double>(k);
  int64_t hi = kMaxBins;
  if (bound < static_cast<double>(kMaxBins)) {
    hi = static_cast<int64_t>(bound);
  } else if (expected_recall(kMaxBins, k) < recall_target) {
    return 0;  // more bins than any memory has slots: only exact search meets it
  }
  int64_t lo = k;  // r(lo) < target <= r(hi); r is increasing in L
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (expected_recall(mid, k) >= recall_target) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return hi;
}

}  // namespace knnmem

namespace knnmem {

int64_t bins_for_search(int64_t k, double recall_target, KeyFormat format) {
  // Rounded keys (bfloat16, float16, int8) move some scores across the k-th: their bins
  // are chosen for a fifth less missing recall, 1 - 0.8 (1 - target), which
  // measured on clustered keys brings recall against float32 keys back to the
  // target (tests/test_exact.py, README).
  if (format != KeyFormat::kFloat32 && recall_target < 1.0) {
    recall_target = 1.0 - 0.8 * (1.0 - recall_target);
  }
  // Bins come in whole groups of 16 (one vector of slots): every 16 slots from a
  // multiple of 16 then land on 16 aligned bins, and slots s, s + L, s + 2L, ..
  // on the same ones, which the CPU kernels reduce in registers. Recall only rises.
  const int64_t bins = bins_for_recall(k, recall_target);
  return bins < kBinGroup ? bins : (bins + kBinGroup - 1) / kBinGroup * kBinGroup;
}

}  // namespace knnmem
