// CPU reference of deform_conv2d forward in double: torchvision.ops.deform_conv2d semantics
// (DCNv1/v2) for both layouts, groups, offset groups, mask, bias and activations. Written to be
// read and trusted, not to be fast: one output pixel at a time, every bilinear sample through
// sample_bilinear(). All indices are 64-bit. Depends only on the inline parts of deft/ir.hpp.
#include "reference/deform_conv_ref.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace deft::ref {

double sample_bilinear(const double* plane, int64_t h, int64_t w, int64_t row, int64_t col,
                       double y, double x) {
  // Written as a negated conjunction so that NaN coordinates also sample zero.
  if (!(y > -1.0 && x > -1.0 && y < (double)h && x < (double)w)) return 0.0;
  const double fy = std::floor(y), fx = std::floor(x);
  const int64_t y0 = (int64_t)fy, x0 = (int64_t)fx, y1 = y0 + 1, x1 = x0 + 1;
  const double ly = y - fy, lx = x - fx, hy = 1.0 - ly, hx = 1.0 - lx;
  // A corner outside [0, h-1] x [0, w-1] reads zero.
  auto at = [&](int64_t yy, int64_t xx) {
    return (yy >= 0 && yy < h && xx >= 0 && xx < w) ? plane[yy * row + xx * col] : 0.0;
  };
  return hy * hx * at(y0, x0) + hy * lx * at(y0, x1) + ly * hx * at(y1, x0) + ly * lx * at(y1, x1);
}

namespace {

void require(bool ok, const char* field, const std::string& message) {
  if (!ok) throw DescError(field, "deft::ref::deform_conv2d: " + message);
}

double activate(Activation act, double v) {
  switch (act) {
    case Activation::none: return v;
    case Activation::relu: return v > 0.0 ? v : 0.0;
    case Activation::gelu: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  }
  return v;
}

// The rules both passes rely on (full validation lives in libdeft).
void require_geometry(const LayerDesc& d, const double* mask) {
  require(d.op == OpKind::deform_conv2d, "op", "only deform_conv2d is implemented");
  require(d.n >= 1 && d.c >= 1 && d.h >= 1 && d.w >= 1 && d.k >= 1, "n", "sizes must be >= 1");
  require(d.r >= 1 && d.s >= 1 && d.stride_h >= 1 && d.stride_w >= 1 && d.dil_h >= 1 &&
              d.dil_w >= 1 && d.pad_h >= 0 && d.pad_w >= 0,
          "r", "bad kernel geometry");
  require(d.groups >= 1 && d.c % d.groups == 0 && d.k % d.groups == 0, "groups",
          "groups must divide c and k");
  require(d.offset_groups >= 1 && d.c % d.offset_groups == 0, "offset_groups",
          "offset_groups must divide c");
  require(d.out_h() >= 1 && d.out_w() >= 1, "h", "empty output");
  require(!d.mask || mask != nullptr, "mask", "mask=1 needs a mask tensor");
}

// Element indices in the description's layout.
struct Indexing {
  explicit Indexing(const LayerDesc& d)
      : nhwc(d.layout == Layout::nhwc), C(d.c), H(d.h), W(d.w), R(d.r), S(d.s),
        Cg(d.c_per_group()), row(nhwc ? d.w * d.c : d.w), col(nhwc ? d.c : 1) {}
  // Element (n, channel ch, y, x) of a 4-d tensor with `chans` channels and `ys` x `xs` pixels.
  int64_t at4(int64_t n, int64_t ch, int64_t chans, int64_t y, int64_t x, int64_t ys,
              int64_t xs) const {
    return nhwc ? ((n * ys + y) * xs + x) * chans + ch : ((n * chans + ch) * ys + y) * xs + x;
  }
  // weight[k, cl, i, j] (nchw: [k, c/g, r, s]; nhwc: [k, r, s, c/g]).
  int64_t weight(int64_t k, int64_t cl, int64_t i, int64_t j) const {
    return nhwc ? ((k * R + i) * S + j) * Cg + cl : ((k * Cg + cl) * R + i) * S + j;
  }
  // Start of the input plane of (n, c); `row` and `col` are its strides.
  int64_t plane(int64_t n, int64_t c) const { return nhwc ? n * H * W * C + c : (n * C + c) * H * W; }
  bool nhwc;
  int64_t C, H, W, R, S, Cg, row, col;
};

}  // namespace

void deform_conv2d_forward(const LayerDesc& d, const double* input, const double* offset,
                           const double* mask, const double* weight, const double* bias,
                           double* output) {
  require_geometry(d, mask);
  require(!d.bias || bias != nullptr, "bias", "bias=1 needs a bias tensor");

  const int64_t N = d.n, C = d.c, H = d.h, W = d.w, K = d.k;
  const int64_t R = d.r, S = d.s, T = d.taps();
  const int64_t HO = d.out_h(), WO = d.out_w();
  const int64_t OG = d.offset_groups;
  const int64_t Cg = d.c_per_group(), Kg = d.k_per_group(), Cog = d.c_per_offset_group();

  const Indexing ix(d);

  // Modulated samples of one output pixel: cols[c * T + t].
  std::vector<double> cols((size_t)(C * T));

  for (int64_t n = 0; n < N; ++n) {
    for (int64_t ho = 0; ho < HO; ++ho) {
      for (int64_t wo = 0; wo < WO; ++wo) {
        for (int64_t og = 0; og < OG; ++og) {
          for (int64_t i = 0; i < R; ++i) {
            for (int64_t j = 0; j < S; ++j) {
              const int64_t t = i * S + j;
              const double dy = offset[ix.at4(n, og * 2 * T + 2 * t + 0, 2 * OG * T, ho, wo, HO, WO)];
              const double dx = offset[ix.at4(n, og * 2 * T + 2 * t + 1, 2 * OG * T, ho, wo, HO, WO)];
              const double m = d.mask ? mask[ix.at4(n, og * T + t, OG * T, ho, wo, HO, WO)] : 1.0;
              const double y = (double)(ho * d.stride_h - d.pad_h + i * d.dil_h) + dy;
              const double x = (double)(wo * d.stride_w - d.pad_w + j * d.dil_w) + dx;
              for (int64_t c = og * Cog; c < (og + 1) * Cog; ++c)
                cols[(size_t)(c * T + t)] = m * sample_bilinear(input + ix.plane(n, c), H, W, ix.row, ix.col, y, x);
            }
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t g = k / Kg;
          double acc = 0.0;
          for (int64_t cl = 0; cl < Cg; ++cl) {
            const double* col = &cols[(size_t)((g * Cg + cl) * T)];
            for (int64_t i = 0; i < R; ++i)
              for (int64_t j = 0; j < S; ++j) acc += weight[ix.weight(k, cl, i, j)] * col[i * S + j];
          }
          if (d.bias) acc += bias[k];
          output[ix.at4(n, k, K, ho, wo, HO, WO)] = activate(d.act, acc);
        }
      }
    }
  }
}

SampleGrad sample_bilinear_grad(const double* plane, int64_t h, int64_t w, int64_t row,
                                int64_t col, double y, double x) {
  SampleGrad g;
  if (!(y > -1.0 && x > -1.0 && y < (double)h && x < (double)w)) return g;
  const double fy = std::floor(y), fx = std::floor(x);
  const int64_t y0 = (int64_t)fy, x0 = (int64_t)fx, y1 = y0 + 1, x1 = x0 + 1;
  const double ly = y - fy, lx = x - fx, hy = 1.0 - ly, hx = 1.0 - lx;
  auto at = [&](int64_t yy, int64_t xx) {
    return (yy >= 0 && yy < h && xx >= 0 && xx < w) ? plane[yy * row + xx * col] : 0.0;
  };
  const double v00 = at(y0, x0), v01 = at(y0, x1), v10 = at(y1, x0), v11 = at(y1, x1);
  g.value = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11;
  g.dy = hx * (v10 - v00) + lx * (v11 - v01);
  g.dx = hy * (v01 - v00) + ly * (v11 - v10);
  return g;
}

void deform_conv2d_backward(const LayerDesc& d, const double* input, const double* offset,
                            const double* mask, const double* weight, const double* grad_output,
                            double* grad_input, double* grad_offset, double* grad_mask,
                            double* grad_weight, double* grad_bias) {
  require_geometry(d, mask);
  require(d.act == Activation::none, "act", "the backward pass needs act=none");

  const int64_t N = d.n, C = d.c, H = d.h, W = d.w, K = d.k;
  const int64_t R = d.r, S = d.s, T = d.taps();
  const int64_t HO = d.out_h(), WO = d.out_w();
  const int64_t OG = d.offset_groups;
  const int64_t Cg = d.c_per_group(), Kg = d.k_per_group(), Cog = d.c_per_offset_group();
  const Indexing ix(d);

  if (grad_input) std::fill(grad_input, grad_input + N * C * H * W, 0.0);
  if (grad_offset) std::fill(grad_offset, grad_offset + N * 2 * OG * T * HO * WO, 0.0);
  if (grad_mask && d.mask) std::fill(grad_mask, grad_mask + N * OG * T * HO * WO, 0.0);
  if (grad_weight) std::fill(grad_weight, grad_weight + K * Cg * T, 0.0);
  if (grad_bias) std::fill(grad_bias, grad_bias + K, 0.0);

  for (int64_t n = 0; n < N; ++n) {
    for (int64_t ho = 0; ho < HO; ++ho) {
      for (int64_t wo = 0; wo < WO; ++wo) {
        if (grad_bias)
          for (int64_t k = 0; k < K; ++k) grad_bias[k] += grad_output[ix.at4(n, k, K, ho, wo, HO, WO)];
        for (int64_t og = 0; og < OG; ++og) {
          for (int64_t i = 0; i < R; ++i) {
            for (int64_t j = 0; j < S; ++j) {
              const int64_t t = i * S + j;
              const int64_t dy_at = ix.at4(n, og * 2 * T + 2 * t + 0, 2 * OG * T, ho, wo, HO, WO);
              const int64_t dx_at = ix.at4(n, og * 2 * T + 2 * t + 1, 2 * OG * T, ho, wo, HO, WO);
              const int64_t m_at = ix.at4(n, og * T + t, OG * T, ho, wo, HO, WO);
              const double m = d.mask ? mask[m_at] : 1.0;
              const double y = (double)(ho * d.stride_h - d.pad_h + i * d.dil_h) + offset[dy_at];
              const double x = (double)(wo * d.stride_w - d.pad_w + j * d.dil_w) + offset[dx_at];
              const bool inside = y > -1.0 && x > -1.0 && y < (double)H && x < (double)W;
              double g_dy = 0, g_dx = 0, g_m = 0;
              for (int64_t c = og * Cog; c < (og + 1) * Cog; ++c) {
                const int64_t g = c / Cg, cl = c % Cg;
                const SampleGrad sg = sample_bilinear_grad(input + ix.plane(n, c), H, W, ix.row,
                                                           ix.col, y, x);
                double colgrad = 0.0;
                for (int64_t kk = 0; kk < Kg; ++kk) {
                  const int64_t k = g * Kg + kk;
                  const double go = grad_output[ix.at4(n, k, K, ho, wo, HO, WO)];
                  colgrad += weight[ix.weight(k, cl, i, j)] * go;
                  if (grad_weight) grad_weight[ix.weight(k, cl, i, j)] += go * m * sg.value;
                }
                g_m += colgrad * sg.value;
                g_dy += colgrad * m * sg.dy;
                g_dx += colgrad * m * sg.dx;
                if (grad_input && inside) {
                  const double fy = std::floor(y), fx = std::floor(x);
                  const int64_t y0 = (int64_t)fy, x0 = (int64_t)fx;
                  const double ly = y - fy, lx = x - fx;
                  const double wts[4] = {(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx};
                  for (int q = 0; q < 4; ++q) {
                    const int64_t yy = y0 + q / 2, xx = x0 + q % 2;
                    if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
                    grad_input[ix.plane(n, c) + yy * ix.row + xx * ix.col] += colgrad * m * wts[q];
                  }
                }
              }
              if (grad_offset) {
                grad_offset[dy_at] = g_dy;
                grad_offset[dx_at] = g_dx;
              }
              if (grad_mask && d.mask) grad_mask[m_at] = g_m;
            }
          }
        }
      }
    }
  }
}

}  // namespace deft::ref
