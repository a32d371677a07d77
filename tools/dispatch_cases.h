// The MiniMax-M2 (and DeepSeek-V3 routing) cases moekit-info reports dispatch choices for.
#ifndef MOEKIT_TOOLS_DISPATCH_CASES_H_
#define MOEKIT_TOOLS_DISPATCH_CASES_H_

#include <string>
#include <vector>

namespace moekit_tools {

struct ChosenImpl {
  std::string op;
  std::string case_name;  // e.g. "minimax_m2 decode M=1"
  std::string dtype;      // the dtype the case varies (activations, or weights for fused_moe)
  std::string impl;
  std::string note = {};  // how the implementation splits the case further, or empty
};

// Asks each op's dispatch table which implementation it would take for each case at the
// effective level. Only shapes and dtypes are described: nothing is computed.
std::vector<ChosenImpl> choose_for_minimax_cases();

}  // namespace moekit_tools

#endif  // MOEKIT_TOOLS_DISPATCH_CASES_H_
