// After `deft tune model.json`: a fresh process compiles every layer of the model and reports
// how long each deft::compile call took, whether its variant came from a tuning record, and
// how many NVRTC compiles the process made (0 expected: every cubin from the database).
//
//   deft_load_tuned examples/resnet50_dcn.json [--db PATH]
//
// The CUDA context is created first (cudaFree(0)) and not counted: that cost is the
// driver's, paid once per process whatever library runs the first kernel.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>
#include <algorithm>
#include <string>

#include "deft/deft.hpp"
#include "deft/tuning.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s model.json [--db PATH]\n", argv[0]);
    return 2;
  }
  std::string db;
  for (int i = 2; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--db") == 0) db = argv[i + 1];
  try {
    if (!deft::gpu_available()) {
      std::printf("no GPU: nothing to load\n");
      return 0;
    }
    cudaFree(nullptr);  // the context, outside the timings
    const deft::Model model = deft::load_model(argv[1]);
    // each layer's sigma as `deft tune` derives it (stats in the file, else the default 2)
    std::vector<double> sigmas;
    for (const auto& l : model.layers) sigmas.push_back(l.stats ? deft::offset_sigma(*l.stats) : 2.0);
    const auto entries = deft::tune_entries(model, sigmas);
    double worst_ms = 0;
    int tuned = 0;
    std::printf("%-8s %-9s %-6s %s\n", "ms", "record", "cache", "layer [variant]");
    for (const auto& e : entries) {
      deft::CompileOptions o;
      if (!db.empty()) o.cache_path = db;
      o.stats_bucket = e.bucket;
      const auto t0 = std::chrono::steady_clock::now();
      const deft::Kernel k = deft::compile(e.desc, o);
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      const bool from_record = !(k.variant() == deft::default_variant(e.desc));
      tuned += from_record;
      worst_ms = std::max(worst_ms, ms);
      std::printf("%-8.2f %-9s %-6s %s [%s]\n", ms, from_record ? "tuned" : "default",
                  k.info().from_cache ? "hit" : "NVRTC", model.layers[e.layers[0]].name.c_str(),
                  deft::to_string(k.variant()).c_str());
    }
    const deft::Stats s = deft::stats();
    std::printf("%zu layers, %d with a tuned (non-default) variant, slowest compile %.2f ms, "
                "NVRTC compiles %lld, cache hits %lld\n",
                entries.size(), tuned, worst_ms, (long long)s.nvrtc_compiles,
                (long long)s.cache_hits);
    return s.nvrtc_compiles == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "deft_load_tuned: %s\n", e.what());
    return 1;
  }
}
