// C API: version, errors, levels, threads and dispatch introspection.
#include <cstring>
#include <string>

#include "dispatch/cpu_features.h"
#include "dispatch/registry.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "kernels/rmsnorm/rmsnorm.h"
#include "kernels/topk/topk.h"
#include "moekit/moekit.h"

namespace moekit {
namespace {

// Every op's table, by the name the API and the logs use.
struct OpTable {
  const char* name;
  int (*count)();
  void (*info)(int index, const char** name, moekit_isa* level);
};

template <class Args, const ImplList<Args>& (*Table)()>
OpTable make_op(const char* name) {
  return {name, [] { return static_cast<int>(Table().size()); },
          [](int i, const char** n, moekit_isa* level) {
            *n = Table()[i].name;
            *level = Table()[i].level;
          }};
}

const OpTable* op_tables(int* count) {
  static const OpTable tables[] = {
      make_op<RmsnormArgs, rmsnorm_impls>("rmsnorm"),
      make_op<RmsnormArgs, fused_add_rmsnorm_impls>("fused_add_rmsnorm"),
      make_op<QkNormArgs, qk_norm_impls>("qk_norm"),
      make_op<TopkArgs, topk_route_impls>("topk_route"),
      make_op<RouterTopkArgs, router_topk_impls>("router_topk"),
      make_op<MoeAlignArgs, moe_align_impls>("moe_align"),
      make_op<FusedMoeArgs, fused_moe_impls>("fused_moe"),
  };
  *count = static_cast<int>(sizeof(tables) / sizeof(tables[0]));
  return tables;
}

const OpTable* find_op(const char* name) {
  if (name == nullptr) return nullptr;
  int count;
  const OpTable* tables = op_tables(&count);
  for (int i = 0; i < count; ++i)
    if (std::strcmp(tables[i].name, name) == 0) return &tables[i];
  return nullptr;
}

}  // namespace
}  // namespace moekit

using namespace moekit;

extern "C" {

const char* moekit_version(void) { return "0.1.0"; }

const char* moekit_last_error(void) { return last_error().c_str(); }

const char* moekit_status_name(moekit_status status) {
  switch (status) {
    case MOEKIT_OK: return "ok";
    case MOEKIT_ERR_INVALID_ARGUMENT: return "invalid argument";
    case MOEKIT_ERR_UNSUPPORTED: return "unsupported";
    case MOEKIT_ERR_OUT_OF_MEMORY: return "out of memory";
    case MOEKIT_ERR_IO: return "i/o error";
    case MOEKIT_ERR_INTERNAL: return "internal error";
    default: break;  // not a value of the enum
  }
  return "unknown status";
}

const char* moekit_dtype_name(moekit_dtype dtype) {
  switch (dtype) {
    case MOEKIT_F32: return "f32";
    case MOEKIT_BF16: return "bf16";
    case MOEKIT_FP8_E4M3: return "fp8";
    case MOEKIT_I32: return "i32";
    case MOEKIT_I64: return "i64";
    default: break;  // not a value of the enum
  }
  return "unknown dtype";
}

const char* moekit_isa_name(moekit_isa isa) { return isa_name(isa); }

moekit_status moekit_isa_from_name(const char* name, moekit_isa* out) {
  if (name == nullptr) return set_error(MOEKIT_ERR_INVALID_ARGUMENT, "moekit_isa_from_name: name: is NULL");
  if (out == nullptr) return set_error(MOEKIT_ERR_INVALID_ARGUMENT, "moekit_isa_from_name: out: is NULL");
  for (int i = MOEKIT_ISA_SCALAR; i <= MOEKIT_ISA_AMX; ++i) {
    if (std::strcmp(name, isa_name(static_cast<moekit_isa>(i))) == 0) {
      *out = static_cast<moekit_isa>(i);
      return MOEKIT_OK;
    }
  }
  return set_error(MOEKIT_ERR_INVALID_ARGUMENT,
                   std::string("moekit_isa_from_name: name: '") + name +
                       "' is not a level (scalar, avx2, avx512, avx512_bf16, amx)");
}

moekit_isa moekit_detected_isa(void) { return cpu_features().level; }
moekit_isa moekit_effective_isa(void) { return effective_isa(); }
moekit_status moekit_set_max_isa(moekit_isa isa) { return set_max_isa(isa); }

int moekit_num_threads(void) { return num_threads(); }

moekit_status moekit_set_num_threads(int n) {
  if (n > 4096)
    return set_error(MOEKIT_ERR_INVALID_ARGUMENT,
                     "moekit_set_num_threads: n: " + std::to_string(n) + " exceeds 4096");
  set_num_threads(n);
  return MOEKIT_OK;
}

int moekit_op_count(void) {
  int count;
  op_tables(&count);
  return count;
}

const char* moekit_op_name(int op_index) {
  int count;
  const OpTable* tables = op_tables(&count);
  return op_index >= 0 && op_index < count ? tables[op_index].name : nullptr;
}

int moekit_impl_count(const char* op) {
  const OpTable* t = find_op(op);
  return t ? t->count() : -1;
}

moekit_status moekit_impl_info(const char* op, int impl_index, const char** name,
                               moekit_isa* level) {
  const OpTable* t = find_op(op);
  if (t == nullptr)
    return set_error(MOEKIT_ERR_INVALID_ARGUMENT,
                     std::string("moekit_impl_info: op: '") + (op ? op : "(null)") + "' is not an op");
  if (impl_index < 0 || impl_index >= t->count())
    return set_error(MOEKIT_ERR_INVALID_ARGUMENT,
                     "moekit_impl_info: impl_index: " + std::to_string(impl_index) + " is out of range [0, " +
                         std::to_string(t->count()) + ")");
  if (name == nullptr || level == nullptr)
    return set_error(MOEKIT_ERR_INVALID_ARGUMENT, "moekit_impl_info: name/level: is NULL");
  t->info(impl_index, name, level);
  return MOEKIT_OK;
}

const char* moekit_last_impl(const char* op) { return op ? last_choice(op) : ""; }

void moekit_set_query_only(int on) { set_query_only(on != 0); }

}  // extern "C"
