// deform_conv2d backward_data for depthwise layers (groups == c == k): the column gradient of
// channel c is just weight[c][tap] * grad_out[c][pixel], so there is no GEMM. A block owns
// PIXB output pixels and one offset group; CL threads share a pixel and split its channels
// (nhwc: CL = 32 lanes of a warp on neighbouring channels; nchw: PIXB = 32 pixels along the
// lanes, CL warps). Per tap, each thread scatters its channels' contributions into grad input
// (as in deform_conv_bwd_data.cuh: float atomics, or 64-bit fixed point when deterministic
// with an f64 accumulator) and accumulates grad offset / grad mask partials, which the CL
// threads of a pixel then sum in a fixed order: with shuffles where they are one warp (nhwc),
// else through shared memory. GIN_MODE 3 (deterministic) and 4 (gin=gather) scatter nothing:
// deft_bwd_gather (bwd_common.cuh, GATHER_DIRECT) computes grad input per input pixel from
// grad_out, the weight and the mask. GOUT_T: grad_out is read from a channels-last copy (an
// nchw layer whose lanes run along the channels of the transposed input).
//
// With EV = 4 (nhwc reads into an f32 workspace) a lane takes 4 neighbouring channels: one
// vector load per corner and one red.global.add.v4.f32 per corner on sm_90 instead of 4
// atomics. The grad offset / grad mask sums then run over the lane's channels in a different
// order than with EV = 1 (each order fixed).
//
// Constants from codegen: PIXB, CL, THREADS (= PIXB * CL), GIN_MODE, EV.

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ gout, GinT* __restrict__ gin, T* __restrict__ goffset,
                T* __restrict__ gmask, unsigned long long* __restrict__ header) {
  deft_grid_begin();
  __shared__ Acc Red[3][THREADS];
  const int tid = threadIdx.x;
  const int p = X_NHWC ? tid / CL : tid % PIXB;
  const int lane = X_NHWC ? tid % CL : tid / PIXB;
  const int og = blockIdx.y;
  const long long m = (long long)blockIdx.x * PIXB + p;
  const BwdPixel px = deft_bwd_pixel(m);
  const bool pix_ok = px.ok;
  const long long n = px.n;
  const int ho = px.ho, wo = px.wo;
  const long long q_img = (long long)ho * WO + wo;
  const double scale = GIN_MODE == 2 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = GIN_MODE == 2 && header[3] != 0ull;

#pragma unroll 1
  for (int t = 0; t < TAPS; ++t) {
    Acc g[3] = {Acc(0), Acc(0), Acc(0)};  // grad offset dy, dx, grad mask of this tap
    if (pix_ok) {
      const BwdPoint pt = deft_bwd_point(offset, mask, n, ho, wo, t, og);
      const T* image = input + n * (C * H * W);
      if constexpr (EV == 1) {
#pragma unroll 2
        for (int c = og * CPOG + lane; c < (og + 1) * CPOG; c += CL) {
          const Acc cg = Acc(deft_widen(weight[(long long)c * TAPS + t])) *
                         Acc(deft_widen(gout[deft_gout_index(n, c, q_img)]));
          const long long cbase = X_NHWC ? (long long)c : (long long)c * H * W;
          deft_bwd_channel(image + cbase, gin ? gin + n * (C * H * W) + cbase : nullptr, pt, cg,
                           scale, nonfinite, g);
        }
      } else {  // nhwc: EV neighbouring channels per lane, one vector load and reduction per corner
#pragma unroll 2
        for (int c = og * CPOG + lane * EV; c < (og + 1) * CPOG; c += CL * EV) {
          Acc cg[EV];
#pragma unroll
          for (int e = 0; e < EV; ++e)
            cg[e] = Acc(deft_widen(weight[(long long)(c + e) * TAPS + t])) *
                    Acc(deft_widen(gout[deft_gout_index(n, c + e, q_img)]));
          deft_bwd_channels<EV>(image + c, gin ? gin + n * (C * H * W) + c : nullptr, pt, cg,
                                scale, nonfinite, g);
        }
      }
    }
    if constexpr (X_NHWC && CL == 32) {
      // a pixel's lanes are one warp: a butterfly in a fixed order, no barrier
#pragma unroll
      for (int r = 0; r < 3; ++r)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) g[r] += __shfl_xor_sync(0xffffffffu, g[r], o);
      if (lane == 0 && pix_ok) deft_write_point_grads(goffset, gmask, m, n, ho, wo, t, og, g);
    } else {
      deft_reduce_point_grads(&Red[0][0], g, lane == 0, CL,
                              [&](int u) { return X_NHWC ? p * CL + u : u * PIXB + p; }, goffset,
                              gmask, m, px, t, og);
      __syncthreads();  // Red is rewritten for the next tap
    }
  }
  if (nonfinite) atomicOr(&header[3], 1ull);
}
