// The `deft` command line: compile a layer description and show what deft makes of it
// (generated CUDA, PTX, SASS, resources, the cubin), and look after the cubin cache.
// Everything it shows comes from libdeft; the CLI only parses arguments and prints.
//
//   deft compile '<desc>' [--variant '<variant>'] [--arch sm_90]
//                         [--emit cuda|ptx|sass|resources|cubin] [-o FILE] [--stats]
//   deft cache ls|info|clear [--db PATH]
//   deft cache export|import FILE [--db PATH]
//   deft tune '<desc>'|model.json ... [--calibration DIR] [--devices 0,1] [--budget S] [--db PATH]
//   deft inspect '<desc>' [--db PATH]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cache/cache.hpp"
#include "deft/deft.hpp"
#include "deft/tuning.hpp"
#include "runtime/disasm.hpp"
#include "runtime/driver.hpp"
#include "runtime/logging.hpp"
#include "runtime/nvrtc.hpp"
#include "tuner/select.hpp"

extern char** environ;

namespace {

namespace fs = std::filesystem;

// ---- logging ---------------------------------------------------------------------------------

// Logs go to stderr so that stdout carries only what was asked for (source, PTX, SASS...).
// Level: -v info, -vv debug, -vvv trace; without -v, DEFT_LOG_LEVEL; else warn.
void setup_logging(int verbosity) {
  auto logger = spdlog::stderr_color_mt("deft");
  logger->set_pattern("deft: %^%l%$: %v");
  spdlog::set_default_logger(logger);
  deft::init_logging();  // applies DEFT_LOG_LEVEL (or warn) to the logger just installed
  if (verbosity >= 3) spdlog::set_level(spdlog::level::trace);
  else if (verbosity == 2) spdlog::set_level(spdlog::level::debug);
  else if (verbosity == 1) spdlog::set_level(spdlog::level::info);
}

// ---- output ----------------------------------------------------------------------------------

void write_output(const std::string& text, const std::string& path) {
  if (path.empty() || path == "-") {
    std::fwrite(text.data(), 1, text.size(), stdout);
    if (!text.empty() && text.back() != '\n') std::fputc('\n', stdout);
    std::fflush(stdout);
    return;
  }
  std::ofstream f(path, std::ios::binary);
  if (!f) throw deft::Error(fmt::format("cannot open {} for writing", path));
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  if (!f) throw deft::Error(fmt::format("cannot write {}", path));
  spdlog::info("wrote {} bytes to {}", text.size(), path);
}

// ---- compile ---------------------------------------------------------------------------------

struct CompileArgs {
  std::string desc;
  std::string variant;
  std::string arch;
  std::string emit = "resources";
  std::string output;
  std::string db;
  bool no_cache = false;
  bool stats = false;
  bool deterministic = false;
};

// "sm_90" or "90" -> 90.
int parse_arch(const std::string& text) {
  static const std::regex re(R"((?:sm_)?(\d{2,3}))");
  std::smatch m;
  if (!std::regex_match(text, m, re))
    throw deft::Error(fmt::format("--arch {} is not of the form sm_XY (e.g. sm_90)", text));
  return std::stoi(m[1]);
}

// The current device's architecture when a GPU is present, else sm_90.
int default_arch() {
  if (deft::gpu_available()) {
    try {
      CUdevice dev = 0;
      deft::driver::check(deft::driver::api().cuDeviceGet(&dev, 0), "cuDeviceGet");
      const int arch = deft::driver::device_info(dev).arch();
      spdlog::info("no --arch: compiling for this machine's GPU, sm_{}", arch);
      return arch;
    } catch (const deft::Error& e) {
      spdlog::warn("cannot query the GPU ({}); compiling for sm_90", e.what());
    }
  } else {
    spdlog::info("no --arch and no GPU: compiling for sm_90");
  }
  return 90;
}

// The figures ptxas -v reports for one entry function. -1: not reported.
struct PtxasFigures {
  int registers = -1, barriers = -1;
  long long shared = -1, stack = -1, spill_stores = -1, spill_loads = -1;
  bool found = false;
};

PtxasFigures parse_ptxas_report(const std::string& report, const std::string& kernel) {
  PtxasFigures f;
  static const std::regex entry(R"(Compiling entry function '([^']+)')");
  static const std::regex frame(
      R"((\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads)");
  static const std::regex used(R"(Used (\d+) registers)");
  static const std::regex barriers(R"(used (\d+) barriers)");
  static const std::regex smem(R"((\d+) bytes smem)");
  bool inside = false;
  size_t start = 0;
  while (start < report.size()) {
    size_t end = report.find('\n', start);
    if (end == std::string::npos) end = report.size();
    const std::string line = report.substr(start, end - start);
    start = end + 1;
    std::smatch m;
    if (std::regex_search(line, m, entry)) {
      inside = m[1] == kernel;
      f.found = f.found || inside;
      continue;
    }
    if (!inside) continue;
    if (std::regex_search(line, m, frame)) {
      f.stack = std::stoll(m[1]);
      f.spill_stores = std::stoll(m[2]);
      f.spill_loads = std::stoll(m[3]);
    }
    if (std::regex_search(line, m, used)) f.registers = std::stoi(m[1]);
    if (std::regex_search(line, m, barriers)) f.barriers = std::stoi(m[1]);
    if (line.find("Used ") != std::string::npos) {
      // "smem" on the "Used" line; a kernel without shared memory reports none.
      f.shared = std::regex_search(line, m, smem) ? std::stoll(m[1]) : 0;
    }
  }
  return f;
}

std::string bytes_or_unknown(long long v) {
  return v < 0 ? std::string("unknown") : fmt::format("{} bytes", v);
}

std::string resource_summary(const deft::LayerDesc& desc, const deft::Variant& variant,
                             const deft::CompileInfo& info) {
  std::string s;
  auto row = [&](const char* key, const std::string& value) {
    s += fmt::format("{:<15}{}\n", std::string(key) + ":", value);
  };
  row("kernel", info.kernel_name);
  row("layer", deft::to_string(desc));
  row("variant", deft::to_string(variant));
  row("arch", fmt::format("sm_{}", info.arch));
  const PtxasFigures p = parse_ptxas_report(info.resource_report, info.kernel_name);
  if (p.found) {
    row("registers", p.registers < 0 ? "unknown" : std::to_string(p.registers));
    row("barriers", p.barriers < 0 ? "0" : std::to_string(p.barriers));
    row("shared memory", bytes_or_unknown(p.shared));
    row("stack frame", bytes_or_unknown(p.stack));
    row("spill stores", bytes_or_unknown(p.spill_stores));
    row("spill loads", bytes_or_unknown(p.spill_loads));
  } else {
    // No ptxas report: a cache hit (NVRTC did not run), or NVRTC took the code from the
    // driver's JIT cache (CUDA 13 on a machine with a driver). The cubin itself records
    // registers, shared memory and stack, not spills or barriers.
    const deft::disasm::KernelResources r =
        deft::disasm::kernel_resources(info.cubin, info.kernel_name);
    row("registers", r.registers < 0 ? "unknown" : std::to_string(r.registers));
    row("shared memory", bytes_or_unknown(r.shared_bytes));
    row("stack frame", bytes_or_unknown(r.stack_bytes));
    row("spills", info.from_cache
                      ? "not recorded in a cached cubin (--no-cache shows the ptxas report)"
                      : "not reported (NVRTC's log has no ptxas -v lines: the driver's JIT cache "
                        "served the code; --no-cache shows them)");
  }
  // Other kernels of the same cubin (helpers such as a layout transpose), briefly.
  for (const std::string& other : deft::disasm::kernel_names(info.cubin)) {
    if (other == info.kernel_name) continue;
    const PtxasFigures o = parse_ptxas_report(info.resource_report, other);
    int registers = o.registers;
    long long shared = o.shared;
    if (!o.found) {
      const deft::disasm::KernelResources r = deft::disasm::kernel_resources(info.cubin, other);
      registers = r.registers;
      shared = r.shared_bytes;
    }
    row("other kernel", fmt::format("{}: {} registers, {} shared memory", other,
                                    registers < 0 ? "unknown" : std::to_string(registers),
                                    bytes_or_unknown(shared)));
  }
  // From the plan: shared memory the launch adds to the static figure above, scratch per call.
  if (!info.shared_layout.empty()) row("smem layout", info.shared_layout);
  row("dynamic smem", fmt::format("{} bytes (set at launch)", info.dynamic_shared_bytes));
  if (info.workspace_bytes > 0) row("workspace", fmt::format("{} bytes per call", info.workspace_bytes));
  row("cubin size", fmt::format("{} bytes", info.cubin.size()));
  row("cache", info.from_cache
                   ? fmt::format("hit (key {})", info.cache_key.substr(0, 16))
                   : fmt::format("miss (compiled with NVRTC {} in {:.2f} s)",
                                 deft::nvrtc::version(), info.compile_seconds));
  return s;
}

int run_compile(const CompileArgs& a) {
  // With a driver present, CUDA 13's NVRTC may take the machine code from the driver's JIT
  // cache and then reports no ptxas -v lines; --no-cache means a full compile.
  if (a.no_cache) ::setenv("CUDA_CACHE_DISABLE", "1", 1);
  const deft::LayerDesc desc = deft::parse_layer_desc(a.desc);
  deft::require_implemented(desc);
  deft::CompileOptions options;
  if (!a.variant.empty()) options.variant = deft::parse_variant(a.variant);
  if (a.no_cache) options.cache_path = "";
  else if (!a.db.empty()) options.cache_path = a.db;
  // The default variant depends on the architecture (gemm_wgmma on sm_90).
  options.arch = a.arch.empty() ? default_arch() : parse_arch(a.arch);
  if (a.deterministic && desc.pass == deft::Pass::forward)
    throw deft::Error("--deterministic applies to the backward passes (pass=backward_data or "
                      "pass=backward_weight); the forward has no atomics");
  options.deterministic = a.deterministic;
  deft::Variant variant = deft::tuner::choose_variant(desc, options);
  // as deft::compile does: a backward pass's kernel is compiled in the requested mode (det=1)
  if (desc.pass != deft::Pass::forward) {
    if (a.deterministic) variant.deterministic = true;
    options.variant = variant;
  }
  deft::validate(desc, variant);
  spdlog::debug("layer:   {}", deft::to_string(desc));
  spdlog::debug("variant: {}", deft::to_string(variant));

  if (a.emit == "cuda") {
    write_output(deft::generate_source(desc, variant), a.output);
  } else {
    if (a.emit == "cubin" && (a.output.empty() || a.output == "-"))
      throw deft::Error("--emit cubin writes a binary file: give it with -o FILE");
    if (a.emit == "ptx") {
      write_output(deft::emit_ptx(desc, options), a.output);
    } else {
      const deft::CompileInfo info = deft::compile_offline(desc, options);
      if (!info.resource_report.empty()) spdlog::debug("NVRTC log:\n{}", info.resource_report);
      if (a.emit == "resources") {
        write_output(resource_summary(desc, variant, info), a.output);
      } else if (a.emit == "sass") {
        // The summary follows as comment lines, after the SASS.
        std::string text = deft::disasm::sass(info.cubin);
        text += "\n// ---- resources ----\n";
        const std::string summary = resource_summary(desc, variant, info);
        for (size_t i = 0; i < summary.size();) {
          const size_t end = summary.find('\n', i);
          text += "// " + summary.substr(i, end - i) + "\n";
          i = end == std::string::npos ? summary.size() : end + 1;
        }
        write_output(text, a.output);
      } else {  // cubin
        write_output(std::string(info.cubin.begin(), info.cubin.end()), a.output);
      }
    }
  }
  const deft::Stats st = deft::stats();
  const std::string line =
      fmt::format("nvrtc compiles: {}, cache hits: {}", st.nvrtc_compiles, st.cache_hits);
  if (a.stats) fmt::print(stderr, "{}\n", line);
  else spdlog::info("{}", line);
  return 0;
}

// ---- cache -----------------------------------------------------------------------------------

std::string database_path(const std::string& db) {
  return db.empty() ? deft::cache::default_database_path() : db;
}

// Opens an existing database; nullptr (after saying so) when there is none at the path, so that
// looking at the cache never creates one.
std::shared_ptr<deft::cache::Database> open_existing(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    fmt::print("no database at {}\n", path);
    return nullptr;
  }
  return deft::cache::Database::open(path);
}

std::string human_bytes(int64_t n) {
  if (n < 10 * 1024) return fmt::format("{} B", n);
  if (n < 10 * 1024 * 1024) return fmt::format("{:.1f} KiB", n / 1024.0);
  return fmt::format("{:.1f} MiB", n / (1024.0 * 1024.0));
}

int run_cache_ls(const std::string& db_arg) {
  const std::string path = database_path(db_arg);
  auto db = open_existing(path);
  if (!db) return 0;
  const auto entries = db->list_cubins();
  if (entries.empty()) {
    fmt::print("no cubins in {}\n", path);
    return 0;
  }
  fmt::print("{:<14}{:<8}{:>11}  {:<21}{}\n", "KEY", "ARCH", "SIZE", "CREATED", "LAYER");
  for (const auto& e : entries)
    fmt::print("{:<14}{:<8}{:>11}  {:<21}{}\n", e.key.substr(0, 12), e.arch, human_bytes(e.size),
               e.created_at, e.desc);
  fmt::print("{} cubin{} in {}\n", entries.size(), entries.size() == 1 ? "" : "s", path);
  return 0;
}

int run_cache_info(const std::string& db_arg) {
  const std::string path = database_path(db_arg);
  auto db = open_existing(path);
  if (!db) return 0;
  const deft::cache::DatabaseInfo i = db->info();
  fmt::print("path:           {}\n", i.path);
  fmt::print("schema version: {}\n", i.schema_version);
  fmt::print("cubins:         {} ({})\n", i.cubins, human_bytes(i.cubin_bytes));
  fmt::print("tuning records: {}\n", i.tuning_records);
  fmt::print("file size:      {}\n", human_bytes(i.file_bytes));
  return 0;
}

int run_cache_clear(const std::string& db_arg) {
  const std::string path = database_path(db_arg);
  auto db = open_existing(path);
  if (!db) return 0;
  const deft::cache::DatabaseInfo before = db->info();
  db->clear();
  fmt::print("cleared {} cubin{} and {} tuning record{} from {}\n", before.cubins,
             before.cubins == 1 ? "" : "s", before.tuning_records,
             before.tuning_records == 1 ? "" : "s", path);
  return 0;
}

// deft cache export: every tuning record, with all candidates, as JSON lines.
int run_cache_export(const std::string& file, const std::string& db_arg) {
  const std::string path = database_path(db_arg);
  std::error_code ec;
  if (!fs::exists(path, ec)) throw deft::Error(fmt::format("no database at {}", path));
  const auto records = deft::cache::Database::open(path)->list_tuning_records();
  int64_t candidates = 0;
  for (const auto& r : records) candidates += int64_t(r.candidates.size());
  const std::string summary =
      fmt::format("exported {} tuning record{} ({} candidate timings) from {} to {}\n",
                  records.size(), records.size() == 1 ? "" : "s", candidates, path, file);
  if (file == "-") {
    std::ostringstream out;
    deft::cache::write_records_jsonl(out, records);
    write_output(out.str(), "");
    fmt::print(stderr, "{}", summary);
    return 0;
  }
  // Written next to the target, then renamed: an interrupted export leaves no half file.
  const std::string tmp = file + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw deft::Error(fmt::format("cannot open {} for writing", tmp));
    deft::cache::write_records_jsonl(out, records);
    out.close();
    if (!out) throw deft::Error(fmt::format("cannot write {}", tmp));
  }
  fs::rename(tmp, file, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw deft::Error(fmt::format("cannot move the export to {}", file));
  }
  fmt::print("{}", summary);
  return 0;
}

// deft cache import: merges an export into the database; newer records win.
int run_cache_import(const std::string& file, const std::string& db_arg) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw deft::Error(fmt::format("cannot open {}", file));
  const auto records = deft::cache::read_records_jsonl(in, file);
  const std::string path = database_path(db_arg);
  const auto counts = deft::cache::Database::open(path)->merge_tuning_records(records);
  fmt::print("imported {} tuning record{}, skipped {} (the database has them, or newer ones for "
             "the same layer, bucket, device and versions) from {} into {}\n",
             counts.imported, counts.imported == 1 ? "" : "s", counts.skipped, file, path);
  return 0;
}

// ---- tune --------------------------------------------------------------------------------
//
// `deft tune` takes layer descriptions and model files (arguments ending in .json). Their layers
// become entries (one per distinct description and statistics bucket, tuned once). Entries are
// tuned here, or with --devices by one worker process per device: this binary again, with
// CUDA_VISIBLE_DEVICES set and the hidden options --worker-device N --layers i,j,k, printing one
// JSON line per finished entry on its stdout. Everyone writes into the same database; this
// process prints the progress lines and the closing table.

struct TuneArgs {
  std::vector<std::string> inputs;
  double sigma = 2.0;
  double seconds = 0.25;
  int max_candidates = 0;
  std::string db;
  std::string calibration;
  std::string devices;
  double budget = 0;
  int worker_device = -1;  // >= 0: this process is a worker
  std::string worker_layers;
  bool simulate = false;
  bool window = false;  // also the staging=window variants (sm_90)
  std::string passes;  // which passes of each layer to tune ("": each layer's own)
  int verbosity = 0;
};

// What became of one entry.
struct EntryOutcome {
  bool done = false, ok = false;
  double default_us = 0, tuned_us = 0, seconds = 0;
  std::string variant, error;
  int tried = 0, space = 0, device = -1;
  std::vector<std::string> failures;  // distinct reasons of failed candidates
};

// The layers of all inputs, with the sigma of each, grouped into entries.
struct TunePlan {
  deft::Model model;                     // all layers of all inputs
  std::vector<std::string> sources;      // per layer: its model file, or "" for a desc argument
  std::vector<double> sigmas;            // per layer
  std::vector<std::string> sigma_from;   // per layer: "calibration", "stats", "default"
  std::vector<deft::TuneEntry> entries;
};

// "a,b , c" -> {"a", "b", "c"}: the comma-separated items, white space around each removed
// (an empty item stays, for the caller to refuse).
std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    out.push_back(b == std::string::npos ? "" : item.substr(b, e - b + 1));
  }
  return out;
}

bool is_model_file(const std::string& arg) {
  return arg.size() > 5 && arg.compare(arg.size() - 5, 5, ".json") == 0;
}

TunePlan make_plan(const TuneArgs& a) {
  TunePlan p;
  std::map<std::string, std::string> name_source;
  for (const std::string& input : a.inputs) {
    if (is_model_file(input)) {
      deft::Model m = deft::load_model(input);
      for (deft::ModelLayer& l : m.layers) {
        if (auto [it, fresh] = name_source.emplace(l.name, input); !fresh)
          throw deft::Error(fmt::format("layer name \"{}\" appears in both {} and {}", l.name,
                                        it->second, input));
        p.sources.push_back(input);
        p.model.layers.push_back(std::move(l));
      }
    } else {
      deft::ModelLayer l;
      l.desc = deft::parse_layer_desc(input);
      deft::validate(l.desc);
      l.name = deft::to_string(l.desc);
      p.sources.push_back("");
      p.model.layers.push_back(std::move(l));
    }
  }
  for (size_t i = 0; i < p.model.layers.size(); ++i) {
    deft::ModelLayer& l = p.model.layers[i];
    deft::require_implemented(l.desc);
    if (!a.calibration.empty() && !p.sources[i].empty()) {
      const std::string file = (fs::path(a.calibration) / (l.name + ".offsets.f32")).string();
      try {
        l.stats = deft::offset_stats_from_file(l.desc, file);
      } catch (const deft::Error& e) {
        throw deft::Error(fmt::format("layer {} ({}): {}", l.name, p.sources[i], e.what()));
      }
      p.sigma_from.push_back("calibration");
      spdlog::info("{}: calibration {} samples, |dy| p50 {:.3g} p99 {:.3g}, |dx| p50 {:.3g} p99 "
                   "{:.3g}, outside {:.3g}, sigma {:.3g}",
                   l.name, l.stats->samples, l.stats->abs_dy.p50, l.stats->abs_dy.p99,
                   l.stats->abs_dx.p50, l.stats->abs_dx.p99, l.stats->outside_fraction,
                   deft::offset_sigma(*l.stats));
    } else {
      p.sigma_from.push_back(l.stats ? "stats" : "default");
    }
    p.sigmas.push_back(l.stats ? deft::offset_sigma(*l.stats) : a.sigma);
  }
  // --passes: each entry once per pass asked for (layers in order, their passes in the order
  // given); a pass a layer has no kernel for (no backward for a fused activation) is left out.
  // Without it, each layer's own pass (a description's pass=, a model file's forward).
  if (a.passes.empty()) {
    p.entries = deft::tune_entries(p.model, p.sigmas);
    return p;
  }
  std::vector<deft::Pass> passes;
  for (const std::string& name : split_list(a.passes)) {
    deft::Pass pass;
    if (name == "forward") pass = deft::Pass::forward;
    else if (name == "backward_data") pass = deft::Pass::backward_data;
    else if (name == "backward_weight") pass = deft::Pass::backward_weight;
    else
      throw deft::Error(fmt::format("--passes: '{}' is not forward, backward_data or "
                                    "backward_weight", name));
    if (std::find(passes.begin(), passes.end(), pass) == passes.end()) passes.push_back(pass);
  }
  if (passes.empty()) throw deft::Error("--passes: name at least one pass");
  for (const deft::TuneEntry& e : deft::tune_entries(p.model, p.sigmas))
    for (deft::Pass pass : passes) {
      deft::TuneEntry pe = e;
      pe.desc.pass = pass;
      try {
        deft::require_implemented(pe.desc);
      } catch (const deft::Error& ex) {
        spdlog::warn("{}: not tuning pass={}: {}", p.model.layers[e.layers.front()].name,
                     deft::to_string(pass), ex.what());
        continue;
      }
      p.entries.push_back(pe);
    }
  return p;
}

// "layer3.0.conv2" or "layer3.0.conv2 (+3 same)".
std::string entry_name(const TunePlan& p, const deft::TuneEntry& e) {
  std::string name = p.model.layers[e.layers.front()].name;
  if (e.layers.size() > 1) name += fmt::format(" (+{} same)", e.layers.size() - 1);
  if (e.desc.pass != deft::Pass::forward) name += fmt::format(" [{}]", deft::to_string(e.desc.pass));
  return name;
}

EntryOutcome tune_entry(const TuneArgs& a, const deft::TuneEntry& e, double layer_seconds) {
  EntryOutcome out;
  out.done = true;
  out.device = a.worker_device;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    deft::TuneOptions o;
    o.offset_sigma = e.sigma;
    o.window = a.window;
    o.max_candidates = a.max_candidates;
    o.seconds_per_candidate = a.seconds;
    if (!a.db.empty()) o.cache_path = a.db;
    const deft::TuneLimits limits{layer_seconds};
    const deft::TuneResult r =
        a.simulate ? deft::simulate_tune(e.desc, o, limits) : deft::tune(e.desc, o, limits);
    out.ok = true;
    out.default_us = r.default_us;
    out.tuned_us = r.winner_us;
    out.variant = deft::to_string(r.winner);
    out.tried = int(r.candidates.size());
    out.space = int(
        deft::search_space(e.desc, deft::SearchOptions{default_arch(), a.window, e.sigma}).size());
    for (const auto& c : r.candidates)
      if (c.median_us < 0 &&
          std::find(out.failures.begin(), out.failures.end(), c.error) == out.failures.end())
        out.failures.push_back(c.error);
  } catch (const std::exception& ex) {
    out.error = ex.what();
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // A simulated run takes no time; it spends its candidates' timing windows of the budget.
  if (a.simulate && out.ok)
    out.seconds = out.tried * deft::CandidateBudget(layer_seconds, a.seconds, size_t(
                                  a.max_candidates > 0 ? std::min(a.max_candidates, out.space)
                                                       : out.space)).timing_seconds();
  return out;
}

std::string outcome_json(size_t entry, const EntryOutcome& o) {
  nlohmann::json j = {{"entry", entry},   {"ok", o.ok},           {"default_us", o.default_us},
                      {"tuned_us", o.tuned_us}, {"variant", o.variant}, {"error", o.error},
                      {"tried", o.tried}, {"space", o.space},     {"failures", o.failures},
                      {"seconds", o.seconds}, {"device", o.device}};
  return j.dump();
}

// One worker line; nullopt for anything else (a stray line is logged, not fatal).
std::optional<std::pair<size_t, EntryOutcome>> parse_outcome(const std::string& line) {
  try {
    const auto j = nlohmann::json::parse(line);
    EntryOutcome o;
    o.done = true;
    o.ok = j.at("ok").get<bool>();
    o.default_us = j.at("default_us").get<double>();
    o.tuned_us = j.at("tuned_us").get<double>();
    o.variant = j.at("variant").get<std::string>();
    o.error = j.at("error").get<std::string>();
    o.tried = j.at("tried").get<int>();
    o.space = j.at("space").get<int>();
    o.failures = j.at("failures").get<std::vector<std::string>>();
    o.seconds = j.at("seconds").get<double>();
    o.device = j.at("device").get<int>();
    return std::make_pair(j.at("entry").get<size_t>(), o);
  } catch (const std::exception& e) {
    spdlog::warn("ignoring a worker's line '{}': {}", line.substr(0, 200), e.what());
    return std::nullopt;
  }
}

std::vector<int> parse_int_list(const std::string& text, const char* option) {
  std::vector<int> out;
  for (const std::string& item : split_list(text)) {
    static const std::regex re(R"(\d{1,6})");
    if (!std::regex_match(item, re))
      throw deft::Error(fmt::format("{} {}: '{}' is not a non-negative integer", option, text, item));
    out.push_back(std::stoi(item));
  }
  if (out.empty()) throw deft::Error(fmt::format("{} is empty", option));
  return out;
}

std::string speedup(double def, double tuned) {
  return tuned > 0 ? fmt::format("{:.2f}x", def / tuned) : "-";
}

// Progress on stderr, only when it is a terminal: a bar with the percentage of entries done.
class ProgressBar {
 public:
  explicit ProgressBar(size_t total) : total_(total), tty_(::isatty(2) == 1) {}
  void show(size_t done, const std::string& note) {
    if (!tty_) return;
    constexpr int kWidth = 30;
    const int filled = total_ ? int(kWidth * done / total_) : kWidth;
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    fmt::print(stderr, "\r\033[K[{}{}] {:3d}% {}/{} layers, {:.0f} s  {}", std::string(filled, '#'),
               std::string(kWidth - filled, '.'), total_ ? int(100 * done / total_) : 100, done,
               total_, elapsed, note.substr(0, 60));
    std::fflush(stderr);
    shown_ = true;
  }
  void clear() {
    if (tty_ && shown_) fmt::print(stderr, "\r\033[K");
    std::fflush(stderr);
  }

 private:
  size_t total_;
  bool tty_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

// "[3/12] layer3.0.conv2  default 812.0 us -> tuned 640.0 us (1.27x)  variant ..."
void print_progress_line(const TunePlan& p, size_t entry, const EntryOutcome& o, size_t done) {
  const std::string name = entry_name(p, p.entries[entry]);
  const std::string device = o.device >= 0 ? fmt::format(" [device {}]", o.device) : "";
  if (!o.ok) {
    fmt::print("[{}/{}] {}{}  failed: {}\n", done, p.entries.size(), name, device, o.error);
  } else {
    fmt::print("[{}/{}] {}{}  default {:.1f} us -> tuned {:.1f} us ({})  variant {}  ({}/{} "
               "candidates, {:.1f} s)\n",
               done, p.entries.size(), name, device, o.default_us, o.tuned_us,
               speedup(o.default_us, o.tuned_us), o.variant, o.tried, o.space, o.seconds);
    for (const auto& why : o.failures) fmt::print("      candidate failed: {}\n", why.substr(0, 160));
  }
  std::fflush(stdout);
}

void print_table(const TunePlan& p, const std::vector<EntryOutcome>& outcomes) {
  size_t w = p.entries.size() > 1 ? 19 : 5;  // "total (times count)"
  for (const auto& e : p.entries) w = std::max(w, entry_name(p, e).size());
  w = std::min<size_t>(w, 100);
  fmt::print("\n{:<{}}  {:>5}  {:>12}  {:>12}  {:>7}  {:<14}  {}\n", "layer", w, "count",
             "default us", "tuned us", "speedup", "bucket", "chosen variant");
  double total_default = 0, total_tuned = 0;
  bool complete = true;
  for (size_t i = 0; i < p.entries.size(); ++i) {
    const auto& e = p.entries[i];
    const EntryOutcome& o = outcomes[i];
    if (!o.ok) {
      complete = false;
      fmt::print("{:<{}}  {:>5}  {:>12}  {:>12}  {:>7}  {:<14}  failed: {}\n", entry_name(p, e), w,
                 e.count, "-", "-", "-", e.bucket, o.done ? o.error : "not run");
      continue;
    }
    total_default += double(e.count) * o.default_us;
    total_tuned += double(e.count) * o.tuned_us;
    fmt::print("{:<{}}  {:>5}  {:>12.1f}  {:>12.1f}  {:>7}  {:<14}  {}\n", entry_name(p, e), w,
               e.count, o.default_us, o.tuned_us, speedup(o.default_us, o.tuned_us), e.bucket,
               o.variant);
  }
  if (complete && p.entries.size() > 1)
    fmt::print("{:<{}}  {:>5}  {:>12.1f}  {:>12.1f}  {:>7}\n", "total (times count)", w, "",
               total_default, total_tuned, speedup(total_default, total_tuned));
}

// A spawned worker: its pid and the read end of its stdout.
struct Worker {
  int device = 0;
  pid_t pid = -1;
  int fd = -1;
  std::string buffer;
  std::vector<size_t> entries;
};

std::vector<std::string> worker_argv(const TuneArgs& a, int device, const std::vector<size_t>& entries) {
  std::vector<std::string> v = {"tune"};
  v.insert(v.end(), a.inputs.begin(), a.inputs.end());
  v.insert(v.end(), {"--sigma", fmt::format("{}", a.sigma), "--seconds",
                     fmt::format("{}", a.seconds), "--max-candidates",
                     std::to_string(a.max_candidates), "--db", a.db, "--worker-device",
                     std::to_string(device), "--layers", fmt::format("{}", fmt::join(entries, ","))});
  if (!a.calibration.empty()) v.insert(v.end(), {"--calibration", a.calibration});
  if (a.budget > 0) v.insert(v.end(), {"--budget", fmt::format("{}", a.budget)});
  if (a.simulate) v.push_back("--simulate");
  if (a.window) v.push_back("--window");
  if (!a.passes.empty()) v.insert(v.end(), {"--passes", a.passes});
  for (int i = 0; i < a.verbosity; ++i) v.push_back("-v");
  return v;
}

void spawn_worker(Worker& w, const std::vector<std::string>& args) {
  int fds[2];
  if (::pipe(fds) != 0) throw deft::Error(fmt::format("pipe: {}", std::strerror(errno)));
  std::vector<std::string> argv = {"/proc/self/exe"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "CUDA_VISIBLE_DEVICES=", 21) != 0) env.push_back(*e);
  env.push_back(fmt::format("CUDA_VISIBLE_DEVICES={}", w.device));
  std::vector<char*> cargv, cenv;
  for (auto& s : argv) cargv.push_back(s.data());
  cargv.push_back(nullptr);
  for (auto& s : env) cenv.push_back(s.data());
  cenv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  posix_spawn_file_actions_addclose(&fa, fds[0]);
  posix_spawn_file_actions_addclose(&fa, fds[1]);
  const int rc = ::posix_spawn(&w.pid, "/proc/self/exe", &fa, nullptr, cargv.data(), cenv.data());
  posix_spawn_file_actions_destroy(&fa);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    throw deft::Error(fmt::format("cannot start the worker for device {}: {}", w.device,
                                  std::strerror(rc)));
  }
  w.fd = fds[0];
  spdlog::info("worker for device {} (pid {}): entries {}", w.device, w.pid, fmt::join(w.entries, ","));
}

// Runs the workers, calling on_result for every entry as it finishes; returns when all exited.
void run_workers(const TuneArgs& a, const TunePlan& p, const std::vector<int>& devices,
                 const std::function<void(size_t, EntryOutcome)>& on_result) {
  std::vector<Worker> workers;
  for (size_t d = 0; d < devices.size() && d < p.entries.size(); ++d) {
    Worker w;
    w.device = devices[d];
    for (size_t e = d; e < p.entries.size(); e += devices.size()) w.entries.push_back(e);
    workers.push_back(std::move(w));
  }
  for (Worker& w : workers) spawn_worker(w, worker_argv(a, w.device, w.entries));
  std::vector<bool> reported(p.entries.size(), false);
  size_t open = workers.size();
  while (open > 0) {
    std::vector<pollfd> fds;
    for (const Worker& w : workers)
      if (w.fd >= 0) fds.push_back({w.fd, POLLIN, 0});
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      throw deft::Error(fmt::format("poll: {}", std::strerror(errno)));
    }
    for (Worker& w : workers) {
      if (w.fd < 0) continue;
      auto it = std::find_if(fds.begin(), fds.end(), [&](const pollfd& f) { return f.fd == w.fd; });
      if (it == fds.end() || !(it->revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      const ssize_t n = ::read(w.fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n > 0) {
        w.buffer.append(buf, size_t(n));
        for (size_t nl; (nl = w.buffer.find('\n')) != std::string::npos;) {
          const std::string line = w.buffer.substr(0, nl);
          w.buffer.erase(0, nl + 1);
          if (auto r = parse_outcome(line); r && r->first < p.entries.size()) {
            reported[r->first] = true;
            on_result(r->first, std::move(r->second));
          }
        }
        continue;
      }
      ::close(w.fd);  // EOF (or a read error): the worker is done
      w.fd = -1;
      --open;
      int status = 0;
      ::waitpid(w.pid, &status, 0);
      const std::string how = WIFEXITED(status) ? fmt::format("exit status {}", WEXITSTATUS(status))
                                                : fmt::format("signal {}", WTERMSIG(status));
      for (size_t e : w.entries) {
        if (reported[e]) continue;
        EntryOutcome o;
        o.done = true;
        o.device = w.device;
        o.error = fmt::format("the worker for device {} ended ({}) before this layer finished",
                              w.device, how);
        reported[e] = true;
        on_result(e, std::move(o));
      }
    }
  }
}

int run_tune(TuneArgs a) {
  if (!a.simulate && !deft::gpu_available())
    throw deft::Error("tune needs a GPU: no CUDA driver or device here");
  if (a.budget < 0) throw deft::Error("--budget must be positive (seconds)");
  if (a.db.empty()) a.db = deft::cache::default_database_path();
  const TunePlan plan = make_plan(a);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };

  if (a.worker_device >= 0) {  // worker: tune the given entries, one JSON line each
    std::vector<size_t> mine;
    for (int e : parse_int_list(a.worker_layers, "--layers")) {
      if (size_t(e) >= plan.entries.size())
        throw deft::Error(fmt::format("--layers: entry {} does not exist ({} entries)", e,
                                      plan.entries.size()));
      mine.push_back(size_t(e));
    }
    double spent = 0;
    for (size_t k = 0; k < mine.size(); ++k) {
      const double share = a.budget > 0 ? deft::layer_share(a.budget - spent, mine.size() - k) : 0;
      const EntryOutcome o = tune_entry(a, plan.entries[mine[k]], share);
      spent += o.seconds;
      fmt::print("{}\n", outcome_json(mine[k], o));
      std::fflush(stdout);
    }
    return 0;
  }

  fmt::print("tuning {} layer{} ({} distinct) into {}{}{}\n", plan.model.layers.size(),
             plan.model.layers.size() == 1 ? "" : "s", plan.entries.size(), a.db,
             a.budget > 0 ? fmt::format(", budget {} s", a.budget) : "",
             a.simulate ? " (simulated timings, no GPU)" : "");
  std::fflush(stdout);
  std::vector<EntryOutcome> outcomes(plan.entries.size());
  ProgressBar bar(plan.entries.size());
  size_t done = 0;
  auto on_result = [&](size_t entry, EntryOutcome o) {
    outcomes[entry] = std::move(o);
    ++done;
    bar.clear();
    print_progress_line(plan, entry, outcomes[entry], done);
    bar.show(done, done < plan.entries.size() ? "tuning..." : "done");
  };
  if (!a.devices.empty()) {
    const std::vector<int> devices = parse_int_list(a.devices, "--devices");
    bar.show(0, fmt::format("{} workers", devices.size()));
    run_workers(a, plan, devices, on_result);
  } else {
    double spent = 0;  // the entries' seconds (simulated ones for --simulate)
    for (size_t k = 0; k < plan.entries.size(); ++k) {
      bar.show(done, "tuning " + entry_name(plan, plan.entries[k]));
      const double share =
          a.budget > 0 ? deft::layer_share(a.budget - spent, plan.entries.size() - k) : 0;
      EntryOutcome o = tune_entry(a, plan.entries[k], share);
      spent += o.seconds;
      on_result(k, std::move(o));
    }
  }
  bar.clear();
  print_table(plan, outcomes);
  size_t failed = 0;
  for (const auto& o : outcomes) failed += !o.ok;
  fmt::print("records written to {} in {:.1f} s\n", a.db, elapsed());
  if (failed) throw deft::Error(fmt::format("{} of {} layers failed", failed, outcomes.size()));
  return 0;
}

// The architecture in a device fingerprint "name|cc9.0|sm132" (90), 0 if it has none.
int arch_of_fingerprint(const std::string& fp) {
  const auto at = fp.find("|cc");
  int major = 0, minor = 0;
  if (at == std::string::npos || std::sscanf(fp.c_str() + at + 3, "%d.%d", &major, &minor) != 2)
    return 0;
  return 10 * major + minor;
}

// deft inspect: the tuning records of a layer, with every candidate's timing.
// deft stats: the offset statistics the tuner reads, of a calibration file (float32 offsets in
// the layer's layout) or of synthetic offsets ~ N(0, sigma^2).
int run_stats(const std::string& text, const std::string& file, double sigma, uint64_t seed) {
  const deft::LayerDesc d = deft::parse_layer_desc(text);
  deft::validate(d);
  deft::OffsetStats s;
  if (!file.empty()) {
    s = deft::offset_stats_from_file(d, file);
  } else {
    if (!(sigma >= 0) || !std::isfinite(sigma))
      throw deft::Error(fmt::format("--sigma {} must be finite and not negative", sigma));
    const deft::TensorShapes shapes = deft::tensor_shapes(d);
    size_t count = 1;
    for (int64_t e : shapes.offset) count *= size_t(e);
    std::vector<float> off(count);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, float(sigma));
    for (float& v : off) v = sigma > 0 ? normal(rng) : 0.0f;
    s = deft::compute_offset_stats(d, off.data(), off.size());
  }
  fmt::print("layer:            {}\n", deft::to_string(d));
  fmt::print("offsets:          {}\n", file.empty() ? fmt::format("N(0, {}^2) px, seed {}", sigma, seed)
                                                    : file);
  fmt::print("sampling points:  {}\n", s.samples);
  fmt::print("|dy| p50 p90 p99 max: {:.3f} {:.3f} {:.3f} {:.3f}\n", s.abs_dy.p50, s.abs_dy.p90,
             s.abs_dy.p99, s.abs_dy.max);
  fmt::print("|dx| p50 p90 p99 max: {:.3f} {:.3f} {:.3f} {:.3f}\n", s.abs_dx.p50, s.abs_dx.p90,
             s.abs_dx.p99, s.abs_dx.max);
  fmt::print("outside the image: {:.4f} of the sampling points\n", s.outside_fraction);
  fmt::print("sigma:            {:.3f} px (bucket {})\n", deft::offset_sigma(s),
             deft::stats_bucket(deft::offset_sigma(s)));
  fmt::print("corner reads outside the staging=window input window (gemm_wgmma), by halo:\n");
  fmt::print("  {:>7}", "tile");
  for (int h : deft::kWindowHalos) fmt::print(" {:>7}", fmt::format("halo={}", h));
  fmt::print("\n");
  for (int tm : deft::kWindowTiles) {
    fmt::print("  {:>7}", fmt::format("tm={}", tm));
    for (const auto& w : s.window_outside)
      if (w.tile_m == tm) fmt::print(" {:>7.4f}", w.outside);
    fmt::print("\n");
  }
  return 0;
}

// Whether record r was made over the search space deft has today for its device and bucket
// (with or without the window variants of deft tune --window).
bool current_space(const deft::LayerDesc& d, const deft::cache::TuningRecord& r) {
  const double sigma = deft::tuner::sigma_of_bucket(r.stats_bucket).value_or(2.0);
  for (bool window : {false, true})
    if (r.search_space ==
        deft::search_space_hash(d, deft::SearchOptions{arch_of_fingerprint(r.device), window, sigma}))
      return true;
  return false;
}

int run_inspect(const std::string& text, const std::string& db_arg) {
  const deft::LayerDesc d = deft::parse_layer_desc(text);
  const std::string path = database_path(db_arg);
  const int arch = default_arch();
  fmt::print("layer:         {}\ndefault:       {} (sm_{})\nsearch space:  {} variants, hash {}\n",
             deft::to_string(d), deft::to_string(deft::default_variant(d, arch)), arch,
             deft::search_space(d, arch).size(), deft::search_space_hash(d, arch));
  std::vector<std::pair<std::string, deft::cache::TuningRecord>> records;  // (source, record)
  if (auto db = open_existing(path)) {
    for (auto& r : db->list_tuning_records(deft::to_string(d))) records.emplace_back("", r);
    if (records.empty()) fmt::print("no tuning records in {}\n", path);
  }
  // The shipped database's records follow; the user's take precedence (see docs).
  if (auto shipped = deft::tuner::shipped_database()) {
    const auto found = shipped->list_tuning_records(deft::to_string(d));
    if (found.empty()) fmt::print("no tuning records in the shipped {}\n", shipped->path());
    for (auto& r : found) records.emplace_back(" (shipped " + shipped->path() + ")", r);
  }
  for (const auto& [source, r] : records) {
    fmt::print("\nrecord{} {}  bucket {}  device {}  driver {}  nvrtc {}  deft {}  space {}{}\n",
               source, r.created_at, r.stats_bucket, r.device, r.driver_version, r.nvrtc_version,
               r.deft_version, r.search_space,
               current_space(d, r) ? "" : " (stale: other search space)");
    fmt::print("  winner {:.1f} us (default {:.1f} us): {}\n", r.winner_us, r.default_us, r.winner);
    for (const auto& c : r.candidates)
      fmt::print("  {:>10}  {}{}\n",
                 c.median_us >= 0 ? fmt::format("{:.1f} us", c.median_us) : "failed", c.variant,
                 c.error.empty() ? "" : "  -- " + c.error.substr(0, 120));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"deft: a JIT compiler for deformable-convolution kernels.\n"
               "A layer is described in one line, e.g.\n"
               "  'deform_conv2d n=8 c=64 h=64 w=64 k=64 r=3 s=3 pad=1 mask=1 dtype=f16'",
               "deft"};
  app.set_version_flag("--version", [] {
    return fmt::format("deft {} (NVRTC {})", deft::version(), deft::nvrtc::version());
  });
  app.require_subcommand(1);
  app.fallthrough();  // -v may come after the subcommand
  int verbosity = 0;
  app.add_flag("-v,--verbose", verbosity,
               "More log output on stderr: -v info, -vv debug, -vvv trace "
               "(default: $DEFT_LOG_LEVEL, else warn)");

  CompileArgs ca;
  CLI::App* compile = app.add_subcommand(
      "compile", "Generate and compile the kernel for a layer description (no GPU needed)");
  compile->add_option("desc", ca.desc, "Layer description, e.g. 'deform_conv2d n=8 c=64 ...'")
      ->required();
  compile->add_option("--variant", ca.variant,
                      "Kernel variant instead of the default, e.g. 'algo=gemm_simt tm=64 tn=64 "
                      "tk=16 threads=256' (omitted fields take their defaults)");
  compile->add_option("--arch", ca.arch,
                      "Target architecture, sm_XY (default: this machine's GPU, else sm_90)");
  compile->add_option("--emit", ca.emit,
                      "What to print: cuda (generated source), ptx, sass (needs nvdisasm), "
                      "resources (registers, shared memory, spills), cubin (to -o)")
      ->check(CLI::IsMember({"cuda", "ptx", "sass", "resources", "cubin"}))
      ->capture_default_str();
  compile->add_option("-o,--output", ca.output, "Write to FILE instead of stdout");
  compile->add_option("--db", ca.db, "Cache database (default: $DEFT_CACHE_DIR/deft.db, ...)");
  compile->add_flag("--no-cache", ca.no_cache,
                    "Neither read nor write deft's cache nor the driver's JIT cache "
                    "(CUDA_CACHE_DISABLE=1): always compile, with the full ptxas report");
  compile->add_flag("--stats", ca.stats,
                    "Print 'nvrtc compiles: N, cache hits: M' on stderr at the end");
  compile->add_flag("--deterministic", ca.deterministic,
                    "A backward pass's deterministic kernel (bitwise-reproducible gradients, as "
                    "CompileOptions::deterministic): its default variant for that mode, with "
                    "det=1 (same as adding det=1 to --variant)");

  CLI::App* cache = app.add_subcommand(
      "cache", "Inspect, clear, export or import the cache (cubins and tuning records)");
  cache->require_subcommand(1);
  std::string db;
  const std::string db_help = "Database file (default: " + std::string("$DEFT_CACHE_DIR/deft.db, "
                              "else $XDG_CACHE_HOME/deft/deft.db, else ~/.cache/deft/deft.db)");
  CLI::App* ls = cache->add_subcommand("ls", "List cached cubins");
  CLI::App* info = cache->add_subcommand("info", "Summarise the database");
  CLI::App* clear = cache->add_subcommand("clear", "Delete every cached cubin and tuning record");
  std::string export_file, import_file;
  CLI::App* exp = cache->add_subcommand(
      "export", "Write every tuning record, with all candidates' timings, to FILE as JSON lines "
                "(format deft-records/1; '-' for stdout)");
  exp->add_option("file", export_file, "Output file")->required();
  CLI::App* imp = cache->add_subcommand(
      "import", "Merge tuning records exported by 'deft cache export' into the database: a "
                "record newer than every record of its layer, bucket, device and versions is "
                "added, others are skipped; prints both counts");
  imp->add_option("file", import_file, "File written by 'deft cache export'")->required();
  for (CLI::App* sub : {ls, info, clear, exp, imp}) {
    sub->add_option("--db", db, db_help);
    sub->fallthrough();
  }

  TuneArgs ta;
  CLI::App* tune = app.add_subcommand(
      "tune",
      "Time every variant of each layer on this GPU and keep the fastest (needs a GPU).\n"
      "  deft tune '<desc>' ['<desc>' ...] [options]\n"
      "  deft tune model.json [--calibration DIR] [--devices 0,1] [--budget SECONDS] [--db PATH]\n"
      "An argument ending in .json is a model file (docs/model-format.md); identical layers are "
      "tuned once. Prints a line per layer as it finishes and a closing table.");
  tune->add_option("inputs", ta.inputs, "Layer descriptions and model files (*.json)")->required();
  tune->add_option("--sigma", ta.sigma,
                   "Offsets ~ N(0, sigma^2) px for layers without statistics (descriptions, and "
                   "model layers without \"stats\" when no --calibration)")
      ->capture_default_str();
  tune->add_option("--max-candidates", ta.max_candidates, "Try at most this many variants (0: all)");
  tune->add_flag("--window", ta.window,
                 "Also try the staging=window variants (the sm_90 wgmma forward kernel's and "
                 "the depthwise grad input's), with halos from the layer's offset statistics; "
                 "off by default: both were slower than their gather forms at every spread "
                 "measured (docs/perf-notes.md rounds 10 and B23)");
  tune->add_option("--passes", ta.passes,
                   "Comma-separated passes to tune for each layer: forward, backward_data, "
                   "backward_weight (default: each layer's own, a description's pass= or a "
                   "model file's forward)");
  tune->add_option("--seconds", ta.seconds, "Timing budget per variant (at most)")
      ->capture_default_str();
  tune->add_option("--calibration", ta.calibration,
                   "Directory of calibration offsets: <layer name>.offsets.f32 per model layer "
                   "(raw little-endian float32 in the layer's offset tensor layout); their "
                   "statistics, computed on the host, pick each layer's sigma and bucket");
  tune->add_option("--devices", ta.devices,
                   "Tune on these GPUs at once, e.g. 0,1: one worker process per device, each "
                   "with a share of the layers, all writing into the same database");
  tune->add_option("--budget", ta.budget,
                   "Total wall-clock seconds: split over the layers (what one leaves goes to the "
                   "rest); a layer stops trying candidates when its share is used, the default "
                   "variant always runs. With --devices each worker has the whole budget for "
                   "its layers");
  tune->add_option("--db", ta.db, db_help);
  // Hidden: the worker mode of --devices, and the GPU-free simulation used by the tests.
  tune->add_option("--worker-device", ta.worker_device)->group("");
  tune->add_option("--layers", ta.worker_layers)->group("");
  tune->add_flag("--simulate", ta.simulate)->group("");
  tune->fallthrough();

  std::string inspect_desc, inspect_db;
  CLI::App* inspect = app.add_subcommand("inspect", "Show a layer's tuning records and timings");
  inspect->add_option("desc", inspect_desc, "Layer description")->required();
  inspect->add_option("--db", inspect_db, db_help);
  inspect->fallthrough();

  std::string stats_desc, stats_file;
  double stats_sigma = 2.0;
  uint64_t stats_seed = 1;
  CLI::App* stats = app.add_subcommand(
      "stats", "Offset statistics of a calibration file or of N(0, sigma^2) offsets (what the "
               "tuner reads, with the window statistics of staging=window)");
  stats->add_option("desc", stats_desc, "Layer description")->required();
  stats->add_option("file", stats_file, "float32 offsets in the layer's layout (default: synthetic)");
  stats->add_option("--sigma", stats_sigma, "Synthetic offsets' standard deviation, px")
      ->capture_default_str();
  stats->add_option("--seed", stats_seed, "Synthetic offsets' seed")->capture_default_str();
  stats->fallthrough();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  try {
    setup_logging(verbosity);
    if (compile->parsed()) return run_compile(ca);
    if (ls->parsed()) return run_cache_ls(db);
    if (info->parsed()) return run_cache_info(db);
    if (clear->parsed()) return run_cache_clear(db);
    if (exp->parsed()) return run_cache_export(export_file, db);
    if (imp->parsed()) return run_cache_import(import_file, db);
    if (tune->parsed()) {
      ta.verbosity = verbosity;
      return run_tune(ta);
    }
    if (inspect->parsed()) return run_inspect(inspect_desc, inspect_db);
    if (stats->parsed()) return run_stats(stats_desc, stats_file, stats_sigma, stats_seed);
    std::fputs(app.help().c_str(), stderr);
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "deft: error: {}\n", e.what());
    return 1;
  } catch (...) {
    std::fflush(stdout);
    fmt::print(stderr, "deft: error: unknown failure\n");
    return 1;
  }
}
