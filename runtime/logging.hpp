// Logging setup: spdlog's default logger, level from DEFT_LOG_LEVEL (trace, debug, info, warn,
// error, off; default warn). Internal to libdeft.
#pragma once

namespace deft {

// Applies DEFT_LOG_LEVEL once per process; cheap to call again.
void init_logging();

}  // namespace deft
