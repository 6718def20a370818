// The `deft` command line: compile a layer description and show what deft makes of it
// (generated CUDA, PTX, SASS, resources, the cubin), and look after the cubin cache.
// Everything it shows comes from libdeft; the CLI only parses arguments and prints.
//
//   deft compile '<desc>' [--variant '<variant>'] [--arch sm_90]
//                         [--emit cuda|ptx|sass|resources|cubin] [-o FILE] [--stats]
//   deft cache ls|info|clear [--db PATH]
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
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
#include "runtime/disasm.hpp"
#include "runtime/driver.hpp"
#include "runtime/logging.hpp"
#include "runtime/nvrtc.hpp"
#include "tuner/select.hpp"

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
  const deft::Variant variant = deft::tuner::choose_variant(desc, options);
  deft::validate(desc, variant);
  spdlog::debug("layer:   {}", deft::to_string(desc));
  spdlog::debug("variant: {}", deft::to_string(variant));

  if (a.emit == "cuda") {
    write_output(deft::generate_source(desc, variant), a.output);
  } else {
    if (a.emit == "cubin" && (a.output.empty() || a.output == "-"))
      throw deft::Error("--emit cubin writes a binary file: give it with -o FILE");
    options.arch = a.arch.empty() ? default_arch() : parse_arch(a.arch);
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

// deft tune: time the search space of each layer on this GPU and keep the winner.
int run_tune(const std::vector<std::string>& descs, double sigma, const std::string& db_arg,
             int max_candidates, double seconds) {
  if (!deft::gpu_available())
    throw deft::Error("tune needs a GPU: no CUDA driver or device here");
  deft::TuneOptions o;
  o.offset_sigma = sigma;
  o.max_candidates = max_candidates;
  o.seconds_per_candidate = seconds;
  if (!db_arg.empty()) o.cache_path = db_arg;
  fmt::print("{:<4}{:>12}{:>12}{:>9}  {}\n", "#", "default us", "tuned us", "speedup",
             "layer / chosen variant");
  int i = 0;
  for (const std::string& text : descs) {
    const deft::LayerDesc d = deft::parse_layer_desc(text);
    fmt::print(stderr, "[{}/{}] tuning {} ({} candidates)...\n", ++i, descs.size(),
               deft::to_string(d), deft::search_space(d).size());
    const deft::TuneResult r = deft::tune(d, o);
    int failed = 0;
    for (const auto& c : r.candidates) failed += c.median_us < 0;
    fmt::print("{:<4}{:>12.1f}{:>12.1f}{:>8.2f}x  {}\n{:<37}{}{}\n", i, r.default_us, r.winner_us,
               r.default_us / r.winner_us, r.desc, "", deft::to_string(r.winner),
               failed ? fmt::format("  ({} candidates failed)", failed) : "");
    // Why candidates failed: each distinct reason once (full list: deft inspect).
    std::vector<std::string> reasons;
    for (const auto& c : r.candidates)
      if (c.median_us < 0 && std::find(reasons.begin(), reasons.end(), c.error) == reasons.end())
        reasons.push_back(c.error);
    for (const auto& why : reasons)
      fmt::print("{:<37}failed: {}\n", "", why.substr(0, 160));
  }
  fmt::print("records written to {} (bucket {})\n",
             db_arg.empty() ? deft::cache::default_database_path() : db_arg,
             deft::stats_bucket(sigma));
  return 0;
}

// deft inspect: the tuning records of a layer, with every candidate's timing.
int run_inspect(const std::string& text, const std::string& db_arg) {
  const deft::LayerDesc d = deft::parse_layer_desc(text);
  const std::string path = database_path(db_arg);
  fmt::print("layer:         {}\ndefault:       {}\nsearch space:  {} variants, hash {}\n",
             deft::to_string(d), deft::to_string(deft::default_variant(d)),
             deft::search_space(d).size(), deft::search_space_hash(d));
  auto db = open_existing(path);
  if (!db) return 0;
  const auto records = db->list_tuning_records(deft::to_string(d));
  if (records.empty()) {
    fmt::print("no tuning records in {}\n", path);
    return 0;
  }
  for (const auto& r : records) {
    fmt::print("\nrecord {}  bucket {}  device {}  driver {}  nvrtc {}  deft {}  space {}{}\n",
               r.created_at, r.stats_bucket, r.device, r.driver_version, r.nvrtc_version,
               r.deft_version, r.search_space,
               r.search_space == deft::search_space_hash(d) ? "" : " (stale: other search space)");
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

  CLI::App* cache = app.add_subcommand("cache", "Inspect or clear the cubin cache");
  cache->require_subcommand(1);
  std::string db;
  const std::string db_help = "Database file (default: " + std::string("$DEFT_CACHE_DIR/deft.db, "
                              "else $XDG_CACHE_HOME/deft/deft.db, else ~/.cache/deft/deft.db)");
  CLI::App* ls = cache->add_subcommand("ls", "List cached cubins");
  CLI::App* info = cache->add_subcommand("info", "Summarise the database");
  CLI::App* clear = cache->add_subcommand("clear", "Delete every cached cubin and tuning record");
  for (CLI::App* sub : {ls, info, clear}) {
    sub->add_option("--db", db, db_help);
    sub->fallthrough();
  }

  std::vector<std::string> tune_descs;
  double tune_sigma = 2.0, tune_seconds = 0.25;
  int tune_max = 0;
  std::string tune_db;
  CLI::App* tune = app.add_subcommand(
      "tune", "Time every variant of each layer on this GPU and keep the fastest (needs a GPU)");
  tune->add_option("desc", tune_descs, "Layer descriptions")->required();
  tune->add_option("--sigma", tune_sigma,
                   "Offsets of the synthetic calibration batch ~ N(0, sigma^2) px")
      ->capture_default_str();
  tune->add_option("--max-candidates", tune_max, "Try at most this many variants (0: all)");
  tune->add_option("--seconds", tune_seconds, "Timing budget per variant")->capture_default_str();
  tune->add_option("--db", tune_db, db_help);
  tune->fallthrough();

  std::string inspect_desc, inspect_db;
  CLI::App* inspect = app.add_subcommand("inspect", "Show a layer's tuning records and timings");
  inspect->add_option("desc", inspect_desc, "Layer description")->required();
  inspect->add_option("--db", inspect_db, db_help);
  inspect->fallthrough();

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
    if (tune->parsed()) return run_tune(tune_descs, tune_sigma, tune_db, tune_max, tune_seconds);
    if (inspect->parsed()) return run_inspect(inspect_desc, inspect_db);
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
