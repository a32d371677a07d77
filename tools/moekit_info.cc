// moekit-info: what this machine has and which kernel each op gets on MiniMax-M2 shapes.
// `--json` prints the same report as one JSON object.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dispatch/cpu_features.h"
#include "dispatch/runtime.h"
#include "moekit/moekit.h"
#include "tools/dispatch_cases.h"

using moekit::cpu_features;

int main(int argc, char** argv) {
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) {
      json = true;
    } else if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("usage: moekit-info [--json]\n"
                  "Prints the CPU, its dispatch level, the hwloc topology, every registered\n"
                  "implementation of every op, and the one each op chooses on MiniMax-M2 shapes.\n"
                  "MOEKIT_ISA=<level> caps the level; MOEKIT_LOG=debug explains each choice.\n");
      return 0;
    } else {
      std::fprintf(stderr, "moekit-info: unknown argument '%s' (try --help)\n", argv[i]);
      return 2;
    }
  }

  const moekit::CpuFeatures& f = cpu_features();
  const moekit::Topology& topo = moekit::topology();
  nlohmann::ordered_json report;
  report["version"] = moekit_version();
  report["cpu"] = {{"vendor", f.vendor}, {"brand", f.brand}};
  nlohmann::ordered_json features;
  const std::pair<const char*, bool> flags[] = {
      {"avx2", f.avx2}, {"fma", f.fma}, {"f16c", f.f16c}, {"bmi1", f.bmi1}, {"bmi2", f.bmi2}, {"lzcnt", f.lzcnt}, {"avx512f", f.avx512f},
      {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl}, {"avx512dq", f.avx512dq},
      {"avx512_bf16", f.avx512_bf16}, {"avx512_vnni", f.avx512_vnni}, {"avx512_vbmi", f.avx512_vbmi}, {"amx_tile", f.amx_tile},
      {"amx_bf16", f.amx_bf16}, {"amx_int8", f.amx_int8}, {"os_avx", f.os_avx},
      {"os_avx512", f.os_avx512}, {"os_amx", f.os_amx}, {"amx_permitted", f.amx_permitted}};
  for (const auto& flag : flags) features[flag.first] = flag.second;
  report["features"] = features;
  report["detected_level"] = moekit_isa_name(moekit_detected_isa());
  report["effective_level"] = moekit_isa_name(moekit_effective_isa());
  report["threads"] = moekit_num_threads();
  report["topology"] = {{"source", topo.from_hwloc ? "hwloc" : "omp"},
                        {"packages", topo.packages},
                        {"numa_nodes", topo.numa_nodes},
                        {"cores", topo.cores},
                        {"hardware_threads", topo.pus},
                        {"l2_bytes_per_core", topo.l2_bytes},
                        {"l3_bytes", topo.l3_bytes}};

  const std::vector<moekit_tools::ChosenImpl> chosen = moekit_tools::choose_for_minimax_cases();
  nlohmann::ordered_json ops = nlohmann::ordered_json::array();
  for (int i = 0; i < moekit_op_count(); ++i) {
    const char* op = moekit_op_name(i);
    nlohmann::ordered_json entry;
    entry["op"] = op;
    nlohmann::ordered_json impls = nlohmann::ordered_json::array();
    for (int j = 0; j < moekit_impl_count(op); ++j) {
      const char* name;
      moekit_isa level;
      moekit_impl_info(op, j, &name, &level);
      impls.push_back({{"name", name}, {"level", moekit_isa_name(level)}});
    }
    entry["implementations"] = impls;
    nlohmann::ordered_json picks = nlohmann::ordered_json::array();
    for (const auto& c : chosen)
      if (c.op == op) {
        nlohmann::ordered_json pick = {{"case", c.case_name}, {"dtype", c.dtype}, {"name", c.impl}};
        if (!c.note.empty()) pick["note"] = c.note;
        picks.push_back(pick);
      }
    entry["chosen"] = picks;
    ops.push_back(entry);
  }
  report["ops"] = ops;

  if (json) {
    std::printf("%s\n", report.dump(2).c_str());
    return 0;
  }
  std::printf("moekit %s\n", moekit_version());
  std::printf("CPU            %s (%s)\n", f.brand.c_str(), f.vendor.c_str());
  std::printf("features      ");
  for (const auto& flag : flags)
    if (flag.second) std::printf(" %s", flag.first);
  std::printf("\nlevel          detected %s, effective %s\n", moekit_isa_name(moekit_detected_isa()),
              moekit_isa_name(moekit_effective_isa()));
  std::printf("topology       %d package(s), %d NUMA node(s), %d core(s), %d hardware thread(s), "
              "L2 %lld KiB/core, L3 %lld KiB (%s)\n",
              topo.packages, topo.numa_nodes, topo.cores, topo.pus,
              static_cast<long long>(topo.l2_bytes / 1024), static_cast<long long>(topo.l3_bytes / 1024),
              topo.from_hwloc ? "hwloc" : "no hwloc");
  std::printf("threads        %d\n\n", moekit_num_threads());
  for (const auto& entry : ops) {
    std::printf("%s\n", entry["op"].get<std::string>().c_str());
    for (const auto& impl : entry["implementations"])
      std::printf("    %-36s needs %s\n", impl["name"].get<std::string>().c_str(),
                  impl["level"].get<std::string>().c_str());
    for (const auto& pick : entry["chosen"]) {
      std::printf("  -> %-40s %-5s %s\n", pick["case"].get<std::string>().c_str(),
                  pick["dtype"].get<std::string>().c_str(), pick["name"].get<std::string>().c_str());
      if (pick.contains("note")) std::printf("       %s\n", pick["note"].get<std::string>().c_str());
    }
  }
  return 0;
}
