// NVRTC wrapper: builds the option list, compiles, collects the log and resource report, and
// on failure saves the generated source where the error message says.
#include "runtime/nvrtc.hpp"

#include <nvrtc.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "cache/cache.hpp"
#include "deft/ir.hpp"

namespace deft::nvrtc {

namespace {

std::atomic<long long> g_compiles{0};

// The toolkit headers NVRTC needs (cuda_fp16.h, mma.h): $DEFT_CUDA_INCLUDE, $CUDA_HOME/include,
// $CUDA_PATH/include, the build's toolkit, /usr/local/cuda/include.
std::string cuda_include_dir() {
  namespace fs = std::filesystem;
  std::vector<std::string> candidates;
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v && *v ? v : "";
  };
  if (auto v = env("DEFT_CUDA_INCLUDE"); !v.empty()) candidates.push_back(v);
  if (auto v = env("CUDA_HOME"); !v.empty()) candidates.push_back(v + "/include");
  if (auto v = env("CUDA_PATH"); !v.empty()) candidates.push_back(v + "/include");
  candidates.push_back(DEFT_CUDA_INCLUDE_DIR);
  candidates.push_back("/usr/local/cuda/include");
  for (auto& c : candidates) {
    std::error_code ec;
    if (fs::exists(fs::path(c) / "mma.h", ec) && fs::exists(fs::path(c) / "cuda_fp16.h", ec))
      return c;
  }
  throw Error(fmt::format("cannot find the CUDA toolkit headers (mma.h, cuda_fp16.h) NVRTC "
                          "needs; looked in: {}. Set DEFT_CUDA_INCLUDE or CUDA_HOME.",
                          fmt::join(candidates, ", ")));
}

void check(nvrtcResult r, const char* what) {
  if (r != NVRTC_SUCCESS) throw Error(fmt::format("{}: {}", what, nvrtcGetErrorString(r)));
}

std::string save_failed_source(const std::string& source) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path dir = fs::temp_directory_path(ec) / "deft-failed";
  fs::create_directories(dir, ec);
  fs::path path = dir / (cache::sha256_hex(source).substr(0, 16) + ".cu");
  std::ofstream(path) << source;
  return path.string();
}

}  // namespace

std::vector<std::string> options_for(int arch, bool ptx, const std::vector<std::string>& extra,
                                     bool arch_specific) {
  std::vector<std::string> o;
  const char* suffix = arch_specific ? "a" : "";
  o.push_back(ptx ? fmt::format("--gpu-architecture=compute_{}{}", arch, suffix)
                  : fmt::format("--gpu-architecture=sm_{}{}", arch, suffix));
  o.push_back("--std=c++17");
  o.push_back("-default-device");
  o.push_back("--extra-device-vectorization");
  o.push_back("-I" + cuda_include_dir());
  if (!ptx) o.push_back("--ptxas-options=-v");
  for (auto& e : extra) o.push_back(e);
  return o;
}

Result compile(const std::string& source, const std::string& name, int arch, bool ptx,
               const std::vector<std::string>& extra, bool arch_specific) {
  Result r;
  r.options = options_for(arch, ptx, extra, arch_specific);
  nvrtcProgram prog;
  check(nvrtcCreateProgram(&prog, source.c_str(), name.c_str(), 0, nullptr, nullptr),
        "nvrtcCreateProgram");
  std::vector<const char*> opts;
  for (auto& o : r.options) opts.push_back(o.c_str());
  ++g_compiles;
  nvrtcResult res = nvrtcCompileProgram(prog, static_cast<int>(opts.size()), opts.data());
  size_t log_size = 0;
  nvrtcGetProgramLogSize(prog, &log_size);
  r.log.resize(log_size);
  if (log_size) nvrtcGetProgramLog(prog, r.log.data());
  while (!r.log.empty() && (r.log.back() == '\0' || r.log.back() == '\n')) r.log.pop_back();
  if (res != NVRTC_SUCCESS) {
    nvrtcDestroyProgram(&prog);
    std::string path = save_failed_source(source);
    throw Error(fmt::format("NVRTC failed to compile {} ({}).\noptions: {}\nsource saved to: "
                            "{}\nlog:\n{}",
                            name, nvrtcGetErrorString(res), fmt::join(r.options, " "), path,
                            r.log));
  }
  if (ptx) {
    size_t n = 0;
    check(nvrtcGetPTXSize(prog, &n), "nvrtcGetPTXSize");
    r.ptx.resize(n);
    check(nvrtcGetPTX(prog, r.ptx.data()), "nvrtcGetPTX");
    while (!r.ptx.empty() && r.ptx.back() == '\0') r.ptx.pop_back();
  } else {
    size_t n = 0;
    check(nvrtcGetCUBINSize(prog, &n), "nvrtcGetCUBINSize");
    r.cubin.resize(n);
    check(nvrtcGetCUBIN(prog, r.cubin.data()), "nvrtcGetCUBIN");
  }
  nvrtcDestroyProgram(&prog);
  spdlog::debug("nvrtc: compiled {} for {} ({} bytes)", name, r.options.front(),
                ptx ? r.ptx.size() : r.cubin.size());
  return r;
}

std::string version() {
  int major = 0, minor = 0;
  nvrtcVersion(&major, &minor);
  return fmt::format("{}.{}", major, minor);
}

long long compile_count() { return g_compiles.load(); }

}  // namespace deft::nvrtc
