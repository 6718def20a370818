// See disasm.hpp. nvdisasm runs as a child process (posix_spawn, no shell) on a temporary copy
// of the cubin; the ELF reading below covers just what CUDA cubins need (64-bit, little-endian).
#include "runtime/disasm.hpp"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "deft/ir.hpp"

extern char** environ;

namespace deft::disasm {

namespace fs = std::filesystem;

namespace {

constexpr unsigned char kOsAbiCuda13 = 0x41;  // EI_OSABI of CUDA 13 cubins
constexpr unsigned char kOsAbiLegacy = 0x33;  // EI_OSABI before CUDA 13
constexpr uint16_t kMachineCuda = 190;        // EM_CUDA

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : "";
}

bool is_executable_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) && ::access(p.c_str(), X_OK) == 0;
}

template <typename T>
T read_le(const std::vector<char>& b, size_t off) {
  if (off + sizeof(T) > b.size()) throw Error("cubin: truncated ELF file");
  T v;
  std::memcpy(&v, b.data() + off, sizeof(T));  // x86/ARM hosts are little-endian, as cubins
  return v;
}

template <typename T>
void write_le(std::vector<char>& b, size_t off, T v) {
  std::memcpy(b.data() + off, &v, sizeof(T));
}

bool is_cuda_elf64(const std::vector<char>& b) {
  return b.size() >= 64 && std::memcmp(b.data(), "\x7f" "ELF", 4) == 0 && b[4] == 2 /*64-bit*/ &&
         b[5] == 1 /*little-endian*/ && read_le<uint16_t>(b, 18) == kMachineCuda;
}

// The section headers and names of a 64-bit cubin.
struct Section {
  std::string name;
  uint32_t type = 0;
  uint64_t offset = 0, size = 0;
  uint32_t link = 0, info = 0;
  uint64_t entsize = 0;
};

std::vector<Section> read_sections(const std::vector<char>& b) {
  if (!is_cuda_elf64(b)) throw Error("not a CUDA cubin (64-bit little-endian ELF for EM_CUDA)");
  const uint64_t shoff = read_le<uint64_t>(b, 40);
  const uint16_t shentsize = read_le<uint16_t>(b, 58);
  const uint16_t shnum = read_le<uint16_t>(b, 60);
  const uint16_t shstrndx = read_le<uint16_t>(b, 62);
  if (shentsize < 64 || shnum == 0 || shstrndx >= shnum ||
      shoff + uint64_t(shnum) * shentsize > b.size())
    throw Error("cubin: malformed section header table");
  std::vector<Section> s(shnum);
  for (uint16_t i = 0; i < shnum; ++i) {
    const size_t h = shoff + size_t(i) * shentsize;
    s[i].name = std::to_string(read_le<uint32_t>(b, h));  // resolved below
    s[i].type = read_le<uint32_t>(b, h + 4);
    s[i].offset = read_le<uint64_t>(b, h + 24);
    s[i].size = read_le<uint64_t>(b, h + 32);
    s[i].link = read_le<uint32_t>(b, h + 40);
    s[i].info = read_le<uint32_t>(b, h + 44);
    s[i].entsize = read_le<uint64_t>(b, h + 56);
  }
  const Section& strtab = s[shstrndx];
  if (strtab.offset + strtab.size > b.size()) throw Error("cubin: malformed section names");
  for (auto& sec : s) {
    const uint64_t at = std::stoull(sec.name);
    if (at >= strtab.size) throw Error("cubin: malformed section name");
    const char* p = b.data() + strtab.offset + at;
    sec.name.assign(p, strnlen(p, strtab.size - at));
  }
  for (auto& sec : s)
    if (sec.type != 8 /*SHT_NOBITS*/ && sec.offset + sec.size > b.size())
      throw Error(fmt::format("cubin: section {} extends past the end of the file", sec.name));
  return s;
}

// Runs argv (no shell), returns (exit status, stdout, stderr).
struct RunResult {
  int status = -1;
  std::string out, err;
};

RunResult run_process(const std::vector<std::string>& argv) {
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) throw Error(fmt::format("pipe: {}", std::strerror(errno)));
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    throw Error(fmt::format("pipe: {}", std::strerror(errno)));
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err_pipe[1], 2);
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (rc != 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    throw Error(fmt::format("cannot run {}: {}", argv[0], std::strerror(rc)));
  }
  RunResult r;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        sinks[i]->append(buf, size_t(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) ::close(f.fd);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

// A temporary file holding bytes, removed when it goes out of scope.
class TempFile {
 public:
  explicit TempFile(const std::vector<char>& bytes) {
    std::error_code ec;
    fs::path dir = fs::temp_directory_path(ec);
    if (ec) dir = "/tmp";
    std::string tmpl = (dir / "deft-XXXXXX.cubin").string();
    const int fd = ::mkstemps(tmpl.data(), 6);
    if (fd < 0) throw Error(fmt::format("cannot create a temporary file in {}: {}", dir.string(),
                                        std::strerror(errno)));
    path_ = tmpl;
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        ::close(fd);
        throw Error(fmt::format("cannot write {}: {}", path_, std::strerror(errno)));
      }
      done += size_t(n);
    }
    ::close(fd);
  }
  ~TempFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string first_line(const std::string& s) {
  auto text = s;
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return text.substr(0, text.find('\n'));
}

}  // namespace

std::vector<std::string> nvdisasm_candidates() {
  std::vector<std::string> c;
  auto add = [&c](const std::string& p) {
    if (std::find(c.begin(), c.end(), p) == c.end()) c.push_back(p);
  };
  if (auto v = env("DEFT_NVDISASM"); !v.empty()) {
    std::error_code ec;
    add(fs::is_directory(v, ec) ? (fs::path(v) / "nvdisasm").string() : v);
  }
  if (auto v = env("CUDA_HOME"); !v.empty()) add((fs::path(v) / "bin/nvdisasm").string());
  add("/usr/local/cuda/bin/nvdisasm");
  const std::string path = env("PATH");
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find(':', i);
    if (j == std::string::npos) j = path.size();
    if (j > i) add((fs::path(path.substr(i, j - i)) / "nvdisasm").string());
    i = j + 1;
  }
  return c;
}

std::optional<std::string> find_nvdisasm() {
  for (auto& c : nvdisasm_candidates())
    if (is_executable_file(c)) return c;
  return std::nullopt;
}

int cubin_arch(const std::vector<char>& b) {
  if (!is_cuda_elf64(b)) return 0;
  const uint32_t flags = read_le<uint32_t>(b, 48);
  if (static_cast<unsigned char>(b[7]) == kOsAbiCuda13) return int((flags >> 8) & 0xff);
  return int(flags & 0xff);  // pre-13: the SM number in the low byte
}

std::vector<char> with_legacy_header(const std::vector<char>& cubin) {
  if (!is_cuda_elf64(cubin) || static_cast<unsigned char>(cubin[7]) != kOsAbiCuda13)
    throw Error("with_legacy_header: not a CUDA 13 cubin (EI_OSABI 0x41)");
  std::vector<char> b = cubin;
  const uint32_t sm = (read_le<uint32_t>(b, 48) >> 8) & 0xff;
  b[7] = static_cast<char>(kOsAbiLegacy);  // EI_OSABI
  b[8] = 7;                                // EI_ABIVERSION
  write_le<uint32_t>(b, 20, 118);          // e_version
  write_le<uint32_t>(b, 48, sm | (sm << 16) | 0x500);
  return b;
}

std::string sass(const std::vector<char>& cubin) {
  if (!is_cuda_elf64(cubin)) throw Error("sass: the input is not a CUDA cubin");
  const auto tool = find_nvdisasm();
  if (!tool) {
    throw Error(fmt::format(
        "nvdisasm not found; looked for: {}. The CUDA 13 toolkit on this machine may lack it: "
        "install the toolkit's nvdisasm (e.g. apt package cuda-nvdisasm-13-0), or set "
        "DEFT_NVDISASM to an nvdisasm executable (an older one works, e.g. usr/bin/nvdisasm "
        "from Debian's nvidia-cuda-toolkit 11.8 package: .ci/run fetches it into .ci/tools)",
        fmt::join(nvdisasm_candidates(), ", ")));
  }
  RunResult first;
  {
    TempFile f(cubin);
    first = run_process({*tool, "-c", f.path()});
  }
  if (first.status == 0) return first.out;
  if (static_cast<unsigned char>(cubin[7]) == kOsAbiCuda13) {
    // An nvdisasm older than CUDA 13 rejects the new header; the code itself it can read.
    spdlog::debug("{} rejected the CUDA 13 cubin ({}); retrying with a pre-13 ELF header", *tool,
                  first_line(first.err));
    TempFile f(with_legacy_header(cubin));
    RunResult second = run_process({*tool, "-c", f.path()});
    if (second.status == 0)
      return fmt::format(
          "// deft: the cubin's CUDA 13 ELF header was rewritten to the pre-13 form (sm_{}) for "
          "this older nvdisasm ({})\n{}",
          cubin_arch(cubin), *tool, second.out);
    throw Error(fmt::format("{} failed on the cubin (exit {}): {}; and on a copy with a "
                            "pre-CUDA-13 header (exit {}): {}",
                            *tool, first.status, first_line(first.err), second.status,
                            first_line(second.err)));
  }
  throw Error(fmt::format("{} failed on the cubin (exit {}): {}", *tool, first.status,
                          first_line(first.err)));
}

namespace {

struct FunctionSymbol {
  std::string name;
  uint32_t index = 0;
  bool entry = false;  // a kernel (STO_CUDA_ENTRY), not a device function
};

std::vector<FunctionSymbol> function_symbols(const std::vector<char>& b,
                                             const std::vector<Section>& sections) {
  const Section* symtab = nullptr;
  for (auto& s : sections)
    if (s.type == 2 /*SHT_SYMTAB*/) symtab = &s;
  if (!symtab || symtab->entsize < 24 || symtab->link >= sections.size())
    throw Error("cubin: no symbol table");
  const Section& strtab = sections[symtab->link];
  std::vector<FunctionSymbol> out;
  for (uint64_t i = 0; i < symtab->size / symtab->entsize; ++i) {
    const size_t e = symtab->offset + i * symtab->entsize;
    const uint32_t name = read_le<uint32_t>(b, e);
    if (name >= strtab.size) continue;
    if ((static_cast<unsigned char>(b[e + 4]) & 0xf) != 2 /*STT_FUNC*/) continue;
    const char* p = b.data() + strtab.offset + name;
    FunctionSymbol f;
    f.name.assign(p, strnlen(p, strtab.size - name));
    f.index = uint32_t(i);
    f.entry = (static_cast<unsigned char>(b[e + 5]) & 0x10) != 0;  // st_other: STO_CUDA_ENTRY
    out.push_back(std::move(f));
  }
  return out;
}

}  // namespace

std::vector<std::string> kernel_names(const std::vector<char>& cubin) {
  std::vector<std::string> names;
  for (auto& f : function_symbols(cubin, read_sections(cubin)))
    if (f.entry) names.push_back(f.name);
  return names;
}

KernelResources kernel_resources(const std::vector<char>& b, const std::string& kernel) {
  const std::vector<Section> sections = read_sections(b);
  // The kernel's symbol index: .nv.info entries name functions by symbol.
  int64_t sym = -1;
  for (auto& f : function_symbols(b, sections))
    if (f.name == kernel) sym = f.index;
  if (sym < 0) throw Error(fmt::format("cubin: no kernel named {}", kernel));

  KernelResources r;
  // .nv.info: records of {u8 format, u8 attribute, u16 size-or-value[, payload]}; the
  // per-function attributes below carry {u32 symbol, u32 value}.
  constexpr uint8_t kFmtSval = 0x04;
  constexpr uint8_t kFrameSize = 0x11, kMaxStackSize = 0x23, kRegCount = 0x2f;
  std::map<uint8_t, int64_t> attrs;
  for (auto& s : sections) {
    if (s.name != ".nv.info") continue;
    size_t at = s.offset;
    const size_t end = s.offset + s.size;
    while (at + 4 <= end) {
      const uint8_t format = uint8_t(b[at]), attr = uint8_t(b[at + 1]);
      const uint16_t size = read_le<uint16_t>(b, at + 2);
      at += 4;
      if (format != kFmtSval) continue;  // the other formats carry no payload
      if (at + size > end) break;
      if (size == 8 && read_le<uint32_t>(b, at) == uint32_t(sym))
        attrs[attr] = read_le<uint32_t>(b, at + 4);
      at += size;
    }
  }
  if (attrs.count(kRegCount)) r.registers = int(attrs[kRegCount]);
  if (attrs.count(kFrameSize)) r.stack_bytes = attrs[kFrameSize];
  else if (attrs.count(kMaxStackSize)) r.stack_bytes = attrs[kMaxStackSize];

  // Static shared memory: the size of .nv.shared.<kernel> (absent when the kernel has none).
  // Where the cubin also has a .nv.shared.reserved.* section (sm_90 and newer), that size
  // includes the 1 KiB the system reserves per block, which ptxas -v does not count.
  bool reserved = false;
  for (auto& s : sections)
    if (s.name.rfind(".nv.shared.reserved.", 0) == 0) reserved = true;
  r.shared_bytes = 0;
  for (auto& s : sections) {
    if (s.name != ".nv.shared." + kernel) continue;
    r.shared_bytes = static_cast<long long>(s.size);
    if (reserved && r.shared_bytes >= 1024) r.shared_bytes -= 1024;
  }
  return r;
}

}  // namespace deft::disasm
