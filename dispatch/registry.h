// The dispatch table. Each op has an ordered list of implementations, best first, ending in its
// reference. A call takes the first entry whose ISA level the effective level covers and whose
// supports() accepts the arguments; the reference accepts everything, so a parameter no fast
// kernel handles falls back instead of failing. MOEKIT_LOG=debug prints each refusal's reason.
#ifndef MOEKIT_DISPATCH_REGISTRY_H_
#define MOEKIT_DISPATCH_REGISTRY_H_

#include <new>
#include <string>
#include <vector>

#include "dispatch/runtime.h"
#include "moekit/moekit.h"

namespace moekit {

const char* isa_name(moekit_isa isa);

template <class Args>
struct Impl {
  const char* name;    // e.g. "rmsnorm_avx512_hwy"; references start with "ref"
  moekit_isa level;    // the lowest level it can run at
  // nullptr when the implementation handles `args`, else a short reason why not.
  const char* (*supports)(const Args& args);
  void (*run)(const Args& args);
};

template <class Args>
using ImplList = std::vector<Impl<Args>>;

// Picks the implementation for `args` at level `cap` (default: the effective level).
template <class Args>
const Impl<Args>& choose(const char* op, const ImplList<Args>& impls, const Args& args,
                         moekit_isa cap) {
  const bool log = debug_log_enabled();
  if (force_reference()) {
    if (log) debug_log(std::string(op) + ": chose " + impls.back().name + " (reference forced)");
    return impls.back();
  }
  for (const Impl<Args>& impl : impls) {
    if (impl.level > cap) {
      if (log)
        debug_log(std::string(op) + ": skip " + impl.name + " (needs " + isa_name(impl.level) +
                  ", effective level is " + isa_name(cap) + ")");
      continue;
    }
    const char* why = impl.supports ? impl.supports(args) : nullptr;
    if (why != nullptr) {
      if (log) debug_log(std::string(op) + ": skip " + impl.name + " (" + why + ")");
      continue;
    }
    if (log) debug_log(std::string(op) + ": chose " + impl.name);
    return impl;
  }
  // Unreachable while the reference is last and accepts everything.
  return impls.back();
}

template <class Args>
const Impl<Args>& choose(const char* op, const ImplList<Args>& impls, const Args& args) {
  return choose(op, impls, args, effective_isa());
}

// Chooses, records the choice for moekit_last_impl, and runs unless in query mode. An
// allocation that fails while running becomes MOEKIT_ERR_OUT_OF_MEMORY instead of an exception
// crossing the C API (the entry points obtain the large buffers before this, so this is rare;
// by then the output may be partly written).
template <class Args>
moekit_status dispatch(const char* op, const ImplList<Args>& impls, const Args& args) {
  const Impl<Args>& impl = choose(op, impls, args);
  record_choice(op, impl.name);
  if (query_only()) return MOEKIT_OK;
  try {
    impl.run(args);
  } catch (const std::bad_alloc&) {
    return set_error(MOEKIT_ERR_OUT_OF_MEMORY, std::string(op) + ": out of memory in " + impl.name +
                                                   "; the output may be partly written");
  }
  return MOEKIT_OK;
}

}  // namespace moekit

#endif  // MOEKIT_DISPATCH_REGISTRY_H_
