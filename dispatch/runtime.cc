// Runtime state: effective level (MOEKIT_ISA and moekit_set_max_isa), thread count
// (hwloc topology, MOEKIT_NUM_THREADS), per-thread errors and the dispatch log.
#include "dispatch/runtime.h"

#include <hwloc.h>
#include <omp.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "dispatch/cpu_features.h"
#include "dispatch/registry.h"

namespace moekit {
namespace {

thread_local std::string t_last_error;
thread_local bool t_query_only = false;
thread_local bool t_force_reference = false;
// Values are implementation names, string literals of the tables: the pointers that
// moekit_last_impl returns stay valid for the life of the process, even after this thread ends.
thread_local std::map<std::string, const char*> t_last_impl;

// Cap from MOEKIT_ISA, read once. An unknown or unavailable value is reported and ignored,
// so a typo cannot make kernels run on instructions the CPU lacks.
moekit_isa env_cap() {
  static const moekit_isa cap = [] {
    const moekit_isa detected = cpu_features().level;
    const char* value = std::getenv("MOEKIT_ISA");
    if (value == nullptr || *value == '\0') return detected;
    moekit_isa requested;
    if (moekit_isa_from_name(value, &requested) != MOEKIT_OK) {
      warn_ignored_env("MOEKIT_ISA", value, "levels: scalar avx2 avx512 avx512_bf16 amx");
      return detected;
    }
    if (requested > detected) {
      std::fprintf(stderr, "moekit: ignoring MOEKIT_ISA=%s: this CPU supports up to %s\n", value,
                   isa_name(detected));
      return detected;
    }
    return requested;
  }();
  return cap;
}

std::atomic<int> g_api_cap{-1};     // moekit_set_max_isa; -1 = none
std::atomic<int> g_thread_override{0};

Topology read_topology() {
  Topology t;
  t.cores = t.pus = omp_get_num_procs();
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return t;
  if (hwloc_topology_load(topo) != 0) {
    hwloc_topology_destroy(topo);
    return t;
  }
  hwloc_bitmap_t allowed = hwloc_bitmap_alloc();
  if (hwloc_get_cpubind(topo, allowed, HWLOC_CPUBIND_PROCESS) != 0)
    hwloc_bitmap_copy(allowed, hwloc_topology_get_allowed_cpuset(topo));
  int cores = 0;
  const int ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
  for (int i = 0; i < ncores; ++i) {
    hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, i);
    if (hwloc_bitmap_intersects(core->cpuset, allowed)) ++cores;
  }
  const int pus = hwloc_bitmap_weight(allowed);
  if (cores > 0) t.cores = cores;
  if (pus > 0) t.pus = pus;
  t.packages = std::max(1, hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PACKAGE));
  t.numa_nodes = std::max(1, hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE));
  if (hwloc_obj_t l2 = hwloc_get_obj_by_type(topo, HWLOC_OBJ_L2CACHE, 0))
    t.l2_bytes = static_cast<int64_t>(l2->attr->cache.size);
  const int nl3 = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_L3CACHE);
  for (int i = 0; i < nl3; ++i) {
    hwloc_obj_t l3 = hwloc_get_obj_by_type(topo, HWLOC_OBJ_L3CACHE, i);
    t.l3_bytes = std::max<int64_t>(t.l3_bytes, static_cast<int64_t>(l3->attr->cache.size));
  }
  t.from_hwloc = true;
  hwloc_bitmap_free(allowed);
  hwloc_topology_destroy(topo);
  return t;
}

int env_threads() {
  static const int n = [] {
    const char* value = std::getenv("MOEKIT_NUM_THREADS");
    if (value == nullptr || *value == '\0') return 0;
    char* end = nullptr;
    const long parsed = std::strtol(value, &end, 10);
    if (*end != '\0' || parsed <= 0 || parsed > 4096) {
      warn_ignored_env("MOEKIT_NUM_THREADS", value, "expected an integer in [1, 4096]");
      return 0;
    }
    return static_cast<int>(parsed);
  }();
  return n;
}

}  // namespace

const char* isa_name(moekit_isa isa) {
  switch (isa) {
    case MOEKIT_ISA_SCALAR: return "scalar";
    case MOEKIT_ISA_AVX2: return "avx2";
    case MOEKIT_ISA_AVX512: return "avx512";
    case MOEKIT_ISA_AVX512_BF16: return "avx512_bf16";
    case MOEKIT_ISA_AMX: return "amx";
    default: break;  // not a value of the enum
  }
  return "unknown";
}

moekit_isa effective_isa() {
  moekit_isa level = env_cap();
  const int api = g_api_cap.load(std::memory_order_relaxed);
  if (api >= 0 && api < level) level = static_cast<moekit_isa>(api);
  return level;
}

moekit_status set_max_isa(moekit_isa isa) {
  if (isa < MOEKIT_ISA_SCALAR || isa > MOEKIT_ISA_AMX)
    return set_error(MOEKIT_ERR_INVALID_ARGUMENT,
                     "moekit_set_max_isa: isa: " + std::to_string(static_cast<int>(isa)) +
                         " is not a level");
  if (isa > cpu_features().level)
    return set_error(MOEKIT_ERR_UNSUPPORTED, std::string("moekit_set_max_isa: isa: ") +
                                                 isa_name(isa) + " is not supported by this CPU (best: " +
                                                 isa_name(cpu_features().level) + ")");
  g_api_cap.store(isa, std::memory_order_relaxed);
  return MOEKIT_OK;
}

const Topology& topology() {
  static const Topology t = read_topology();
  return t;
}

int num_threads() {
  const int override_n = g_thread_override.load(std::memory_order_relaxed);
  if (override_n > 0) return override_n;
  if (env_threads() > 0) return env_threads();
  return std::max(1, topology().cores);
}

void set_num_threads(int n) { g_thread_override.store(n > 0 ? n : 0, std::memory_order_relaxed); }

moekit_status set_error(moekit_status status, const std::string& message) {
  t_last_error = message;
  if (debug_log_enabled()) debug_log("error: " + message);
  return status;
}

void clear_error() { t_last_error.clear(); }
const std::string& last_error() { return t_last_error; }

bool debug_log_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOEKIT_LOG");
    if (v == nullptr || *v == '\0') return false;
    if (std::strcmp(v, "debug") == 0) return true;
    warn_ignored_env("MOEKIT_LOG", v, "expected debug");
    return false;
  }();
  return enabled;
}

void debug_log(const std::string& line) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "moekit: %s\n", line.c_str());
}

void warn_ignored_env(const char* name, const char* value, const char* expected) {
  std::fprintf(stderr, "moekit: ignoring %s=%s (%s)\n", name, value, expected);
}

bool query_only() { return t_query_only; }
void set_query_only(bool on) { t_query_only = on; }

bool force_reference() { return t_force_reference; }
void set_force_reference(bool on) { t_force_reference = on; }

void record_choice(const char* op, const char* impl_name) { t_last_impl[op] = impl_name; }

const char* last_choice(const char* op) {
  auto it = t_last_impl.find(op);
  return it == t_last_impl.end() ? "" : it->second;
}

}  // namespace moekit
