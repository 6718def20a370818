// deft tuning beyond one layer: model files (docs/model-format.md), offset statistics of a
// calibration batch, the time budget of a tuning run, and the shipped read-only database of
// tuning records. Complements the tuning section of deft/deft.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "deft/deft.hpp"

namespace deft {

// ---- Offset statistics ---------------------------------------------------------------------

struct Percentiles {
  double p50 = 0, p90 = 0, p99 = 0, max = 0;
};

// Statistics of a layer's offsets over a calibration batch. One sample is one sampling point
// (image, offset group, tap, output pixel) with its (dy, dx).
// How well the input window of the wgmma kernel's staging=window variant (plan:
// wgmma_window_rows) serves a layer's offsets: of the corner reads of sampling points inside
// the image, the fraction that falls outside the window of the point's block of `tile_m`
// pixels with `halo` rows of halo (those read global memory), a pixel of a second image in the
// block counting as outside.
struct WindowFraction {
  int tile_m = 0, halo = 0;
  double outside = 0;
};

struct OffsetStats {
  int64_t samples = 0;
  Percentiles abs_dy, abs_dx;     // of the finite |dy| and |dx|, in pixels
  double outside_fraction = 0;    // sampling points outside (-1, h) x (-1, w), or NaN
  std::optional<double> sigma;    // offset standard deviation in px, when known
  // From calibration offsets (compute_offset_stats) only: per tile_m in kWindowTiles and halo in
  // kWindowHalos, in that order. Empty for statistics read from a model file.
  std::vector<WindowFraction> window_outside;
};
inline constexpr int kWindowTiles[] = {64, 128};
inline constexpr int kWindowHalos[] = {0, 1, 2, 4, 8};

// For offsets ~ N(0, s^2) the median of |d| is 0.6745 s.
inline constexpr double kMedianAbsOverSigma = 0.6744897501960817;
// The sigma that picks a layer's statistics bucket: stats.sigma when present, else the mean of
// the |dy| and |dx| medians / 0.6745, at least 0.125 px (offsets that are all zero).
double offset_sigma(const OffsetStats& stats);

// The p-th percentile of `values` (which it sorts), interpolating linearly between the nearest
// ranks as numpy and torch do by default: position p/100 * (n - 1). Empty input: 0.
double percentile(std::vector<double>& values, double p);

// Statistics of one calibration batch of offsets in the layer's offset tensor layout
// (tensor_shapes(desc).offset: dy then dx per tap, taps row-major, per offset group),
// computed on the host. `count` must equal the offset tensor's element count. sigma is the
// standard deviation of all finite offset values (dy and dx together), unset when it is 0.
OffsetStats compute_offset_stats(const LayerDesc& desc, const float* offsets, size_t count);

// Reads a raw little-endian float32 offsets file (e.g. DIR/<layer>.offsets.f32) and computes its
// statistics. Errors name the file and the expected size in bytes.
OffsetStats offset_stats_from_file(const LayerDesc& desc, const std::string& path);

// ---- Model files -----------------------------------------------------------------------------

struct ModelLayer {
  std::string name;
  LayerDesc desc;
  int64_t count = 1;                 // how many times the layer occurs in the model
  std::optional<OffsetStats> stats;  // absent: the default sigma
};

struct Model {
  std::string format;  // "deft-model/1"
  std::string name;
  std::vector<ModelLayer> layers;
};

// Parses a model file's JSON text (docs/model-format.md); `source` names it in errors, which
// also name the layer (index and name) and the field. Every desc is validated.
Model parse_model(const std::string& json_text, const std::string& source = "model");
Model load_model(const std::string& path);

// One distinct thing to tune: a canonical desc and statistics bucket, with every layer of the
// model that maps to it (duplicates are tuned once).
struct TuneEntry {
  LayerDesc desc;
  double sigma = 2.0;
  std::string bucket;                 // stats_bucket(sigma)
  std::vector<size_t> layers;         // indices into Model::layers
  int64_t count = 0;                  // sum of their counts
};
// Groups the model's layers by (canonical desc, bucket), in order of first appearance.
// `sigmas[i]` is layer i's sigma (see offset_sigma(); default_sigma for layers without stats).
std::vector<TuneEntry> tune_entries(const Model& model, const std::vector<double>& sigmas);

// ---- Budget ----------------------------------------------------------------------------------

// Limits of one layer's tuning run.
struct TuneLimits {
  // Wall-clock seconds for the layer (compiling and timing); <= 0: no limit. The default
  // variant is always tried; further candidates are tried while time is left.
  double layer_seconds = 0;
};

// The shortest timing window a candidate gets, however small the budget.
inline constexpr double kMinCandidateSeconds = 0.01;

// How a layer spends its share: each candidate's timing window is the share divided by the
// number of candidates, clamped to [kMinCandidateSeconds, max_seconds_per_candidate]; a
// candidate is started only while elapsed < share (the first, the default, always).
class CandidateBudget {
 public:
  CandidateBudget(double layer_seconds, double max_seconds_per_candidate, size_t candidates);
  double timing_seconds() const { return timing_seconds_; }
  bool may_start(size_t already_tried, double elapsed_seconds) const;

 private:
  double layer_seconds_, timing_seconds_;
};

// When a candidate's timing may stop before its window runs out, because more runs would not
// change the tuner's answer: after kMinTimedRuns runs, once the candidate cannot win (its
// fastest run is kCannotWin times the best median so far, or slower) or once its median has
// settled (the median of all runs within kSettled of the median of the first two thirds).
// `times` in any order; best_us <= 0: no best yet (only settling counts).
inline constexpr size_t kMinTimedRuns = 10;
inline constexpr double kCannotWin = 1.25, kSettled = 0.005;
bool timing_settled(std::vector<double> times, double best_us);

// The share of the next layer of a budgeted run: what is left of the budget over the layers
// left (this one included), at least 2 * kMinCandidateSeconds, also when nothing is left.
double layer_share(double budget_left, size_t layers_left);

// deft::tune with a time limit for the layer (see TuneLimits). Needs a GPU.
TuneResult tune(const LayerDesc& desc, const TuneOptions& options, const TuneLimits& limits);

// A stand-in for tune() without a GPU, for testing the tuning workflow (CLI, budget, workers,
// records): candidates come from search_space(), each "costs" its timing window of simulated
// time against the budget, timings are made up deterministically from the variant text, and
// the record is written (when options.write_record) with device "simulated|cc0.0|sm0" and
// driver "0", which no real device matches.
TuneResult simulate_tune(const LayerDesc& desc, const TuneOptions& options,
                         const TuneLimits& limits = {});

// ---- Shipped database ------------------------------------------------------------------------

// The read-only database of tuning records shipped with deft, consulted after the user's:
// $DEFT_SHIPPED_DB when set ("" disables it), else deft-shipped.db in the directory of the deft
// library, if that file exists. "" when there is none.
std::string shipped_database_path();

}  // namespace deft
