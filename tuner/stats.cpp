// Offset statistics of a calibration batch, computed on the host: percentiles of |dy| and |dx|,
// the fraction of sampling points outside the image, and the sigma that picks the bucket. The
// definitions match deft's Python exporter (python/deft/tuning.py), so that a calibration file
// and an exported model file of the same offsets give the same bucket.
// (A GPU statistics pass is future work; a calibration batch is small enough for the host.)
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "compiler/plan.hpp"
#include "deft/tuning.hpp"

namespace deft {
namespace {

// Linear interpolation between the two nearest ranks (position p/100 * (n - 1), 0-based), the
// definition of numpy's and torch's default quantile, which deft's Python exporter uses.
double sorted_percentile(const std::vector<double>& v, double p) {
  const double pos = p / 100.0 * double(v.size() - 1);
  const size_t lo = size_t(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

}  // namespace

double percentile(std::vector<double>& values, double p) {
  if (values.empty()) return 0;
  if (!(p >= 0 && p <= 100)) throw Error(fmt::format("percentile {} is not in [0, 100]", p));
  std::sort(values.begin(), values.end());
  return sorted_percentile(values, p);
}

double offset_sigma(const OffsetStats& s) {
  if (s.sigma) return *s.sigma;
  const double median = 0.5 * (s.abs_dy.p50 + s.abs_dx.p50);
  const double sigma = median / kMedianAbsOverSigma;
  return std::isfinite(sigma) ? std::max(sigma, 0.125) : 0.125;
}

namespace {

// Percentiles of already sorted values.
Percentiles sorted_percentiles(const std::vector<double>& v) {
  Percentiles p;
  if (v.empty()) return p;
  p.p50 = sorted_percentile(v, 50);
  p.p90 = sorted_percentile(v, 90);
  p.p99 = sorted_percentile(v, 99);
  p.max = v.back();
  return p;
}

size_t element_count(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= size_t(d);
  return n;
}

}  // namespace

OffsetStats compute_offset_stats(const LayerDesc& d, const float* offsets, size_t count) {
  const TensorShapes shapes = tensor_shapes(d);
  const size_t expected = element_count(shapes.offset);
  if (count != expected)
    throw Error(fmt::format("offsets: {} values, the offset tensor [{}] of '{}' has {}", count,
                            fmt::join(shapes.offset, ", "), to_string(d), expected));
  const int64_t N = d.n, OG = d.offset_groups, T = d.taps(), HO = d.out_h(), WO = d.out_w();
  const int64_t C = 2 * OG * T;
  const bool nhwc = d.layout == Layout::nhwc;
  auto index = [&](int64_t n, int64_t c, int64_t ho, int64_t wo) {
    return nhwc ? ((n * HO + ho) * WO + wo) * C + c : ((n * C + c) * HO + ho) * WO + wo;
  };
  const size_t points = size_t(N * OG * T * HO * WO);
  std::vector<double> ady, adx;
  ady.reserve(points);
  adx.reserve(points);
  int64_t outside = 0;
  // Window statistics: per (tile, halo) the window rows, and counts of corner reads outside.
  struct Win {
    int tile_m, halo, rows;
    int64_t outside = 0;
  };
  std::vector<Win> wins;
  for (int tm : kWindowTiles)
    for (int halo : kWindowHalos) wins.push_back({tm, halo, wgmma_window_rows(d, tm, halo)});
  int64_t corner_reads = 0;
  double sum = 0, sumsq = 0;
  int64_t finite = 0;
  auto moments = [&](double v) {
    if (!std::isfinite(v)) return;
    sum += v;
    sumsq += v * v;
    ++finite;
  };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < OG; ++g)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = t / d.s, j = t % d.s;
        for (int64_t ho = 0; ho < HO; ++ho)
          for (int64_t wo = 0; wo < WO; ++wo) {
            const int64_t pixel = (n * HO + ho) * WO + wo;  // its row m of the implicit GEMM
            const double dy = offsets[index(n, g * 2 * T + 2 * t, ho, wo)];
            const double dx = offsets[index(n, g * 2 * T + 2 * t + 1, ho, wo)];
            // Non-finite values have no place in an order statistic; they count as outside.
            if (std::isfinite(dy)) ady.push_back(std::fabs(dy));
            if (std::isfinite(dx)) adx.push_back(std::fabs(dx));
            moments(dy);
            moments(dx);
            const double y = double(ho * d.stride_h - d.pad_h + i * d.dil_h) + dy;
            const double x = double(wo * d.stride_w - d.pad_w + j * d.dil_w) + dx;
            // Outside (-1, h) x (-1, w) a sampling point reads nothing (all four corners are
            // padding); written as not-inside so that NaN positions count as outside.
            const bool inside = y > -1 && y < double(d.h) && x > -1 && x < double(d.w);
            outside += !inside;
            if (!inside) continue;
            // The corners inside the image, and for each window whether their rows are in it.
            const int64_t y0 = int64_t(std::floor(y)), x0 = int64_t(std::floor(x));
            int64_t rows[2], cols = 0, nrows = 0;  // in-image corner rows; corners per row
            for (int64_t cy = y0; cy <= y0 + 1; ++cy)
              if (cy >= 0 && cy < d.h) rows[nrows++] = cy;
            for (int64_t cx = x0; cx <= x0 + 1; ++cx) cols += cx >= 0 && cx < d.w;
            corner_reads += nrows * cols;
            for (Win& w : wins) {
              const int64_t m0 = pixel / w.tile_m * w.tile_m, nb = m0 / (HO * WO);
              const int64_t wy0 = (m0 - nb * HO * WO) / WO * d.stride_h - d.pad_h - w.halo;
              for (int64_t r = 0; r < nrows; ++r)
                w.outside += (nb != n || rows[r] < wy0 || rows[r] >= wy0 + w.rows) ? cols : 0;
            }
          }
      }
  std::sort(ady.begin(), ady.end());
  std::sort(adx.begin(), adx.end());
  OffsetStats s;
  s.samples = int64_t(points);
  s.abs_dy = sorted_percentiles(ady);
  s.abs_dx = sorted_percentiles(adx);
  s.outside_fraction = points ? double(outside) / double(points) : 0.0;
  for (const Win& w : wins)
    s.window_outside.push_back(
        {w.tile_m, w.halo, corner_reads ? double(w.outside) / double(corner_reads) : 0.0});
  // sigma: the standard deviation of all finite offset values, dy and dx together (as the
  // Python exporter computes it). When it is 0 (all offsets equal, e.g. an untrained offset
  // convolution's zeros) it stays unset and offset_sigma() falls back to the medians.
  if (finite > 0) {
    const double mean = sum / double(finite);
    const double var = std::max(sumsq / double(finite) - mean * mean, 0.0);
    if (var > 0) s.sigma = std::sqrt(var);
  }
  return s;
}

OffsetStats offset_stats_from_file(const LayerDesc& d, const std::string& path) {
  const TensorShapes shapes = tensor_shapes(d);
  const size_t count = element_count(shapes.offset);
  const uintmax_t expected = uintmax_t(count) * 4;
  const std::string want =
      fmt::format("expected {} bytes: float32 offsets [{}] ({} layout) of '{}'", expected,
                  fmt::join(shapes.offset, ", "), d.layout == Layout::nhwc ? "nhwc" : "nchw",
                  to_string(d));
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw Error(fmt::format("calibration file {} is missing ({})", path, want));
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) throw Error(fmt::format("calibration file {}: {} ({})", path, ec.message(), want));
  if (size != expected)
    throw Error(fmt::format("calibration file {} has {} bytes; {}", path, size, want));
  std::ifstream f(path, std::ios::binary);
  std::vector<float> values(count);
  if (!f.read(reinterpret_cast<char*>(values.data()), std::streamsize(expected)))
    throw Error(fmt::format("calibration file {}: read failed ({})", path, want));
  if constexpr (std::endian::native == std::endian::big) {
    for (float& v : values) {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      u = __builtin_bswap32(u);
      std::memcpy(&v, &u, 4);
    }
  }
  return compute_offset_stats(d, values.data(), values.size());
}

}  // namespace deft
