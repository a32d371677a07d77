// Process-wide runtime state: the effective ISA level, thread count, topology, the per-thread
// error message and the dispatch log.
#ifndef MOEKIT_DISPATCH_RUNTIME_H_
#define MOEKIT_DISPATCH_RUNTIME_H_

#include <cstdint>
#include <string>

#include "moekit/moekit.h"

namespace moekit {

// Detected level capped by MOEKIT_ISA and moekit_set_max_isa.
moekit_isa effective_isa();

moekit_status set_max_isa(moekit_isa isa);

// Kernel thread count (see moekit_num_threads).
int num_threads();
void set_num_threads(int n);

struct Topology {
  int packages = 1;
  int numa_nodes = 1;
  int cores = 1;        // physical cores this process may run on
  int pus = 1;          // hardware threads this process may run on
  int64_t l2_bytes = 0;  // per core
  int64_t l3_bytes = 0;  // per package (largest L3 object)
  bool from_hwloc = false;
};
const Topology& topology();

// Records `message` as this thread's last error and returns `status`.
moekit_status set_error(moekit_status status, const std::string& message);
void clear_error();
const std::string& last_error();

bool debug_log_enabled();
void debug_log(const std::string& line);  // "moekit: ..." on stderr

// "moekit: ignoring NAME=VALUE (expected)" on stderr: an environment variable whose value is
// not understood is reported once where it is read, then its default applies.
void warn_ignored_env(const char* name, const char* value, const char* expected);

// Query mode (moekit_set_query_only) and the last chosen implementation per op.
bool query_only();
void set_query_only(bool on);
void record_choice(const char* op, const char* impl_name);
// Test hook (internal, not in the C API): while on, choose() takes each table's reference on
// this thread, so tests can check the oracle itself through the public entry points.
bool force_reference();
void set_force_reference(bool on);
const char* last_choice(const char* op);  // "" when the op has not run on this thread

}  // namespace moekit

#endif  // MOEKIT_DISPATCH_RUNTIME_H_
