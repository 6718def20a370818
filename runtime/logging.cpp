// See logging.hpp.
#include "runtime/logging.hpp"

#include <cstdlib>
#include <mutex>

#include <spdlog/spdlog.h>

namespace deft {

void init_logging() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("DEFT_LOG_LEVEL");
    if (env && *env) {
      auto level = spdlog::level::from_str(env);
      // from_str maps unknown names to off; say so instead of going silent.
      if (level == spdlog::level::off && std::string(env) != "off") {
        spdlog::warn("DEFT_LOG_LEVEL={} is not one of trace|debug|info|warn|error|off", env);
        level = spdlog::level::warn;
      }
      spdlog::set_level(level);
    } else if (spdlog::get_level() == spdlog::level::info) {
      spdlog::set_level(spdlog::level::warn);
    }
  });
}

}  // namespace deft
