// The process's open databases, shared by compile() and the tuner. Internal to libdeft.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "cache/cache.hpp"

namespace deft {

// One open database per path for the whole process.
std::shared_ptr<cache::Database> database_for(const std::string& path);

// The path an option names, else the default database path ("" means no database).
std::string resolve_cache_path(const std::optional<std::string>& path);

}  // namespace deft
