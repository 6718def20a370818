// Tests of the deft CLI as a user runs it: separate processes sharing a cache directory (a
// second process takes the cubin from the cache and never calls NVRTC), cache-key sensitivity,
// `deft cache ls|info|clear`, error exits and help. Also the cubin inspection behind
// `--emit sass|resources` (runtime/disasm). No GPU needed.
#include <fcntl.h>
#include <gtest/gtest.h>

#include "tests/test_tmp.hpp"
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cache/cache.hpp"
#include "deft/deft.hpp"
#include "deft/tuning.hpp"
#include "runtime/disasm.hpp"

extern char** environ;

namespace {

using deft::testing::ScopedEnv;

namespace fs = std::filesystem;

const char* const kLayer =
    "deform_conv2d n=8 c=64 h=64 w=64 k=64 r=3 s=3 pad=1 groups=1 offset_groups=1 mask=1 "
    "dtype=f16 layout=nchw";
// The same layer written differently: other field order, defaults left out.
const char* const kLayerReordered =
    "deform_conv2d dtype=f16 mask=1 pad=1 k=64 c=64 n=8 h=64 w=64 r=3 s=3";

// A fresh directory per test ("cli-<pid>-<n>-<test>").
class TempDir : public deft::testing::TempDir {
 public:
  TempDir() : deft::testing::TempDir("cli") {}
};

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

struct CliRun {
  int exit_code = -1;
  std::string out, err;
  // The last non-empty line of stderr.
  std::string last_err_line() const {
    std::string e = err;
    while (!e.empty() && e.back() == '\n') e.pop_back();
    const size_t nl = e.rfind('\n');
    return nl == std::string::npos ? e : e.substr(nl + 1);
  }
};

// A started CLI process whose stdout and stderr go to files in `dir`.
class CliProcess {
 public:
  CliProcess(const std::vector<std::string>& args, const fs::path& cache_dir,
             const fs::path& io_dir) {
    static int counter = 0;
    const std::string tag = std::to_string(counter++);
    out_ = io_dir / ("out-" + tag);
    err_ = io_dir / ("err-" + tag);
    // The environment of this process, with the cache and logging made deterministic.
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      const std::string v = *e;
      if (v.rfind("DEFT_CACHE_DIR=", 0) == 0 || v.rfind("DEFT_LOG_LEVEL=", 0) == 0 ||
          v.rfind("XDG_CACHE_HOME=", 0) == 0 || v.rfind("CUDA_CACHE_DISABLE=", 0) == 0)
        continue;
      env.push_back(v);
    }
    env.push_back("DEFT_CACHE_DIR=" + cache_dir.string());
    // The driver's JIT cache (GPU machines) would hide NVRTC's ptxas report; see the CLI.
    env.push_back("CUDA_CACHE_DISABLE=1");
    std::vector<std::string> argv = {DEFT_CLI_PATH};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargv, cenv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    for (auto& e : env) cenv.push_back(e.data());
    cenv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int rc = posix_spawn(&pid_, cargv[0], &fa, nullptr, cargv.data(), cenv.data());
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      pid_ = -1;
      spawn_error_ = std::string("posix_spawn ") + DEFT_CLI_PATH + ": " + std::strerror(rc);
    }
  }

  // Waits (at most `timeout`, then kills the child) and collects the result.
  CliRun wait(std::chrono::seconds timeout = std::chrono::seconds(300)) {
    CliRun r;
    if (pid_ < 0) {
      r.err = spawn_error_;
      return r;
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    for (;;) {
      const pid_t w = ::waitpid(pid_, &status, WNOHANG);
      if (w == pid_) break;
      if (w < 0 && errno != EINTR) break;
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        r.err = "timed out\n";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.out = read_file(out_);
    r.err += read_file(err_);
    return r;
  }

  ~CliProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

 private:
  pid_t pid_ = -1;
  fs::path out_, err_;
  std::string spawn_error_;
};

// Runs the CLI to completion with DEFT_CACHE_DIR = cache_dir.
CliRun run_cli(const std::vector<std::string>& args, const fs::path& cache_dir,
               const fs::path& io_dir) {
  return CliProcess(args, cache_dir, io_dir).wait();
}

std::string describe(const CliRun& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout:\n" + r.out + "\n--- stderr:\n" +
         r.err;
}

// `deft compile <desc> --emit resources --stats --arch <arch>` plus extra arguments.
std::vector<std::string> resources_args(const std::string& desc, const std::string& arch = "sm_90",
                                        std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {"compile", desc, "--emit", "resources", "--stats", "--arch", arch};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// The value of a "key:   value" line of the resource summary.
std::string field(const std::string& summary, const std::string& key) {
  std::istringstream in(summary);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) {
      std::string v = line.substr(key.size() + 1);
      v.erase(0, v.find_first_not_of(' '));
      return v;
    }
  return "<no " + key + " line>";
}

constexpr const char* kMiss = "nvrtc compiles: 1, cache hits: 0";
constexpr const char* kHit = "nvrtc compiles: 0, cache hits: 1";

// ---- (a) a second process compiles the same layer from the cache without NVRTC ------------

TEST(Cli, SecondProcessTakesTheCubinFromTheCacheWithoutNvrtc) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";

  const CliRun first = run_cli(resources_args(kLayer), cache, tmp.path());
  ASSERT_EQ(first.exit_code, 0) << describe(first);
  EXPECT_EQ(first.last_err_line(), kMiss) << describe(first);
  EXPECT_EQ(field(first.out, "cache").rfind("miss", 0), 0u) << first.out;
  EXPECT_TRUE(fs::exists(cache / "deft.db"));

  const CliRun second = run_cli(resources_args(kLayer), cache, tmp.path());
  ASSERT_EQ(second.exit_code, 0) << describe(second);
  EXPECT_EQ(second.last_err_line(), kHit) << describe(second);
  EXPECT_EQ(field(second.out, "cache").rfind("hit", 0), 0u) << second.out;

  // The cached cubin describes itself as ptxas described the fresh one.
  for (const char* key : {"kernel", "layer", "variant", "arch", "registers", "shared memory",
                          "stack frame", "cubin size"})
    EXPECT_EQ(field(first.out, key), field(second.out, key)) << key;

  // A third process, writing the cubin: the bytes are those NVRTC produced for the first.
  const CliRun third = run_cli({"compile", kLayer, "--emit", "cubin", "--arch", "sm_90", "--stats",
                                "-o", (tmp.path() / "hit.cubin").string()},
                               cache, tmp.path());
  ASSERT_EQ(third.exit_code, 0) << describe(third);
  EXPECT_EQ(third.last_err_line(), kHit) << describe(third);
  const CliRun fresh = run_cli({"compile", kLayer, "--emit", "cubin", "--arch", "sm_90", "--stats",
                                "--no-cache", "-o", (tmp.path() / "fresh.cubin").string()},
                               cache, tmp.path());
  ASSERT_EQ(fresh.exit_code, 0) << describe(fresh);
  EXPECT_EQ(fresh.last_err_line(), kMiss) << describe(fresh);
  const std::string hit_bytes = read_file(tmp.path() / "hit.cubin");
  EXPECT_GT(hit_bytes.size(), 1000u);
  EXPECT_EQ(hit_bytes.compare(0, 4, "\x7f" "ELF"), 0);
  EXPECT_EQ(hit_bytes, read_file(tmp.path() / "fresh.cubin"));
}

TEST(Cli, ProcessesCompilingTheSameLayerAtOnceShareOneCache) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  std::vector<std::unique_ptr<CliProcess>> procs;
  for (int i = 0; i < 4; ++i)
    procs.push_back(std::make_unique<CliProcess>(resources_args(kLayer), cache, tmp.path()));
  int misses = 0;
  for (auto& p : procs) {
    const CliRun r = p->wait();
    ASSERT_EQ(r.exit_code, 0) << describe(r);
    const std::string last = r.last_err_line();
    EXPECT_TRUE(last == kMiss || last == kHit) << describe(r);
    misses += last == kMiss;
  }
  EXPECT_GE(misses, 1);
  const CliRun after = run_cli(resources_args(kLayer), cache, tmp.path());
  ASSERT_EQ(after.exit_code, 0) << describe(after);
  EXPECT_EQ(after.last_err_line(), kHit) << describe(after);
  const CliRun ls = run_cli({"cache", "ls"}, cache, tmp.path());
  EXPECT_NE(ls.out.find("1 cubin in"), std::string::npos) << describe(ls);
}

// ---- (b) what is part of the key: dtype, variant, arch; not the spelling of the layer -------

TEST(Cli, CacheKeyFollowsDtypeVariantAndArchButNotSpelling) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  auto last_line = [&](const std::vector<std::string>& args) {
    const CliRun r = run_cli(args, cache, tmp.path());
    EXPECT_EQ(r.exit_code, 0) << describe(r);
    return r.last_err_line();
  };
  EXPECT_EQ(last_line(resources_args(kLayer)), kMiss);
  EXPECT_EQ(last_line(resources_args(kLayer)), kHit);
  // The canonical form is the key: another spelling of the same layer hits.
  EXPECT_EQ(last_line(resources_args(kLayerReordered)), kHit);

  const std::string bf16 = std::regex_replace(kLayer, std::regex("dtype=f16"), "dtype=bf16");
  EXPECT_EQ(last_line(resources_args(bf16)), kMiss) << "another dtype";
  const std::string nhwc = std::regex_replace(kLayer, std::regex("layout=nchw"), "layout=nhwc");
  EXPECT_EQ(last_line(resources_args(nhwc)), kMiss) << "another layout";
  EXPECT_EQ(last_line(resources_args(kLayer, "sm_80")), kMiss) << "another arch";
  EXPECT_EQ(last_line(resources_args(
                kLayer, "sm_90", {"--variant", "algo=gemm_simt tm=64 tn=64 tk=16 threads=256"})),
            kMiss)
      << "another variant";
  EXPECT_EQ(last_line(resources_args(
                kLayer, "sm_90", {"--variant", "algo=gemm_tc tm=64 tn=64 tk=16 threads=256"})),
            kMiss)
      << "another tile";

  // Each of them is now cached, and the first is still there.
  EXPECT_EQ(last_line(resources_args(bf16)), kHit);
  EXPECT_EQ(last_line(resources_args(kLayer, "sm_80")), kHit);
  EXPECT_EQ(last_line(resources_args(kLayer)), kHit);

  // --no-cache neither reads nor writes.
  const std::string c32 = std::regex_replace(kLayer, std::regex("c=64"), "c=32");
  EXPECT_EQ(last_line(resources_args(c32, "sm_90", {"--no-cache"})), kMiss);
  EXPECT_EQ(last_line(resources_args(c32)), kMiss);
}

// ---- (c) deft cache ls / info / clear -----------------------------------------------------

TEST(Cli, CacheLsListsEntriesAndClearEmpties) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const std::string db = (cache / "deft.db").string();

  // Looking at a cache that does not exist says so and creates nothing.
  CliRun ls = run_cli({"cache", "ls"}, cache, tmp.path());
  ASSERT_EQ(ls.exit_code, 0) << describe(ls);
  EXPECT_NE(ls.out.find("no database at " + db), std::string::npos) << ls.out;
  EXPECT_FALSE(fs::exists(db));

  const std::string f32 = std::regex_replace(kLayer, std::regex("dtype=f16"), "dtype=f32");
  ASSERT_EQ(run_cli(resources_args(kLayer), cache, tmp.path()).exit_code, 0);
  ASSERT_EQ(run_cli(resources_args(f32, "sm_80"), cache, tmp.path()).exit_code, 0);

  ls = run_cli({"cache", "ls"}, cache, tmp.path());
  ASSERT_EQ(ls.exit_code, 0) << describe(ls);
  EXPECT_NE(ls.out.find("KEY"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find(kLayer), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find(f32), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("sm_80"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("sm_90"), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("2 cubins in " + db), std::string::npos) << ls.out;
  // One row per entry, each starting with a 12-digit key prefix.
  std::istringstream rows(ls.out);
  std::string line;
  int entries = 0;
  while (std::getline(rows, line)) entries += std::regex_search(line, std::regex("^[0-9a-f]{12} "));
  EXPECT_EQ(entries, 2) << ls.out;

  const CliRun info = run_cli({"cache", "info", "--db", db}, cache, tmp.path());
  ASSERT_EQ(info.exit_code, 0) << describe(info);
  EXPECT_NE(info.out.find("path:           " + db), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("cubins:         2 ("), std::string::npos) << info.out;

  const CliRun clear = run_cli({"cache", "clear"}, cache, tmp.path());
  ASSERT_EQ(clear.exit_code, 0) << describe(clear);
  EXPECT_NE(clear.out.find("cleared 2 cubins"), std::string::npos) << clear.out;

  ls = run_cli({"cache", "ls"}, cache, tmp.path());
  EXPECT_NE(ls.out.find("no cubins in " + db), std::string::npos) << ls.out;
  // Cleared for real: the layer compiles again.
  const CliRun again = run_cli(resources_args(kLayer), cache, tmp.path());
  EXPECT_EQ(again.last_err_line(), kMiss) << describe(again);
}

// ---- (d) bad input: exit 1, the field named, no crash ---------------------------------------

TEST(Cli, BadDescriptionExitsOneNamingTheField) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"compile", "deform_conv2d n=1 c=64 h=8 w=8 k=64 r=3 s=3 groups=3", "--emit", "cuda"},
       "deft: error: groups=3 does not divide c=64"},
      {{"compile", "deform_conv2d n=1 c=8 h=8 w=8 k=8 bogus=1", "--emit", "resources"},
       "deft: error: unknown field 'bogus'"},
      {{"compile", "deform_conv2d n=1 c=8 h=8 w=8 k=8 dtype=f8", "--emit", "ptx"},
       "deft: error: dtype=f8 is not one of"},
      {{"compile", "deform_conv2d n=-4 c=8 h=8 w=8 k=8", "--emit", "sass"},
       "deft: error: n=-4 must be at least 1"},
      {{"compile", "deform_conv2d n=1 c=8 h=8 w=8 k=8 r=3 s=3 pad=1", "--variant", "tm=48"},
       "deft: error: tm=48 must be a power of two"},
      {{"compile", "deform_conv2d n=1 c=8 h=8 w=8 k=8 pass=backward_weight act=relu"},
       "deft: error: not implemented"},
      {{"compile", ""}, "deft: error: empty layer description"},
      {{"compile", "deform_conv2d n=1 c=8 h=8 w=8 k=8", "--arch", "sm_9x"},
       "deft: error: --arch sm_9x is not of the form sm_XY"},
      {{"compile", "deform_conv2d n=1 c=8 h=8 w=8 k=8", "--deterministic"},
       "deft: error: --deterministic applies to the backward passes"},
  };
  for (const Case& c : cases) {
    const CliRun r = run_cli(c.args, cache, tmp.path());
    EXPECT_EQ(r.exit_code, 1) << c.message << "\n" << describe(r);
    EXPECT_EQ(r.err.rfind(c.message, 0), 0u) << describe(r);
    EXPECT_EQ(r.out, "") << c.message;
  }
  // Usage errors (CLI11) exit 2.
  const CliRun usage = run_cli({"compile", kLayer, "--emit", "elf"}, cache, tmp.path());
  EXPECT_EQ(usage.exit_code, 2) << describe(usage);
  EXPECT_NE(usage.err.find("--emit"), std::string::npos) << describe(usage);
}

// `deft compile --deterministic` shows a backward pass's deterministic kernel: the variant of
// that mode (for grad input on sm_90 the wgmma kernel's gather form: GIN_MODE 3) with det=1;
// without the flag the fast mode's (vector reductions, GIN_MODE 1), no det=1.
TEST(Cli, CompileDeterministicShowsTheDeterministicBackwardKernel) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const std::string data = "deform_conv2d n=2 c=128 h=16 w=16 k=128 r=3 s=3 pad=1 mask=1 "
                           "dtype=f16 pass=backward_data";
  const CliRun det = run_cli({"compile", data, "--emit", "cuda", "--arch", "sm_90",
                              "--deterministic"}, cache, tmp.path());
  ASSERT_EQ(det.exit_code, 0) << describe(det);
  EXPECT_NE(det.out.find("det=1"), std::string::npos) << det.out.substr(0, 400);
  EXPECT_NE(det.out.find("#define GIN_MODE 3"), std::string::npos);
  const CliRun fast = run_cli({"compile", data, "--emit", "cuda", "--arch", "sm_90"}, cache,
                              tmp.path());
  ASSERT_EQ(fast.exit_code, 0) << describe(fast);
  EXPECT_EQ(fast.out.find("det=1"), std::string::npos);
  EXPECT_NE(fast.out.find("#define GIN_MODE 1"), std::string::npos);
  // grad weight is deterministic in both modes: the same kernel, marked det=1
  const CliRun w = run_cli({"compile", "deform_conv2d n=2 c=128 h=16 w=16 k=128 r=3 s=3 pad=1 "
                            "mask=1 dtype=f16 pass=backward_weight", "--emit", "resources",
                            "--arch", "sm_90", "--deterministic", "--no-cache"}, cache, tmp.path());
  ASSERT_EQ(w.exit_code, 0) << describe(w);
  EXPECT_NE(field(w.out, "variant").find("det=1"), std::string::npos) << w.out;
}

// ---- (e) help and version --------------------------------------------------------------------

TEST(Cli, HelpAndVersionExitZero) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const CliRun help = run_cli({"--help"}, cache, tmp.path());
  EXPECT_EQ(help.exit_code, 0) << describe(help);
  EXPECT_NE(help.out.find("compile"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("cache"), std::string::npos) << help.out;
  for (std::vector<std::string> args :
       {std::vector<std::string>{"compile", "--help"}, {"cache", "--help"}, {"cache", "ls", "--help"}}) {
    const CliRun r = run_cli(args, cache, tmp.path());
    EXPECT_EQ(r.exit_code, 0) << describe(r);
    EXPECT_NE(r.out.find("--help"), std::string::npos) << r.out;
  }
  const CliRun version = run_cli({"--version"}, cache, tmp.path());
  EXPECT_EQ(version.exit_code, 0) << describe(version);
  EXPECT_EQ(version.out.rfind(std::string("deft ") + deft::version(), 0), 0u) << version.out;
  EXPECT_FALSE(fs::exists(cache)) << "help and version must not touch the cache";
}

// ---- cache export / import -------------------------------------------------------------

deft::cache::TuningRecord cli_record(const std::string& desc, const std::string& created) {
  deft::cache::TuningRecord r;
  r.desc = desc;
  r.stats_bucket = "v1:sigma~2";
  r.device = "NVIDIA H100 80GB HBM3|cc9.0|sm132";
  r.driver_version = "13000";
  r.nvrtc_version = "13.0";
  r.deft_version = "0.1.0";
  r.search_space = "0123456789abcdef";
  r.winner = "algo=gemm_tc tm=128";
  r.winner_us = 40.5;
  r.default_us = 80.25;
  r.created_at = created;
  r.candidates = {{"algo=gemm_tc", 80.25, ""}, {"algo=gemm_tc tm=128", 40.5, ""},
                  {"algo=gemm_tc tn=128", -1, "output differs"}};
  return r;
}

void expect_same_records(const std::vector<deft::cache::TuningRecord>& a,
                         const std::vector<deft::cache::TuningRecord>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].desc, b[i].desc);
    EXPECT_EQ(a[i].stats_bucket, b[i].stats_bucket);
    EXPECT_EQ(a[i].device, b[i].device);
    EXPECT_EQ(a[i].driver_version, b[i].driver_version);
    EXPECT_EQ(a[i].nvrtc_version, b[i].nvrtc_version);
    EXPECT_EQ(a[i].deft_version, b[i].deft_version);
    EXPECT_EQ(a[i].search_space, b[i].search_space);
    EXPECT_EQ(a[i].winner, b[i].winner);
    EXPECT_EQ(a[i].winner_us, b[i].winner_us);
    EXPECT_EQ(a[i].default_us, b[i].default_us);
    EXPECT_EQ(a[i].created_at, b[i].created_at);
    ASSERT_EQ(a[i].candidates.size(), b[i].candidates.size());
    for (size_t j = 0; j < a[i].candidates.size(); ++j) {
      EXPECT_EQ(a[i].candidates[j].variant, b[i].candidates[j].variant);
      EXPECT_EQ(a[i].candidates[j].median_us, b[i].candidates[j].median_us);
      EXPECT_EQ(a[i].candidates[j].error, b[i].candidates[j].error);
    }
  }
}

TEST(Cli, CacheExportImportRoundTripBetweenTwoDatabases) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const std::string a = (tmp.path() / "a.db").string(), b = (tmp.path() / "b.db").string();
  const std::string file = (tmp.path() / "records.jsonl").string();
  {
    auto db = deft::cache::Database::open(a);
    db->put_tuning_record(cli_record("layer one", "2024-03-01T10:00:00Z"));
    db->put_tuning_record(cli_record("layer two", "2024-03-01T11:00:00Z"));
    db->put_tuning_record(cli_record("layer one", "2024-03-02T10:00:00Z"));  // a re-tune
    db->put_cubin("k", std::vector<char>(100, 'c'), {});  // cubins are not exported
  }
  const CliRun ex = run_cli({"cache", "export", file, "--db", a}, cache, tmp.path());
  ASSERT_EQ(ex.exit_code, 0) << describe(ex);
  EXPECT_NE(ex.out.find("exported 3 tuning records (9 candidate timings)"), std::string::npos)
      << describe(ex);
  const CliRun im = run_cli({"cache", "import", file, "--db", b}, cache, tmp.path());
  ASSERT_EQ(im.exit_code, 0) << describe(im);
  EXPECT_NE(im.out.find("imported 3 tuning records, skipped 0"), std::string::npos) << describe(im);
  expect_same_records(deft::cache::Database::open(a)->list_tuning_records(),
                      deft::cache::Database::open(b)->list_tuning_records());
  EXPECT_EQ(deft::cache::Database::open(b)->info().cubins, 0);

  // Importing again changes nothing; a newer record already in b wins over the file's.
  deft::cache::Database::open(b)->put_tuning_record(cli_record("layer two", "2024-04-01T00:00:00Z"));
  const CliRun again = run_cli({"cache", "import", file, "--db", b}, cache, tmp.path());
  ASSERT_EQ(again.exit_code, 0) << describe(again);
  EXPECT_NE(again.out.find("imported 0 tuning records, skipped 3"), std::string::npos)
      << describe(again);
  EXPECT_EQ(deft::cache::Database::open(b)->info().tuning_records, 4);

  // ... and a newer record in the file is added to a database that has an older one.
  const CliRun back = run_cli({"cache", "export", "-", "--db", b}, cache, tmp.path());
  ASSERT_EQ(back.exit_code, 0) << describe(back);
  EXPECT_EQ(back.out.rfind("{\"format\":\"deft-records/1\"}\n", 0), 0u) << back.out;
  EXPECT_EQ(std::count(back.out.begin(), back.out.end(), '\n'), 5) << back.out;
  {
    std::ofstream f(file, std::ios::binary | std::ios::trunc);
    f << back.out;
  }
  const CliRun into_a = run_cli({"cache", "import", file, "--db", a}, cache, tmp.path());
  ASSERT_EQ(into_a.exit_code, 0) << describe(into_a);
  EXPECT_NE(into_a.out.find("imported 1 tuning record, skipped 3"), std::string::npos)
      << describe(into_a);
  deft::cache::TuningRecord probe = cli_record("layer two", "");
  EXPECT_EQ(deft::cache::Database::open(a)->find_tuning_record(probe)->created_at,
            "2024-04-01T00:00:00Z");
}

TEST(Cli, CacheExportAndImportErrors) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const std::string missing = (tmp.path() / "none.db").string();
  const CliRun ex = run_cli({"cache", "export", (tmp.path() / "x").string(), "--db", missing},
                            cache, tmp.path());
  EXPECT_EQ(ex.exit_code, 1) << describe(ex);
  EXPECT_NE(ex.err.find("no database at " + missing), std::string::npos) << describe(ex);
  EXPECT_FALSE(fs::exists(missing));
  const fs::path bad = tmp.path() / "bad.jsonl";
  {
    std::ofstream f(bad);
    f << "{\"format\":\"deft-records/1\"}\n{\"desc\": 3}\n";
  }
  const CliRun im = run_cli({"cache", "import", bad.string(), "--db", missing}, cache, tmp.path());
  EXPECT_EQ(im.exit_code, 1) << describe(im);
  EXPECT_NE(im.err.find(bad.string() + ":2: field \"desc\""), std::string::npos) << describe(im);
  EXPECT_FALSE(fs::exists(missing)) << "a failed import must not create the database";
}

// ---- deft tune with model files (simulated timings: no GPU needed) ------------------------

const char* const kTinyModel = R"({"format": "deft-model/1", "model": "tiny", "layers": [
  {"name": "first", "desc": "deform_conv2d n=2 c=32 h=12 w=12 k=32 r=3 s=3 pad=1 mask=1 dtype=f16"},
  {"name": "again", "desc": "deform_conv2d dtype=f16 mask=1 pad=1 n=2 c=32 h=12 w=12 k=32 r=3 s=3",
   "count": 2},
  {"name": "depthwise", "desc": "deform_conv2d n=2 c=32 h=12 w=12 k=32 r=3 s=3 pad=1 groups=32 dtype=f32 layout=nhwc",
   "stats": {"sigma": 0.5}}
]})";

// Appends what one read() of fd gives to `into`; false at EOF or error.
bool n_read(int fd, char* buf, size_t size, std::string& into) {
  const ssize_t n = ::read(fd, buf, size);
  if (n <= 0) return false;
  into.append(buf, size_t(n));
  return true;
}

fs::path write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  return path;
}

TEST(CliTune, ModelFileTunesDistinctLayersOnceWithProgressAndTable) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const fs::path model = write_text(tmp.path() / "tiny.json", kTinyModel);
  const std::string db = (tmp.path() / "t.db").string();
  const std::string extra = "deform_conv2d n=1 c=16 h=8 w=8 k=16 r=3 s=3 pad=1";
  const CliRun r = run_cli({"tune", model.string(), extra, "--simulate", "--db", db}, cache, tmp.path());
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_NE(r.out.find("tuning 4 layers (3 distinct) into " + db), std::string::npos) << r.out;
  EXPECT_TRUE(std::regex_search(
      r.out, std::regex(R"(\[1/3\] first \(\+1 same\)  default 100\.0 us -> tuned \d+\.\d us \(\d\.\d\dx\)  variant algo=)")))
      << r.out;
  EXPECT_NE(r.out.find("[2/3] depthwise  default"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[3/3] " + deft::to_string(deft::parse_layer_desc(extra))), std::string::npos)
      << r.out;
  // The closing table: a header, one row per distinct layer with its count and bucket, a total.
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(layer +count +default us +tuned us +speedup +bucket +chosen variant)")))
      << r.out;
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(\nfirst \(\+1 same\) +3 +100\.0 +\d+\.\d +\d\.\d\dx +v1:sigma~2 +algo=)")))
      << r.out;
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(\ndepthwise +1 +100\.0 .* v1:sigma~0\.5 +algo=depthwise)")))
      << r.out;
  EXPECT_NE(r.out.find("total (times count)"), std::string::npos) << r.out;
  auto records = deft::cache::Database::open(db)->list_tuning_records();
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].desc, deft::to_string(deft::parse_layer_desc(
                                 "deform_conv2d n=2 c=32 h=12 w=12 k=32 r=3 s=3 pad=1 mask=1 dtype=f16")));
  EXPECT_EQ(records[1].stats_bucket, "v1:sigma~0.5");
  for (const auto& rec : records)
    EXPECT_EQ(rec.candidates.size(), deft::search_space(deft::parse_layer_desc(rec.desc)).size());
  // Not a terminal: no progress bar on stderr.
  EXPECT_EQ(r.err.find('\r'), std::string::npos) << r.err;
}

// --passes tunes each distinct layer once per pass (in the order given, named with the pass),
// leaves out a pass a layer has no kernel for, and refuses an unknown pass; with --devices the
// workers get the same entries.
TEST(CliTune, PassesTunesTheBackwardPassesToo) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const fs::path model = write_text(tmp.path() / "tiny.json", kTinyModel);
  const std::string db = (tmp.path() / "t.db").string();
  const std::string act = "deform_conv2d n=1 c=16 h=8 w=8 k=16 r=3 s=3 pad=1 act=relu";
  const CliRun r = run_cli({"tune", model.string(), act, "--passes", "forward,backward_data",
                            "--simulate", "--db", db},
                           cache, tmp.path());
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_NE(r.out.find("[1/5] first (+1 same)  default"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[2/5] first (+1 same) [backward_data]  default"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[4/5] depthwise [backward_data]  default"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("not tuning pass=backward_data"), std::string::npos) << r.err;  // act=relu
  const auto records = deft::cache::Database::open(db)->list_tuning_records();
  ASSERT_EQ(records.size(), 5u);
  int data = 0;
  for (const auto& rec : records) data += deft::parse_layer_desc(rec.desc).pass == deft::Pass::backward_data;
  EXPECT_EQ(data, 2);
  const CliRun w = run_cli({"tune", model.string(), "--passes", "backward_weight", "--devices",
                            "0,1", "--simulate", "--db", db},
                           cache, tmp.path());
  ASSERT_EQ(w.exit_code, 0) << describe(w);
  EXPECT_NE(w.out.find("first (+1 same) [backward_weight] [device 0]"), std::string::npos) << w.out;
  EXPECT_EQ(deft::cache::Database::open(db)->list_tuning_records().size(), 7u);
  const CliRun bad = run_cli({"tune", model.string(), "--passes", "forward,sideways", "--simulate",
                              "--db", db},
                             cache, tmp.path());
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--passes: 'sideways' is not forward, backward_data or backward_weight"),
            std::string::npos) << bad.err;
}

TEST(CliTune, DevicesSpawnOneWorkerEachIntoOneDatabase) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const fs::path examples = fs::path(__FILE__).parent_path().parent_path() / "examples";
  const std::string db = (tmp.path() / "t.db").string();
  const CliRun r = run_cli({"tune", (examples / "resnet50_dcn.json").string(), "--devices", "0,1",
                            "--simulate", "--db", db, "-v"},
                           cache, tmp.path());
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  for (const char* name : {"layer2.0.conv2", "layer2.1.conv2", "layer3.0.conv2", "layer3.1.conv2",
                           "layer4.0.conv2", "layer4.1.conv2"})
    EXPECT_TRUE(std::regex_search(r.out, std::regex(std::string(R"(\n)") + name + R"( +\d+ +100\.0 )")))
        << name << "\n" << r.out;
  // Round robin: entries 0, 2, 4 on device 0 and 1, 3, 5 on device 1.
  EXPECT_NE(r.out.find("layer2.0.conv2 [device 0]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("layer2.1.conv2 [device 1]"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("worker for device 0"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("worker for device 1"), std::string::npos) << r.err;
  for (int i = 1; i <= 6; ++i)
    EXPECT_NE(r.out.find("[" + std::to_string(i) + "/6] "), std::string::npos) << r.out;
  EXPECT_EQ(deft::cache::Database::open(db)->list_tuning_records().size(), 6u);
}

TEST(CliTune, BudgetLimitsTheCandidatesOfEachLayer) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const fs::path model = write_text(tmp.path() / "tiny.json", kTinyModel);
  const std::string db = (tmp.path() / "t.db").string();
  // 2 distinct layers: 0.15 s / 2 = 0.075 s for the first, 8 timing windows of 0.01 s (the
  // smallest); the second gets what is left, 0.07 s: 7 windows.
  const CliRun r = run_cli({"tune", model.string(), "--simulate", "--budget", "0.15", "--db", db},
                           cache, tmp.path());
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_NE(r.out.find("budget 0.15 s"), std::string::npos) << r.out;
  const auto records = deft::cache::Database::open(db)->list_tuning_records();
  ASSERT_EQ(records.size(), 2u);
  for (const auto& rec : records) {
    EXPECT_GE(rec.candidates.size(), 7u) << rec.desc;
    EXPECT_LE(rec.candidates.size(), 8u) << rec.desc;
    EXPECT_LT(rec.candidates.size(), deft::search_space(deft::parse_layer_desc(rec.desc)).size());
  }
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(\(\d/\d+ candidates)"))) << r.out;
}

TEST(CliTune, CalibrationFilesPickTheBucketAndErrorsNameFileAndSize) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const std::string desc = "deform_conv2d n=1 c=8 h=6 w=6 k=8 r=3 s=3 pad=1";
  const fs::path model = write_text(tmp.path() / "one.json",
                                    std::string(R"({"format": "deft-model/1", "model": "one", "layers": [
    {"name": "conv", "desc": ")") + desc + R"(", "stats": {"sigma": 1.0}}]})");
  const fs::path cal = tmp.path() / "cal";
  fs::create_directories(cal);
  const std::string db = (tmp.path() / "t.db").string();
  const size_t count = 18 * 6 * 6;
  const std::string file = (cal / "conv.offsets.f32").string();
  const std::string expected = "expected " + std::to_string(count * 4) + " bytes";

  CliRun r = run_cli({"tune", model.string(), "--calibration", cal.string(), "--simulate", "--db", db},
                     cache, tmp.path());
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_NE(r.err.find(file), std::string::npos) << describe(r);
  EXPECT_NE(r.err.find("missing"), std::string::npos) << describe(r);
  EXPECT_NE(r.err.find(expected), std::string::npos) << describe(r);

  // Offsets +-8 (alternating): standard deviation 8, bucket 8 (the model file says sigma 1).
  std::vector<float> off(count);
  for (size_t i = 0; i < count; ++i) off[i] = i % 2 ? -8.0f : 8.0f;
  {
    std::ofstream f(file, std::ios::binary);
    f.write(reinterpret_cast<const char*>(off.data()), std::streamsize(4 * count - 8));
  }
  r = run_cli({"tune", model.string(), "--calibration", cal.string(), "--simulate", "--db", db},
              cache, tmp.path());
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_NE(r.err.find(file + " has " + std::to_string(4 * count - 8) + " bytes"), std::string::npos)
      << describe(r);
  EXPECT_NE(r.err.find(expected), std::string::npos) << describe(r);
  EXPECT_FALSE(fs::exists(db)) << "nothing is tuned when a calibration file is wrong";

  {
    std::ofstream f(file, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(off.data()), std::streamsize(4 * count));
  }
  r = run_cli({"tune", model.string(), "--calibration", cal.string(), "--simulate", "--db", db},
              cache, tmp.path());
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_NE(r.out.find("v1:sigma~8"), std::string::npos) << r.out;  // not the file's sigma 1
  const auto records = deft::cache::Database::open(db)->list_tuning_records();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].stats_bucket, "v1:sigma~8");
}

TEST(CliTune, ModelErrorsExitOneNamingLayerAndField) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const fs::path model = write_text(tmp.path() / "bad.json", R"({"format": "deft-model/1", "model": "m",
    "layers": [{"name": "stem", "desc": "deform_conv2d c=64 k=64 groups=3"}]})");
  const CliRun r = run_cli({"tune", model.string(), "--simulate"}, cache, tmp.path());
  EXPECT_EQ(r.exit_code, 1) << describe(r);
  EXPECT_NE(r.err.find(model.string() + ": layers[0] (stem): field \"desc\""), std::string::npos)
      << describe(r);
  const CliRun missing = run_cli({"tune", (tmp.path() / "none.json").string(), "--simulate"}, cache,
                                 tmp.path());
  EXPECT_EQ(missing.exit_code, 1) << describe(missing);
  EXPECT_NE(missing.err.find("cannot open model file"), std::string::npos) << describe(missing);
}

// With stderr on a terminal (a pseudo-terminal here), deft tune draws a progress bar there.
TEST(CliTune, ProgressBarOnATerminalOnly) {
  TempDir tmp;
  const fs::path model = write_text(tmp.path() / "tiny.json", kTinyModel);
  const int master = ::posix_openpt(O_RDWR | O_NOCTTY);
  ASSERT_GE(master, 0) << std::strerror(errno);
  ASSERT_EQ(::grantpt(master), 0);
  ASSERT_EQ(::unlockpt(master), 0);
  const std::string slave = ::ptsname(master);
  const std::string db = (tmp.path() / "t.db").string();
  std::vector<std::string> argv = {DEFT_CLI_PATH, "tune", model.string(), "--simulate", "--db", db};
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  const fs::path out = tmp.path() / "stdout";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, slave.c_str(), O_RDWR | O_NOCTTY, 0);
  pid_t pid = -1;
  ASSERT_EQ(::posix_spawn(&pid, cargv[0], &fa, nullptr, cargv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  std::string err;
  char buf[4096];
  for (;;) {  // read until the child has exited and the terminal is drained
    pollfd p{master, POLLIN, 0};
    if (::poll(&p, 1, 200) > 0) {
      const ssize_t n = ::read(master, buf, sizeof buf);
      if (n > 0) {
        err.append(buf, size_t(n));
        continue;
      }
    }
    if (::waitpid(pid, nullptr, WNOHANG) == pid) {
      while (::poll(&p, 1, 100) > 0 && (n_read(master, buf, sizeof buf, err))) {
      }
      break;
    }
  }
  ::close(master);
  EXPECT_NE(err.find("100% 2/2 layers"), std::string::npos) << err;
  EXPECT_NE(err.find("[##############################]"), std::string::npos) << err;
  EXPECT_NE(err.find('\r'), std::string::npos) << err;
  EXPECT_NE(read_file(out).find("[2/2] depthwise"), std::string::npos) << read_file(out);
}

TEST(CliTune, HelpNamesTheModelAndCacheForms) {
  TempDir tmp;
  const fs::path cache = tmp.path() / "cache";
  const CliRun tune = run_cli({"tune", "--help"}, cache, tmp.path());
  EXPECT_EQ(tune.exit_code, 0) << describe(tune);
  for (const char* s : {"model.json", "--calibration", "--devices", "--budget", "--db",
                        "docs/model-format.md"})
    EXPECT_NE(tune.out.find(s), std::string::npos) << s << "\n" << tune.out;
  EXPECT_EQ(tune.out.find("--worker-device"), std::string::npos) << "hidden option shown";
  const CliRun c = run_cli({"cache", "--help"}, cache, tmp.path());
  EXPECT_NE(c.out.find("export"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("import"), std::string::npos) << c.out;
}

// ---- runtime/disasm: cubin inspection ---------------------------------------------------

deft::CompileInfo compile_uncached(const std::string& desc, int arch) {
  deft::CompileOptions o;
  o.arch = arch;
  o.cache_path = "";
  return deft::compile_offline(deft::parse_layer_desc(desc), o);
}

TEST(Disasm, LegacyHeaderRewrite) {
  const deft::CompileInfo info = compile_uncached(kLayer, 90);
  const std::vector<char>& c = info.cubin;
  ASSERT_GT(c.size(), 64u);
  EXPECT_EQ(deft::disasm::cubin_arch(c), 90);
  ASSERT_EQ(static_cast<unsigned char>(c[7]), 0x41) << "expected a CUDA 13 cubin header";
  const std::vector<char> old = deft::disasm::with_legacy_header(c);
  ASSERT_EQ(old.size(), c.size());
  EXPECT_EQ(static_cast<unsigned char>(old[7]), 0x33);
  EXPECT_EQ(old[8], 7);
  uint32_t version = 0, flags = 0;
  std::memcpy(&version, old.data() + 20, 4);
  std::memcpy(&flags, old.data() + 48, 4);
  EXPECT_EQ(version, 118u);
  EXPECT_EQ(flags, 90u | (90u << 16) | 0x500u);
  EXPECT_EQ(deft::disasm::cubin_arch(old), 90);
  // Nothing but the header changes.
  EXPECT_TRUE(std::equal(c.begin() + 64, c.end(), old.begin() + 64));
  EXPECT_THROW(deft::disasm::with_legacy_header(old), deft::Error);
  EXPECT_THROW(deft::disasm::with_legacy_header(std::vector<char>(10, 'x')), deft::Error);
  EXPECT_EQ(deft::disasm::cubin_arch(std::vector<char>(100, 0)), 0);
}

// With a GPU driver, CUDA 13's NVRTC may serve machine code from the driver's JIT cache and
// then writes no ptxas -v report; the cache is off here, and kernels without a report are
// not compared (the test skips if none had one).
TEST(Disasm, KernelResourcesMatchThePtxasReport) {
  ScopedEnv no_jit_cache("CUDA_CACHE_DISABLE", "1");
  int compared = 0;
  for (const auto& [desc, arch] : std::vector<std::pair<std::string, int>>{
           {kLayer, 90},
           {kLayer, 80},
           {"deform_conv2d n=2 c=32 h=16 w=16 k=32 r=3 s=3 pad=1 dtype=f32", 90},
           {"deform_conv2d n=2 c=32 h=16 w=16 k=32 r=3 s=3 pad=1 dtype=f64", 75}}) {
    SCOPED_TRACE(desc + " sm_" + std::to_string(arch));
    const deft::CompileInfo info = compile_uncached(desc, arch);
    const std::vector<std::string> kernels = deft::disasm::kernel_names(info.cubin);
    EXPECT_NE(std::find(kernels.begin(), kernels.end(), info.kernel_name), kernels.end());
    for (const std::string& kernel : kernels) {
      SCOPED_TRACE(kernel);
      // The ptxas -v lines of this entry function.
      const std::string& log = info.resource_report;
      const size_t from = log.find("Compiling entry function '" + kernel + "'");
      if (from == std::string::npos) continue;
      ++compared;
      const size_t to = log.find("Compiling entry function", from + 1);
      const std::string block = log.substr(from, to == std::string::npos ? to : to - from);
      std::smatch m;
      ASSERT_TRUE(std::regex_search(block, m, std::regex(R"(Used (\d+) registers)"))) << block;
      const int registers = std::stoi(m[1]);
      const long long smem =
          std::regex_search(block, m, std::regex(R"((\d+) bytes smem)")) ? std::stoll(m[1]) : 0;
      ASSERT_TRUE(std::regex_search(block, m, std::regex(R"((\d+) bytes stack frame)"))) << block;
      const long long stack = std::stoll(m[1]);
      const auto r = deft::disasm::kernel_resources(info.cubin, kernel);
      EXPECT_EQ(r.registers, registers);
      EXPECT_EQ(r.shared_bytes, smem);
      EXPECT_EQ(r.stack_bytes, stack);
    }
  }
  const deft::CompileInfo info = compile_uncached(kLayer, 90);
  EXPECT_THROW(deft::disasm::kernel_resources(info.cubin, "no_such_kernel"), deft::Error);
  EXPECT_THROW(deft::disasm::kernel_resources(std::vector<char>(100, 0), "k"), deft::Error);
  std::vector<char> truncated(info.cubin.begin(), info.cubin.begin() + 200);
  EXPECT_THROW(deft::disasm::kernel_resources(truncated, info.kernel_name), deft::Error);
  if (compared == 0) GTEST_SKIP() << "NVRTC gave no ptxas -v report (driver JIT cache)";
}

TEST(Disasm, SearchOrderAndMissingTool) {
  TempDir tmp;
  const fs::path fake = tmp.path() / "bin";
  fs::create_directories(fake);
  {
    ScopedEnv e("DEFT_NVDISASM", fake.string());  // a folder: its nvdisasm is meant
    ScopedEnv h("CUDA_HOME", (tmp.path() / "cuda").string());
    const auto c = deft::disasm::nvdisasm_candidates();
    ASSERT_GE(c.size(), 3u);
    EXPECT_EQ(c[0], (fake / "nvdisasm").string());
    EXPECT_EQ(c[1], (tmp.path() / "cuda/bin/nvdisasm").string());
    EXPECT_EQ(c[2], "/usr/local/cuda/bin/nvdisasm");
  }
  if (fs::exists("/usr/local/cuda/bin/nvdisasm")) GTEST_SKIP() << "the toolkit has nvdisasm";
  ScopedEnv e("DEFT_NVDISASM", (fake / "nvdisasm").string());
  ScopedEnv h("CUDA_HOME", (tmp.path() / "cuda").string());
  ScopedEnv p("PATH", fake.string());
  EXPECT_FALSE(deft::disasm::find_nvdisasm().has_value());
  const deft::CompileInfo info = compile_uncached(kLayer, 90);
  try {
    deft::disasm::sass(info.cubin);
    FAIL() << "sass() without nvdisasm must throw";
  } catch (const deft::Error& err) {
    const std::string msg = err.what();
    EXPECT_NE(msg.find("nvdisasm not found"), std::string::npos) << msg;
    EXPECT_NE(msg.find((fake / "nvdisasm").string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("DEFT_NVDISASM"), std::string::npos) << msg;
  }
}

// With an nvdisasm (DEFT_NVDISASM or the toolkit's): HMMA for f16, none for strict f32.
TEST(Disasm, SassOfTensorCoreAndFmaKernels) {
  if (!deft::disasm::find_nvdisasm()) GTEST_SKIP() << "no nvdisasm (set DEFT_NVDISASM)";
  // sm_90: the warpgroup kernel (HGMMA); sm_80: the WMMA tile product (HMMA).
  const std::string f16 = deft::disasm::sass(compile_uncached(kLayer, 90).cubin);
  EXPECT_NE(f16.find("HGMMA"), std::string::npos);
  EXPECT_NE(f16.find(".text.deft_deform_conv2d_forward"), std::string::npos);
  const std::string f16_80 = deft::disasm::sass(compile_uncached(kLayer, 80).cubin);
  EXPECT_NE(f16_80.find("HMMA"), std::string::npos);
  EXPECT_EQ(f16_80.find("HGMMA"), std::string::npos);
  const std::string f32 = deft::disasm::sass(
      compile_uncached("deform_conv2d n=2 c=32 h=16 w=16 k=32 r=3 s=3 pad=1 dtype=f32", 90).cubin);
  EXPECT_EQ(f32.find("HMMA"), std::string::npos);
  EXPECT_NE(f32.find("FFMA"), std::string::npos);
  EXPECT_THROW(deft::disasm::sass(std::vector<char>(64, 0)), deft::Error);
}

}  // namespace
