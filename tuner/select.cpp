// See select.hpp.
#include "tuner/select.hpp"

#include <spdlog/spdlog.h>

#include "runtime/nvrtc.hpp"

namespace deft::tuner {

cache::TuningRecord record_key(const LayerDesc& desc, const std::string& stats_bucket,
                               const DeviceKey& device) {
  cache::TuningRecord r;
  r.desc = to_string(desc);
  r.stats_bucket = stats_bucket;
  r.device = device.fingerprint;
  r.driver_version = device.driver_version;
  r.nvrtc_version = nvrtc::version();
  r.deft_version = version();
  r.search_space = search_space_hash(desc);
  return r;
}

Variant choose_variant(const LayerDesc& desc, const CompileOptions& options, cache::Database* db,
                       const DeviceKey* device) {
  if (options.variant) return *options.variant;
  if (options.use_tuning_records && db && device) {
    if (auto rec = db->find_tuning_record(record_key(desc, options.stats_bucket, *device))) {
      try {
        Variant v = parse_variant(rec->winner);
        validate(desc, v);
        spdlog::debug("tuning record for '{}': {}", rec->desc, rec->winner);
        return v;
      } catch (const Error& e) {
        spdlog::warn("ignoring the tuning record for '{}': its variant '{}' is unusable: {}",
                     rec->desc, rec->winner, e.what());
      }
    }
  }
  return default_variant(desc);
}

}  // namespace deft::tuner
