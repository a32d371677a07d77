// Dispatch behaviour: choose() over a synthetic table (level cap, supports() refusals, the
// reference at the end), dispatch() recording and query mode, the real tables' shape, the
// process-wide controls (moekit_set_max_isa, MOEKIT_ISA, MOEKIT_LOG, MOEKIT_NUM_THREADS) seen
// from subprocesses (moekit-info --json, and this binary re-run as a child), CPU detection
// consistency and the thread count's default.
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dispatch/cpu_features.h"
#include "dispatch/registry.h"
#include "dispatch/runtime.h"
#include "kernels/moe/moe.h"
#include "kernels/moe/moe_amx.h"
#include "kernels/moe/moe_microkernel.h"
#include "kernels/rmsnorm/rmsnorm.h"
#include "kernels/topk/topk.h"
#include "moekit/moekit.h"
#include "test_util.h"

namespace {

// ---- a synthetic table -----------------------------------------------------------------------

struct FakeArgs {
  int width = 0;
  int* ran = nullptr;  // which entry ran
};

const char* needs_wide(const FakeArgs& a) { return a.width < 16 ? "width below 16" : nullptr; }
const char* needs_even(const FakeArgs& a) { return a.width % 2 ? "width is odd" : nullptr; }
template <int kIndex>
void mark(const FakeArgs& a) {
  if (a.ran) *a.ran = kIndex;
}

const moekit::ImplList<FakeArgs>& fake_impls() {
  static const moekit::ImplList<FakeArgs> impls = {
      {"fake_amx_wide", MOEKIT_ISA_AMX, needs_wide, mark<0>},
      {"fake_avx512_even", MOEKIT_ISA_AVX512, needs_even, mark<1>},
      {"fake_avx2", MOEKIT_ISA_AVX2, nullptr, mark<2>},
      {"fake_scalar_wide", MOEKIT_ISA_SCALAR, needs_wide, mark<3>},
      {"ref_fake", MOEKIT_ISA_SCALAR, nullptr, mark<4>},
  };
  return impls;
}

std::string chosen(moekit_isa cap, int width) {
  FakeArgs a;
  a.width = width;
  return moekit::choose("fake", fake_impls(), a, cap).name;
}

TEST(Choose, SkipsLevelsAboveTheCap) {
  EXPECT_EQ(chosen(MOEKIT_ISA_SCALAR, 3), "ref_fake");
  EXPECT_EQ(chosen(MOEKIT_ISA_SCALAR, 16), "fake_scalar_wide");
  EXPECT_EQ(chosen(MOEKIT_ISA_AVX2, 3), "fake_avx2");
  EXPECT_EQ(chosen(MOEKIT_ISA_AVX512, 4), "fake_avx512_even");
  EXPECT_EQ(chosen(MOEKIT_ISA_AVX512_BF16, 4), "fake_avx512_even");
  EXPECT_EQ(chosen(MOEKIT_ISA_AMX, 16), "fake_amx_wide");
}

TEST(Choose, SkipsEntriesWhoseSupportsRefuses) {
  EXPECT_EQ(chosen(MOEKIT_ISA_AMX, 4), "fake_avx512_even");  // amx: width below 16
  EXPECT_EQ(chosen(MOEKIT_ISA_AMX, 3), "fake_avx2");         // and avx512: odd
  EXPECT_EQ(chosen(MOEKIT_ISA_AVX512, 17), "fake_avx2");
  EXPECT_EQ(chosen(MOEKIT_ISA_AMX, 17), "fake_amx_wide");
}

TEST(Choose, EndsAtTheReferenceWhenEverythingElseRefuses) {
  static const moekit::ImplList<FakeArgs> picky = {
      {"fake_avx2_wide", MOEKIT_ISA_AVX2, needs_wide, mark<0>},
      {"fake_scalar_even", MOEKIT_ISA_SCALAR, needs_even, mark<1>},
      {"ref_picky", MOEKIT_ISA_SCALAR, nullptr, mark<2>},
  };
  FakeArgs a;
  a.width = 3;
  for (int cap = MOEKIT_ISA_SCALAR; cap <= MOEKIT_ISA_AMX; ++cap)
    EXPECT_STREQ(moekit::choose("picky", picky, a, static_cast<moekit_isa>(cap)).name,
                 "ref_picky");
}

TEST(Choose, DefaultCapIsTheEffectiveLevel) {
  struct Restore {
    ~Restore() { moekit_set_max_isa(moekit_detected_isa()); }
  } restore;
  for (int level = MOEKIT_ISA_SCALAR; level <= moekit_detected_isa(); ++level) {
    ASSERT_EQ(moekit_set_max_isa(static_cast<moekit_isa>(level)), MOEKIT_OK);
    EXPECT_LE(moekit_effective_isa(), level);
    EXPECT_EQ(moekit::effective_isa(), moekit_effective_isa());
    FakeArgs a;
    a.width = 16;
    const auto& impl = moekit::choose("fake", fake_impls(), a);
    EXPECT_LE(impl.level, moekit_effective_isa()) << impl.name;
    EXPECT_EQ(impl.name, chosen(moekit_effective_isa(), 16));
  }
}

TEST(Dispatch, RunsTheChoiceRecordsItAndHonoursQueryMode) {
  int ran = -1;
  FakeArgs a;
  a.width = 3;
  a.ran = &ran;
  struct Restore {
    ~Restore() {
      moekit_set_max_isa(moekit_detected_isa());
      moekit_set_query_only(0);
      moekit::set_force_reference(false);
    }
  } restore;
  ASSERT_EQ(moekit_set_max_isa(MOEKIT_ISA_SCALAR), MOEKIT_OK);
  moekit::dispatch("fake", fake_impls(), a);
  EXPECT_EQ(ran, 4);
  EXPECT_STREQ(moekit_last_impl("fake"), "ref_fake");
  a.width = 16;
  ran = -1;
  moekit_set_query_only(1);
  moekit::dispatch("fake", fake_impls(), a);
  EXPECT_EQ(ran, -1) << "query mode must not run the kernel";
  EXPECT_STREQ(moekit_last_impl("fake"), "fake_scalar_wide");
  moekit_set_query_only(0);
  // The test hook forces the reference whatever the level.
  moekit::set_force_reference(true);
  EXPECT_EQ(moekit::dispatch("fake", fake_impls(), a), MOEKIT_OK);
  EXPECT_EQ(ran, 4);
  EXPECT_STREQ(moekit_last_impl("fake"), "ref_fake");
}

// A kernel whose allocation fails must not throw through the C API: dispatch reports it.
TEST(Dispatch, AllocationFailureInAKernelIsOutOfMemory) {
  static const moekit::ImplList<FakeArgs> impls = {
      {"ref_greedy", MOEKIT_ISA_SCALAR, nullptr, [](const FakeArgs&) { throw std::bad_alloc(); }},
  };
  EXPECT_EQ(moekit::dispatch("greedy", impls, FakeArgs{}), MOEKIT_ERR_OUT_OF_MEMORY);
  EXPECT_NE(std::string(moekit_last_error()).find("greedy: out of memory in ref_greedy"),
            std::string::npos)
      << moekit_last_error();
}

// ---- the real tables -------------------------------------------------------------------------

template <class Args>
void check_table(const char* op, const moekit::ImplList<Args>& impls) {
  SCOPED_TRACE(op);
  ASSERT_FALSE(impls.empty());
  std::map<std::string, int> seen;
  for (size_t i = 0; i < impls.size(); ++i) {
    const auto& impl = impls[i];
    ASSERT_NE(impl.name, nullptr);
    ASSERT_NE(impl.run, nullptr) << impl.name;
    EXPECT_EQ(++seen[impl.name], 1) << impl.name << " registered twice";
    EXPECT_GE(impl.level, MOEKIT_ISA_SCALAR) << impl.name;
    EXPECT_LE(impl.level, MOEKIT_ISA_AMX) << impl.name;
    const bool is_ref = std::string(impl.name).rfind("ref", 0) == 0;
    EXPECT_EQ(is_ref, i + 1 == impls.size()) << impl.name << " at " << i;
  }
  // The reference accepts everything, at every level.
  EXPECT_EQ(impls.back().level, MOEKIT_ISA_SCALAR);
  EXPECT_EQ(impls.back().supports, nullptr) << impls.back().name;
  // The C API reports the same list.
  ASSERT_EQ(moekit_impl_count(op), static_cast<int>(impls.size()));
  for (size_t i = 0; i < impls.size(); ++i) {
    const char* name;
    moekit_isa level;
    ASSERT_EQ(moekit_impl_info(op, static_cast<int>(i), &name, &level), MOEKIT_OK);
    EXPECT_STREQ(name, impls[i].name);
    EXPECT_EQ(level, impls[i].level);
  }
}

TEST(Tables, EveryOpEndsInItsReference) {
  check_table("rmsnorm", moekit::rmsnorm_impls());
  check_table("fused_add_rmsnorm", moekit::fused_add_rmsnorm_impls());
  check_table("qk_norm", moekit::qk_norm_impls());
  check_table("topk_route", moekit::topk_route_impls());
  check_table("router_topk", moekit::router_topk_impls());
  check_table("moe_align", moekit::moe_align_impls());
  check_table("fused_moe", moekit::fused_moe_impls());
}

// ---- CPU detection ---------------------------------------------------------------------------

TEST(CpuFeatures, LevelFollowsTheFlags) {
  const moekit::CpuFeatures& f = moekit::cpu_features();
  EXPECT_FALSE(f.vendor.empty());
  EXPECT_EQ(f.level, moekit_detected_isa());
  const bool avx2 = f.os_avx && f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  const bool bf16 = avx512 && f.avx512_bf16 && f.avx512_vnni;
  const bool amx = bf16 && f.avx512_vbmi && f.amx_tile && f.amx_bf16 && f.amx_int8 && f.os_amx &&
                   f.amx_permitted;
  const moekit_isa expect = amx      ? MOEKIT_ISA_AMX
                            : bf16   ? MOEKIT_ISA_AVX512_BF16
                            : avx512 ? MOEKIT_ISA_AVX512
                            : avx2   ? MOEKIT_ISA_AVX2
                                     : MOEKIT_ISA_SCALAR;
  EXPECT_EQ(f.level, expect);
  // OS state implies the narrower state; permission implies the tile state.
  if (f.os_avx512) {
    EXPECT_TRUE(f.os_avx);
  }
  if (f.amx_permitted) {
    EXPECT_TRUE(f.os_amx && f.amx_tile);
  }
}

TEST(CpuFeatures, AgreesWithTheCompilerRuntime) {
  // libgcc's detection includes the OS (XCR0) check for AVX and AVX-512 state.
  __builtin_cpu_init();
  const moekit::CpuFeatures& f = moekit::cpu_features();
  EXPECT_EQ(f.avx2 && f.os_avx, __builtin_cpu_supports("avx2") != 0);
  EXPECT_EQ(f.fma && f.os_avx, __builtin_cpu_supports("fma") != 0);
  EXPECT_EQ(f.avx512f && f.os_avx512, __builtin_cpu_supports("avx512f") != 0);
  EXPECT_EQ(f.avx512bw && f.os_avx512, __builtin_cpu_supports("avx512bw") != 0);
  EXPECT_EQ(f.avx512vl && f.os_avx512, __builtin_cpu_supports("avx512vl") != 0);
  EXPECT_EQ(f.avx512dq && f.os_avx512, __builtin_cpu_supports("avx512dq") != 0);
  EXPECT_EQ(f.avx512_vnni && f.os_avx512, __builtin_cpu_supports("avx512vnni") != 0);
  EXPECT_EQ(f.avx512_bf16 && f.os_avx512, __builtin_cpu_supports("avx512bf16") != 0);
  EXPECT_EQ(f.avx512_vbmi && f.os_avx512, __builtin_cpu_supports("avx512vbmi") != 0);
}

// ---- threads ---------------------------------------------------------------------------------

int affinity_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
  return CPU_COUNT(&set);
}

TEST(Threads, DefaultIsThePhysicalCoresThisProcessMayUse) {
  const moekit::Topology& t = moekit::topology();
  EXPECT_TRUE(t.from_hwloc);
  EXPECT_GE(t.cores, 1);
  EXPECT_LE(t.cores, t.pus);
  EXPECT_EQ(t.pus, affinity_cpus());
  EXPECT_GE(t.packages, 1);
  EXPECT_GE(t.numa_nodes, 1);
  if (std::getenv("MOEKIT_NUM_THREADS") != nullptr)
    GTEST_SKIP() << "MOEKIT_NUM_THREADS is set in this environment";
  moekit_set_num_threads(0);
  EXPECT_EQ(moekit_num_threads(), t.cores);
  ASSERT_EQ(moekit_set_num_threads(t.cores + 5), MOEKIT_OK);
  EXPECT_EQ(moekit_num_threads(), t.cores + 5);
  ASSERT_EQ(moekit_set_num_threads(0), MOEKIT_OK);
  EXPECT_EQ(moekit_num_threads(), t.cores);
}

// ---- subprocesses --------------------------------------------------------------------------

struct Output {
  int status = -1;
  std::string out, err;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs `command` through the shell with `env` prepended (e.g. "MOEKIT_ISA=avx2"), capturing
// stdout and stderr. MOEKIT_* variables of this process are cleared first so that the
// environment the test sets is the only one in force.
Output run(const std::string& env, const std::string& command) {
  char path[] = "/tmp/moekit_test_dispatch_XXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  close(fd);
  const std::string full = "env -u MOEKIT_ISA -u MOEKIT_LOG -u MOEKIT_NUM_THREADS " + env + " " +
                           command + " 2>" + path;
  Output o;
  FILE* pipe = popen(full.c_str(), "r");
  EXPECT_NE(pipe, nullptr) << full;
  if (!pipe) return o;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) o.out.append(buf, n);
  const int rc = pclose(pipe);
  o.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  o.err = read_file(path);
  std::remove(path);
  return o;
}

std::string self_exe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, n) : std::string();
}

// The build tree's moekit-info, or the one beside this binary when the tests were moved (a
// bundle carried to another machine puts them side by side).
std::string info_path() {
  const std::string exe = self_exe();
  const std::string beside = exe.substr(0, exe.rfind('/')) + "/moekit-info";
#ifdef MOEKIT_INFO_PATH
  const std::string built = MOEKIT_INFO_PATH;
#else
  const std::string built = exe.substr(0, exe.rfind('/')) + "/../tools/moekit-info";
#endif
  return access(built.c_str(), X_OK) == 0 ? built : beside;
}

// moekit-info --json under `env`, parsed.
nlohmann::json info(const std::string& env, Output* raw = nullptr) {
  Output o = run(env, "'" + info_path() + "' --json");
  if (raw) *raw = o;
  EXPECT_EQ(o.status, 0) << env << ": " << o.err;
  try {
    return nlohmann::json::parse(o.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << env << ": not JSON (" << e.what() << "): " << o.out.substr(0, 200);
    return nlohmann::json::object();
  }
}

moekit_isa level_of(const std::string& name) {
  moekit_isa level = MOEKIT_ISA_SCALAR;
  EXPECT_EQ(moekit_isa_from_name(name.c_str(), &level), MOEKIT_OK) << name;
  return level;
}

// Every choice in the report is a registered implementation of its op whose level is at most
// `cap`; returns how many choices were checked.
int check_choices(const nlohmann::json& report, moekit_isa cap) {
  int checked = 0;
  for (const auto& op : report.at("ops")) {
    std::map<std::string, moekit_isa> levels;
    for (const auto& impl : op.at("implementations"))
      levels[impl.at("name").get<std::string>()] = level_of(impl.at("level").get<std::string>());
    for (const auto& pick : op.at("chosen")) {
      const std::string name = pick.at("name").get<std::string>();
      EXPECT_TRUE(levels.count(name)) << op.at("op") << ": " << name << " is not registered";
      EXPECT_LE(levels[name], cap) << op.at("op") << " " << pick.at("case") << ": " << name;
      ++checked;
    }
  }
  return checked;
}

TEST(MoekitInfo, JsonReportHasTheDocumentedShape) {
  const nlohmann::json r = info("");
  ASSERT_TRUE(r.is_object());
  EXPECT_EQ(r.at("version"), moekit_version());
  EXPECT_EQ(r.at("detected_level"), moekit_isa_name(moekit_detected_isa()));
  EXPECT_EQ(r.at("effective_level"), moekit_isa_name(moekit_detected_isa()));
  EXPECT_TRUE(r.at("features").is_object());
  EXPECT_GE(r.at("threads").get<int>(), 1);
  const auto& ops = r.at("ops");
  ASSERT_EQ(ops.size(), static_cast<size_t>(moekit_op_count()));
  for (size_t i = 0; i < ops.size(); ++i) {
    const auto& op = ops[i];
    EXPECT_EQ(op.at("op"), moekit_op_name(static_cast<int>(i)));
    const auto& impls = op.at("implementations");
    ASSERT_GE(impls.size(), 1u);
    for (const auto& impl : impls) {
      EXPECT_TRUE(impl.at("name").is_string());
      level_of(impl.at("level").get<std::string>());
    }
    const std::string last = impls.back().at("name").get<std::string>();
    EXPECT_EQ(last.rfind("ref", 0), 0u) << op.at("op") << ": last is " << last;
    EXPECT_FALSE(op.at("chosen").empty()) << op.at("op");
    for (const auto& pick : op.at("chosen")) {
      EXPECT_TRUE(pick.at("case").is_string());
      EXPECT_TRUE(pick.at("dtype").is_string());
      EXPECT_TRUE(pick.at("name").is_string());
      // AMX fused-MoE picks say which microkernel their expert segments take.
      const std::string name = pick.at("name").get<std::string>();
      const bool amx_moe = op.at("op") == "fused_moe" && name.find("_amx") != std::string::npos;
      EXPECT_EQ(pick.contains("note"), amx_moe) << name;
      if (amx_moe) {
        const std::string note = pick.at("note").get<std::string>();
        // Decode has 1 row per segment; prefill (M=4096, k=8, E=256) 128.
        const bool decode = pick.at("case").get<std::string>().find("M=1") != std::string::npos;
        const moekit_dtype weights = pick.at("dtype") == "fp8" ? MOEKIT_FP8_E4M3 : MOEKIT_BF16;
        const bool tiles = (decode ? 1 : 128) >= moekit::amx_min_rows_for(weights);
        EXPECT_NE(note.find(tiles ? "AMX tiles" : "avx512"), std::string::npos) << note;
      }
    }
  }
  EXPECT_GT(check_choices(r, moekit_detected_isa()), 0);
}

TEST(MoekitInfo, MoekitIsaCapsTheWholeProcess) {
  for (int level = MOEKIT_ISA_SCALAR; level <= moekit_detected_isa(); ++level) {
    const std::string name = moekit_isa_name(static_cast<moekit_isa>(level));
    SCOPED_TRACE("MOEKIT_ISA=" + name);
    Output raw;
    const nlohmann::json r = info("MOEKIT_ISA=" + name, &raw);
    EXPECT_EQ(r.value("effective_level", ""), name);
    EXPECT_EQ(r.value("detected_level", ""), moekit_isa_name(moekit_detected_isa()));
    EXPECT_EQ(raw.err.find("ignoring"), std::string::npos) << raw.err;
    if (r.contains("ops")) {
      EXPECT_GT(check_choices(r, static_cast<moekit_isa>(level)), 0);
    }
  }
}

TEST(MoekitInfo, UnknownMoekitIsaIsReportedAndIgnored) {
  for (const char* bad : {"bogus", "AVX2", "avx3", "native"}) {
    SCOPED_TRACE(bad);
    Output raw;
    const nlohmann::json r = info(std::string("MOEKIT_ISA=") + bad, &raw);
    EXPECT_NE(raw.err.find(std::string("ignoring MOEKIT_ISA=") + bad), std::string::npos)
        << raw.err;
    EXPECT_EQ(r.value("effective_level", ""), moekit_isa_name(moekit_detected_isa()));
  }
}

TEST(MoekitInfo, TooHighMoekitIsaIsReportedAndIgnored) {
  if (moekit_detected_isa() == MOEKIT_ISA_AMX)
    GTEST_SKIP() << "this CPU has the highest level (amx); nothing is above it";
  const std::string above = moekit_isa_name(static_cast<moekit_isa>(moekit_detected_isa() + 1));
  Output raw;
  const nlohmann::json r = info("MOEKIT_ISA=" + above, &raw);
  EXPECT_NE(raw.err.find("ignoring MOEKIT_ISA=" + above), std::string::npos) << raw.err;
  EXPECT_EQ(r.value("effective_level", ""), moekit_isa_name(moekit_detected_isa()));
  EXPECT_GT(check_choices(r, moekit_detected_isa()), 0);
}

TEST(MoekitInfo, MoekitNumThreadsOverridesTheDefault) {
  const int default_threads = info("").value("threads", -1);
  EXPECT_EQ(default_threads, moekit::topology().cores);
  EXPECT_EQ(info("MOEKIT_NUM_THREADS=3").value("threads", -1), 3);
  EXPECT_EQ(info("MOEKIT_NUM_THREADS=64").value("threads", -1), 64);
  for (const char* bad : {"abc", "0", "-2", "3x", "100000"}) {
    Output raw;
    EXPECT_EQ(info(std::string("MOEKIT_NUM_THREADS=") + bad, &raw).value("threads", -1),
              default_threads)
        << bad;
    EXPECT_NE(raw.err.find(std::string("ignoring MOEKIT_NUM_THREADS=") + bad), std::string::npos)
        << raw.err;
  }
}

TEST(MoekitInfo, DefaultThreadsFollowTheAffinityMask) {
  if (affinity_cpus() < 2 || system("command -v taskset >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "needs taskset and at least 2 allowed CPUs";
  cpu_set_t set;
  sched_getaffinity(0, sizeof set, &set);
  int first = 0;
  while (!CPU_ISSET(first, &set)) ++first;
  const nlohmann::json r = info("taskset -c " + std::to_string(first));
  EXPECT_EQ(r.value("threads", -1), 1);
  EXPECT_EQ(r.at("topology").value("cores", -1), 1);
}

TEST(MoekitInfo, DebugLogExplainsChoices) {
  Output raw;
  info("MOEKIT_LOG=debug", &raw);
  EXPECT_NE(raw.err.find("moekit: rmsnorm: chose "), std::string::npos) << raw.err;
  EXPECT_NE(raw.err.find("moekit: fused_moe: chose "), std::string::npos) << raw.err;
  // Without the variable: silent.
  Output quiet;
  info("", &quiet);
  EXPECT_EQ(quiet.err.find("chose"), std::string::npos) << quiet.err;
}

// This binary re-run with MOEKIT_DISPATCH_TEST_CHILD set dispatches the synthetic table and
// exits before the tests (see the initializer at the end of this file); set to "thresholds" it
// prints the fused-MoE row thresholds instead.
void child_main() {
  if (std::strcmp(std::getenv("MOEKIT_DISPATCH_TEST_CHILD"), "thresholds") == 0) {
    std::printf("amx_min_rows %lld bf16_fma_min_rows %lld\n",
                static_cast<long long>(moekit::amx_min_rows()),
                static_cast<long long>(moekit::bf16_fma_min_rows()));
    return;
  }
  FakeArgs a;
  a.width = 3;
  moekit::choose("fake", fake_impls(), a, MOEKIT_ISA_AVX512);  // skips amx, refuses avx512
  a.width = 16;
  moekit::choose("fake", fake_impls(), a, MOEKIT_ISA_SCALAR);
  std::printf("effective %s\n", moekit_isa_name(moekit_effective_isa()));
}

TEST(DebugLog, SkipLinesGiveTheReason) {
  const Output o = run("MOEKIT_LOG=debug MOEKIT_DISPATCH_TEST_CHILD=1", "'" + self_exe() + "'");
  ASSERT_EQ(o.status, 0) << o.err;
  EXPECT_NE(o.err.find("moekit: fake: skip fake_amx_wide (needs amx, effective level is avx512)"),
            std::string::npos)
      << o.err;
  EXPECT_NE(o.err.find("moekit: fake: skip fake_avx512_even (width is odd)"), std::string::npos)
      << o.err;
  EXPECT_NE(o.err.find("moekit: fake: chose fake_avx2"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("moekit: fake: skip fake_avx2 (needs avx2, effective level is scalar)"),
            std::string::npos)
      << o.err;
  EXPECT_NE(o.err.find("moekit: fake: chose fake_scalar_wide"), std::string::npos) << o.err;
  // Without MOEKIT_LOG the child says nothing on stderr.
  const Output quiet = run("MOEKIT_DISPATCH_TEST_CHILD=1", "'" + self_exe() + "'");
  EXPECT_EQ(quiet.err.find("moekit:"), std::string::npos) << quiet.err;
}

TEST(DebugLog, UnknownMoekitLogIsReportedAndIgnored) {
  for (const char* bad : {"DEBUG", "1", "info"}) {
    const Output o = run(std::string("MOEKIT_LOG=") + bad + " MOEKIT_DISPATCH_TEST_CHILD=1",
                         "'" + self_exe() + "'");
    ASSERT_EQ(o.status, 0) << o.err;
    EXPECT_NE(o.err.find(std::string("moekit: ignoring MOEKIT_LOG=") + bad + " (expected debug)"),
              std::string::npos)
        << o.err;
    EXPECT_EQ(o.err.find("chose"), std::string::npos) << o.err;
  }
}

// MOEKIT_AMX_MIN_ROWS and MOEKIT_BF16_FMA_MIN_ROWS: a row count >= 1 (or "never" for the FMA
// one) applies silently; anything else is reported and the default stays. Empty means unset
// (run() leaves these two as the caller's environment has them).
TEST(Thresholds, EnvironmentValuesAreAppliedOrReported) {
  const std::string child = "'" + self_exe() + "'";
  const std::string unset = "MOEKIT_AMX_MIN_ROWS= MOEKIT_BF16_FMA_MIN_ROWS= ";
  const Output defaults = run(unset + "MOEKIT_DISPATCH_TEST_CHILD=thresholds", child);
  ASSERT_EQ(defaults.status, 0) << defaults.err;
  EXPECT_EQ(defaults.err, "");
  const Output set = run(
      "MOEKIT_AMX_MIN_ROWS=3 MOEKIT_BF16_FMA_MIN_ROWS=never MOEKIT_DISPATCH_TEST_CHILD=thresholds",
      child);
  EXPECT_EQ(set.out,
            "amx_min_rows 3 bf16_fma_min_rows " + std::to_string(moekit::kBf16FmaNever) + "\n");
  EXPECT_EQ(set.err, "");
  for (const char* var : {"MOEKIT_AMX_MIN_ROWS", "MOEKIT_BF16_FMA_MIN_ROWS"}) {
    for (const char* bad : {"abc", "0", "-5", "nevr", "4x", "99999999999999999999"}) {
      SCOPED_TRACE(std::string(var) + "=" + bad);
      const Output o =
          run(unset + var + "=" + bad + " MOEKIT_DISPATCH_TEST_CHILD=thresholds", child);
      ASSERT_EQ(o.status, 0) << o.err;
      EXPECT_EQ(o.out, defaults.out);
      EXPECT_NE(o.err.find(std::string("moekit: ignoring ") + var + "=" + bad + " (expected"),
                std::string::npos)
          << o.err;
    }
  }
  // "never" is the FMA threshold's word only.
  const Output amx_never =
      run(unset + "MOEKIT_AMX_MIN_ROWS=never MOEKIT_DISPATCH_TEST_CHILD=thresholds", child);
  EXPECT_EQ(amx_never.out, defaults.out);
  EXPECT_NE(amx_never.err.find("ignoring MOEKIT_AMX_MIN_ROWS=never (expected an integer >= 1)"),
            std::string::npos)
      << amx_never.err;
}

TEST(DebugLog, MoekitIsaCapsAChildProcess) {
  const Output o = run("MOEKIT_ISA=scalar MOEKIT_DISPATCH_TEST_CHILD=1", "'" + self_exe() + "'");
  ASSERT_EQ(o.status, 0) << o.err;
  EXPECT_EQ(o.out, "effective scalar\n");
}

[[maybe_unused]] const bool g_child = [] {
  if (std::getenv("MOEKIT_DISPATCH_TEST_CHILD") == nullptr) return false;
  child_main();
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(0);
}();

}  // namespace
