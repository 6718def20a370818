// Variant selection policy: an explicit variant from the options, else a matching tuning
// record from the user's database, else one from the shipped read-only database
// (shipped_database_path()), else the heuristic default. Never tunes by itself.
#pragma once

#include <memory>
#include <string>

#include "cache/cache.hpp"
#include "deft/deft.hpp"

namespace deft::tuner {

// The device a record was measured on.
struct DeviceKey {
  std::string fingerprint;     // name | compute capability | SM count
  std::string driver_version;
  int arch = 0;                // compute capability as 10 * major + minor (search space)
};

// A tuning record with every identity field filled (desc, bucket, device, driver, NVRTC and
// deft versions, search-space hash: that of the space with window variants when `window`, for
// the bucket's sigma); the result fields are empty.
cache::TuningRecord record_key(const LayerDesc& desc, const std::string& stats_bucket,
                               const DeviceKey& device, bool window = false);

// The sigma a bucket name ("v1:sigma~0.5") stands for; nullopt for a name of another form.
std::optional<double> sigma_of_bucket(const std::string& stats_bucket);

// The shipped database, opened read-only once per path per process; nullptr when there is none
// or it is unusable (warned once).
std::shared_ptr<cache::Database> shipped_database();

// db and device may be null (offline compilation): then no record is consulted.
Variant choose_variant(const LayerDesc& desc, const CompileOptions& options,
                       cache::Database* db = nullptr, const DeviceKey* device = nullptr);

}  // namespace deft::tuner
