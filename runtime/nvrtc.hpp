// NVRTC: CUDA source -> CUBIN (exact sm_XY) or PTX. No GPU needed. Internal to libdeft.
#pragma once

#include <string>
#include <vector>

namespace deft::nvrtc {

struct Result {
  std::vector<char> cubin;     // empty when PTX was asked for
  std::string ptx;
  std::string log;             // NVRTC log, including the ptxas -v resource lines
  std::vector<std::string> options;
};

// The options deft passes to NVRTC for an architecture (e.g. 90), followed by `extra`;
// arch_specific targets sm_90a / compute_90a (the instructions of that family alone, wgmma).
std::vector<std::string> options_for(int arch, bool ptx, const std::vector<std::string>& extra,
                                     bool arch_specific = false);

// Compiles. On failure throws deft::Error with the log, the options and the path where the
// source was saved.
Result compile(const std::string& source, const std::string& name, int arch, bool ptx,
               const std::vector<std::string>& extra_options, bool arch_specific = false);

// "13.0"
std::string version();

// Programs compiled by this process.
long long compile_count();

}  // namespace deft::nvrtc
