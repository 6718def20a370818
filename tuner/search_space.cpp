// The tuner's search space per layer, its hash, and the statistics buckets.
#include <algorithm>
#include <cmath>
#include <array>
#include <initializer_list>
#include <set>

#include <fmt/format.h>

#include "cache/cache.hpp"
#include "compiler/plan.hpp"
#include "deft/deft.hpp"

namespace deft {

double bucket_sigma(double offset_sigma) {
  if (!(offset_sigma > 0) || !std::isfinite(offset_sigma))
    throw Error(fmt::format("offset sigma {} must be positive and finite", offset_sigma));
  const int e = std::clamp(static_cast<int>(std::lround(std::log2(offset_sigma))), -3, 6);
  return std::ldexp(1.0, e);
}

std::string stats_bucket(double offset_sigma) {
  return fmt::format("v1:sigma~{}", bucket_sigma(offset_sigma));
}

std::vector<int> window_halos(double offset_sigma) {
  const double s = bucket_sigma(offset_sigma);
  std::vector<int> out;
  for (double q : {0.6744897501960817, 1.6448536269514722, 2.5758293035489004}) {
    const int h = std::min(16, int(std::ceil(q * s)));
    if (std::find(out.begin(), out.end(), h) == out.end()) out.push_back(h);
  }
  return out;
}

std::vector<Variant> search_space(const LayerDesc& d, int arch) {
  return search_space(d, SearchOptions{arch, false, 2.0});
}

std::vector<Variant> search_space(const LayerDesc& d, const SearchOptions& opt) {
  const int arch = opt.arch;
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
  // base with every (tm, tn, tk) of the lists
  auto add_tiles = [&](const Variant& base, std::initializer_list<int> tms,
                       std::initializer_list<int> tns, std::initializer_list<int> tks) {
    for (int tm : tms)
      for (int tn : tns)
        for (int tk : tks) {
          Variant v = base;
          v.tile_m = tm, v.tile_n = tn, v.tile_k = tk;
          add(v);
        }
  };
  if (d.pass == Pass::backward_data) {
    if (def.algo == Algo::depthwise) {
      // the float atomics (the default of the layers the local gather does not serve)
      Variant a = def;
      a.gin_gather = a.gin_local = false, a.halo = 0;
      add(a);
      // the gather form in the fast mode (f32 sums instead of float atomics; perf notes round
      // B17: slower on the bench's depthwise cases, a candidate where cells are crowded)
      Variant g = a;
      g.gin_gather = true;
      add(g);
      // gin=local (fast mode, f32 workspace): the near points gathered per 8 x 8 input tile,
      // the far ones reduced as the atomics do; radii 1, 2 and 4, and the radii the offsets'
      // spread asks for up to 8 (window_halos: 6 at sigma 2 and 8). Perf notes round B30: with
      // the 1024-thread local gather R = 1 is fastest at sigma 0.5, R = 6 at sigma 8 on dw512
      // (0.91x the atomics).
      // (fast mode only: the deterministic local gather, gin_mode 6, took 1.6-3.9x the
      // deterministic gather's time at every spread measured, perf notes round B31)
      if (!def.deterministic) {
        std::vector<int> radii = {1, 2, 4};
        for (int h : window_halos(opt.offset_sigma))
          if (h <= 8 && std::find(radii.begin(), radii.end(), h) == radii.end()) radii.push_back(h);
        for (int r : radii) {
          Variant l = a;
          l.gin_local = true, l.halo = r;
          add(l);
        }
      }
      // staging=window, opt-in (SearchOptions::window): tiles of 8 and 16 pixels, the halos
      // the offsets' spread asks for (at most 8; a larger window would not fit shared
      // memory). Slower than the float atomics at every spread measured (perf notes round
      // B23: its shared-memory f32 adds are CAS loops).
      // (Not beside a gw=fused default: the window kernel has no grad-weight sums, so its
      // grad-input pass would be timed without the work the fused kernel's includes.)
      if (opt.window && !def.fuse_gw)
        for (int tm : {8, 16})
          for (int halo : window_halos(opt.offset_sigma)) {
            if (halo > 8) continue;
            Variant w = a;
            w.tile_m = tm, w.threads = 32 * tm;
            w.staging = Staging::window, w.halo = halo;
            add(w);
          }
      return out;
    }
    // The WMMA / FMA kernels' tiles around the portable default (tm = pixels, tn = channels a
    // step, tk = output channels a slice), then on sm_90 (f16, bf16) the wgmma kernel's with
    // 64 pixels and one, two or four warpgroups (f16/bf16 and tf32: perf notes rounds B12-B14;
    // on sm_90 the default is one of them where a group has more than 64 output channels).
    // Not its 128-pixel tiles (deterministic mode refuses them; they won nowhere).
    add_tiles(default_variant(d), {32, 64, 128}, {32, 64}, {16, 32, 64});
    if (def.algo == Algo::gemm_simt && def.vec == 4) {  // the FMA kernel's vector epilogue
      Variant v4 = default_variant(d);
      v4.vec = 4;
      add_tiles(v4, {32, 64, 128}, {32, 64}, {16, 32, 64});
    }
    const bool tf32 = d.dtype == DType::f32 && d.math == MathMode::tf32;
    if (arch == 90 && (d.dtype == DType::f16 || d.dtype == DType::bf16 || tf32))
      for (auto [tm, tn, threads, stages] :
           {std::array{64, 64, 256, 3}, {64, 64, 256, 0}, {64, 128, 256, 3}, {64, 64, 128, 0},
            {64, 64, 512, 3}}) {
        Variant v;
        v.algo = Algo::gemm_wgmma;
        v.tile_m = tm, v.tile_n = tn, v.tile_k = tf32 ? 32 : 64, v.threads = threads;
        v.stages = stages;
        v.transpose = d.layout == Layout::nchw;
        add(v);
      }
    return out;
  }
  if (d.pass == Pass::backward_weight) {
    if (def.algo == Algo::depthwise) return out;
    // The WMMA / FMA kernels' tiles (tm = output channels, tn = input channels, tk = pixels a
    // slice) around the portable default, then on sm_90 (f16, bf16, tf32) the wgmma kernel's
    // warp-specialised tiles (perf notes rounds B8-B10, B20).
    add_tiles(default_variant(d), {64, 128}, {32, 64}, {32, 64, 128});
    const bool tf32 = d.dtype == DType::f32 && d.math == MathMode::tf32;
    if (arch == 90 && (d.dtype == DType::f16 || d.dtype == DType::bf16 || tf32))
      for (auto [tm, tn, producers] : {std::array{256, 128, 1}, {256, 64, 2}, {256, 64, 1},
                                       {128, 128, 1}, {128, 128, 2}, {128, 64, 1}, {128, 64, 2},
                                       {64, 128, 1}}) {
        Variant v;
        v.algo = Algo::gemm_wgmma;
        v.tile_m = tm, v.tile_n = tn, v.tile_k = tf32 ? 32 : 64, v.producers = producers;
        v.threads = wgmma_threads(Pass::backward_weight, tm, tn, producers);
        v.transpose = d.layout == Layout::nchw;
        add(v);
      }
    return out;
  }
  if (def.algo == Algo::gemm_wgmma) {
    // sm_90: every wgmma tile of the register-A kernel, the warp-specialised tiles (producer
    // warpgroups), then, for tf32, the portable tensor-core space below. f16/bf16 leave the
    // WMMA tiles out: in 13 exhaustive fp16 runs on the H200 (session 20, docs/perf-notes.md)
    // the best of their 17 (nhwc) or 34 (nchw) tiles was 1.20-3.46x slower than the best
    // wgmma tile, and they were 2/3 of the candidates and of the tuning time.
    for (int tm : {64, 128})
      for (int tn : {64, 128, 256}) {
        Variant v = def;
        v.tile_m = tm, v.tile_n = tn, v.threads = 2 * tm, v.producers = 0;
        add(v);
      }
    for (auto [tm, tn, producers] : {std::array{64, 512, 1}, {64, 256, 2}, {64, 256, 1},
                                     {128, 256, 1}, {64, 128, 2}, {64, 128, 1}, {128, 128, 2},
                                     {64, 64, 1}}) {
      Variant v = def;
      v.tile_m = tm, v.tile_n = tn, v.producers = producers;
      v.threads = wgmma_threads(Pass::forward, tm, tn, producers);
      add(v);
    }
    if (opt.window)
      for (auto [tm, tn] : {std::pair{def.tile_m, def.tile_n}, {64, 128}, {128, 64}})
        for (int halo : window_halos(opt.offset_sigma)) {
          Variant v = def;
          v.tile_m = tm, v.tile_n = tn, v.threads = 2 * tm, v.producers = 0;
          if (v.tile_n > 256) v.tile_n = 256;  // the register-A kernel's widest tile
          v.staging = Staging::window, v.halo = halo;
          add(v);
        }
    if (d.dtype == DType::f16 || d.dtype == DType::bf16) return out;
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
    // staging=window (SearchOptions::window, sm_80 and later): the default's channels over
    // 4 x 8 and 8 x 8 output tiles, the halos the offsets' spread asks for, at most 8 (perf
    // notes session 21)
    if (opt.window && def.vec > 1 && arch >= 80)  // (cp.async)
      for (int tm : {32, 64})
        for (int halo : window_halos(opt.offset_sigma)) {
          if (halo > 8) continue;
          Variant w = def;
          w.tile_m = tm, w.staging = Staging::window, w.halo = halo;
          add(w);
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
  return search_space_hash(d, SearchOptions{arch, false, 2.0});
}

std::string search_space_hash(const LayerDesc& d, const SearchOptions& opt) {
  std::string all = "deft-search-space-v1";
  for (const Variant& v : search_space(d, opt)) {
    all += '\n';  // (not "\n" + ...: GCC 12 warns -Wrestrict on that temporary)
    all += to_string(v);
  }
  return cache::sha256_hex(all).substr(0, 16);
}

}  // namespace deft
