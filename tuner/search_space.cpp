// The tuner's search space per layer, its hash, and the statistics buckets.
#include <algorithm>
#include <cmath>
#include <set>

#include <fmt/format.h>

#include "cache/cache.hpp"
#include "deft/deft.hpp"

namespace deft {

std::string stats_bucket(double offset_sigma) {
  if (!(offset_sigma > 0) || !std::isfinite(offset_sigma))
    throw Error(fmt::format("offset sigma {} must be positive and finite", offset_sigma));
  const int e = std::clamp(static_cast<int>(std::lround(std::log2(offset_sigma))), -3, 6);
  return fmt::format("v1:sigma~{}", std::ldexp(1.0, e));
}

std::vector<Variant> search_space(const LayerDesc& d, int arch) {
  validate(d);
  std::vector<Variant> out;
  std::set<std::string> seen;
  auto add = [&](const Variant& v) {
    try {
      validate(d, v);
    } catch (const DescError&) {
      return;  // not valid for this layer
    } catch (const NotImplemented&) {
      return;
    }
    if (seen.insert(to_string(v)).second) out.push_back(v);
  };
  const Variant def = default_variant(d, arch);
  add(def);
  if (def.algo == Algo::gemm_wgmma) {
    // sm_90: every wgmma tile, then the portable tensor-core space below.
    for (int tm : {64, 128})
      for (int tn : {64, 128, 256}) {
        Variant v = def;
        v.tile_m = tm, v.tile_n = tn, v.threads = 2 * tm;
        add(v);
      }
  }
  if (def.algo == Algo::depthwise) {
    const int vmax = 16 / dtype_size(d.dtype);
    for (int vec : {vmax, vmax / 2, vmax * 2, 1})
      for (int tpc : {4, 8, 16, 32})
        for (int threads : {128, 256})
          for (bool tr : {false, true}) {
            if (vec < 1) continue;
            Variant v = def;
            v.vec = vec;
            v.tile_n = tpc * vec;
            v.threads = threads;
            v.tile_m = threads / tpc;
            v.transpose = tr;
            add(v);
          }
    for (int vec : {1, 2, 4, 8}) {  // nchw pixel-parallel forms
      Variant v = def;
      v.vec = vec;
      v.tile_n = vec;
      v.threads = 256;
      v.tile_m = 256;
      v.transpose = false;
      add(v);
    }
    return out;
  }
  const Variant base = default_variant(d);  // the portable default (no wgmma)
  const bool tc = base.algo == Algo::gemm_tc;
  // N tiles from half the output channels of a group (at most 64) to twice them.
  int64_t kg2 = 16;
  while (kg2 < d.k_per_group()) kg2 *= 2;
  for (int tm : {64, 128})
    for (int tn : {16, 32, 64, 128})
      if (tn <= 2 * kg2 && 2 * tn >= std::min<int64_t>(64, kg2))
      for (int threads : {128, 256, 512})
        for (int tk : tc ? std::vector<int>{32} : std::vector<int>{8, 16})
          for (bool tr : {false, true}) {
            Variant v = base;
            v.tile_m = tm;
            v.tile_n = tn;
            v.tile_k = tk;
            v.threads = threads;
            v.transpose = tr;
            add(v);
          }
  return out;
}

std::string search_space_hash(const LayerDesc& d, int arch) {
  std::string all = "deft-search-space-v1";
  for (const Variant& v : search_space(d, arch)) all += "\n" + to_string(v);
  return cache::sha256_hex(all).substr(0, 16);
}

}  // namespace deft
