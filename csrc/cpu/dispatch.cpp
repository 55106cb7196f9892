// Run-time choice of the scan variant, and the baseline helpers around it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/select.hpp"
#include "cpu/kernels.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#if defined(KNNMEM_NEON_KERNELS) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace knnmem::cpu {
namespace {

// Best first. The x86 variants exist only in x86-64 builds (CMakeLists.txt).
const Kernel kKernels[] = {
#ifdef KNNMEM_X86_KERNELS
    {"avx512_vnni_bf16", scan_avx512dl, kth_key_avx512, rank_avx512, pack_keys_avx512},
    {"avx512", scan_avx512, kth_key_avx512, rank_avx512, pack_keys_avx512},
    {"avx_vnni", scan_avx_vnni, kth_key_avx2, rank_avx2, pack_keys_avx2},
    {"avx2", scan_avx2, kth_key_avx2, rank_avx2, pack_keys_avx2},
#endif
#ifdef KNNMEM_NEON_KERNELS
    {"neon_dotprod", scan_neon_dotprod, kth_key_neon, rank_neon, pack_keys_neon},
    {"neon", scan_neon, kth_key_neon, rank_neon, pack_keys_neon},
#endif
    {"portable", scan_portable, kth_key_portable, rank_portable, pack_keys_portable},
};

#if defined(__x86_64__) || defined(__i386__)
// AVX-VNNI: CPUID leaf 7, sub-leaf 1, EAX bit 4 (the YMM state the OS must
// save is checked with avx2 by __builtin_cpu_supports).
bool has_avx_vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  return (eax & (1u << 4)) != 0;
}
#endif

bool cpu_supports(const std::string& name) {
#if defined(__x86_64__) || defined(__i386__)
  if (name == "avx512" || name == "avx512_vnni_bf16") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           (name == "avx512" ||
            (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")));
  }
  if (name == "avx2" || name == "avx_vnni") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && (name == "avx2" || has_avx_vnni());
  }
#endif
#ifdef KNNMEM_NEON_KERNELS
  if (name == "neon") return true;  // Advanced SIMD is part of the aarch64 base ISA
  if (name == "neon_dotprod") {
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return false;
#endif
  }
#endif
  return name == "portable";
}

const Kernel* find(const std::string& name) {
  if (name != "avx512_vnni_bf16" && name != "avx512" && name != "avx_vnni" && name != "avx2" &&
      name != "neon_dotprod" && name != "neon" && name != "portable") {
    throw InvalidArgument(
        "kernel: expected one of 'avx512_vnni_bf16', 'avx512', 'avx_vnni', 'avx2', 'neon_dotprod', "
        "'neon', 'portable' (or '' for automatic), got '" +
        name + "'");
  }
  for (const Kernel& k : kKernels) {
    if (name == k.name) {
      if (!cpu_supports(name)) {
        std::string supported;
        for (const auto& n : supported_kernels()) supported += (supported.empty() ? "" : ", ") + n;
        throw InvalidArgument("kernel: '" + name +
                              "' is not supported by this CPU; supported: " + supported);
      }
      return &k;
    }
  }
  throw InvalidArgument("kernel: '" + name + "' is not built for this platform");
}

const Kernel* best() {
  for (const Kernel& k : kKernels) {
    if (cpu_supports(k.name)) return &k;
  }
  return &kKernels[sizeof(kKernels) / sizeof(kKernels[0]) - 1];
}

std::atomic<const Kernel*> g_active{nullptr};

}  // namespace

std::vector<std::string> supported_kernels() {
  std::vector<std::string> out;
  for (const Kernel& k : kKernels) {
    if (cpu_supports(k.name)) out.emplace_back(k.name);
  }
  return out;
}

const Kernel& active_kernel() {
  const Kernel* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    const char* env = std::getenv("KNNMEM_KERNEL");
    k = env != nullptr && *env != '\0' ? find(env) : best();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

void set_kernel(const std::string& name) {
  g_active.store(name.empty() ? best() : find(name), std::memory_order_release);
}

void compact_topk(const TopKBuffers& t, int64_t query) {
  thread_local std::vector<detail::Candidate> entries;
  const int64_t n = t.sizes[query];
  float* scores = t.scores + query * t.capacity;
  int32_t* slots = t.slots + query * t.capacity;
  entries.resize(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) entries[i] = {scores[i], slots[i]};
  // Best first; equal scores by slot, so the kept set is deterministic.
  std::nth_element(entries.begin(), entries.begin() + (t.k - 1), entries.end(), detail::better);
  for (int64_t i = 0; i < t.k; ++i) {
    scores[i] = entries[i].score;
    slots[i] = entries[i].slot;
  }
  t.sizes[query] = t.k;
  float threshold = entries[t.k - 1].score;  // strict: later slots of this range tie worse
  if (t.shared_bound != nullptr) {
    uint32_t* bound = t.shared_bound + query;
    const uint32_t mine = detail::ordered_score(threshold);
    uint32_t seen = __atomic_load_n(bound, __ATOMIC_RELAXED);
    while (mine > seen && !__atomic_compare_exchange_n(bound, &seen, mine, true, __ATOMIC_RELAXED,
                                                       __ATOMIC_RELAXED)) {
    }
    if (seen > mine) {  // another range's k-th best: keep scores >= it
      threshold =
          std::nextafter(detail::score_of_ordered(seen), -std::numeric_limits<float>::infinity());
    }
  }
  t.thresholds[query] = threshold;
}

float squared_norm(const float* x, int64_t dim) {
  float s = 0.0f;
  for (int64_t i = 0; i < dim; ++i) s += x[i] * x[i];
  return s;
}

}  // namespace knnmem::cpu

namespace knnmem {

void set_kernel(const std::string& name) { cpu::set_kernel(name); }
std::string get_kernel() { return cpu::active_kernel().name; }
std::vector<std::string> supported_kernels() { return cpu::supported_kernels(); }

}  // namespace knnmem
