// Where the shipped read-only database of tuning records is: $DEFT_SHIPPED_DB, else
// deft-shipped.db next to the deft library (found with dladdr on a function of the library).
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>

#include "deft/tuning.hpp"

namespace deft {

std::string shipped_database_path() {
  if (const char* env = std::getenv("DEFT_SHIPPED_DB")) return env;  // "" disables it
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&shipped_database_path), &info) == 0 || !info.dli_fname)
    return "";
  std::error_code ec;
  const std::filesystem::path lib = std::filesystem::canonical(info.dli_fname, ec);
  if (ec) return "";
  const std::filesystem::path candidate = lib.parent_path() / "deft-shipped.db";
  return std::filesystem::is_regular_file(candidate, ec) ? candidate.string() : "";
}

}  // namespace deft
