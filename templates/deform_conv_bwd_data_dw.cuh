// deform_conv2d backward_data for depthwise layers (groups == c == k): the column gradient of
// channel c is just weight[c][tap] * grad_out[c][pixel], so there is no GEMM. A block owns
// PIXB output pixels and one offset group; CL threads share a pixel and split its channels
// (nhwc: CL = 32 lanes of a warp on neighbouring channels; nchw: PIXB = 32 pixels along the
// lanes, CL warps). Per tap, each thread scatters its channels' contributions into grad input
// (as in deform_conv_bwd_data.cuh: float atomics, or 64-bit fixed point when deterministic)
// and accumulates grad offset / grad mask partials, which the CL threads of a pixel then sum
// in a fixed order through shared memory.
//
// Constants from codegen: PIXB, CL, THREADS (= PIXB * CL), GIN_MODE.

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ gout, GinT* __restrict__ gin, T* __restrict__ goffset,
                T* __restrict__ gmask, unsigned long long* __restrict__ header) {
  __shared__ Acc Red[3][THREADS];
  const int tid = threadIdx.x;
  const int p = X_NHWC ? tid / CL : tid % PIXB;
  const int lane = X_NHWC ? tid % CL : tid / PIXB;
  const int og = blockIdx.y;
  const long long m = (long long)blockIdx.x * PIXB + p;
  const bool pix_ok = m < M_TOTAL;
  long long n = 0;
  int ho = 0, wo = 0;
  if (pix_ok) {
    n = m / (HO * WO);
    const int rem = int(m - n * (HO * WO));
    ho = rem / WO;
    wo = rem % WO;
  }
  const long long q_img = (long long)ho * WO + wo;
#if GIN_MODE == 2
  const double scale = deft_fixed_scale(header);
  bool nonfinite = header[3] != 0ull;
#endif

#pragma unroll 1
  for (int t = 0; t < TAPS; ++t) {
    Acc g_dy = Acc(0), g_dx = Acc(0), g_m = Acc(0);
    if (pix_ok) {
      const BwdPoint pt = deft_bwd_point(offset, mask, n, ho, wo, t, og);
      const T* image = input + n * (C * H * W);
#pragma unroll 2
      for (int c = og * CPOG + lane; c < (og + 1) * CPOG; c += CL) {
        const Acc cg = Acc(deft_widen(weight[(long long)c * TAPS + t])) *
                       Acc(deft_widen(gout[deft_gout_index(n, c, q_img)]));
        const long long cbase = X_NHWC ? (long long)c : (long long)c * H * W;
        Acc v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
          v[q] = (pt.valid >> q) & 1 ? Acc(deft_widen(image[cbase + pt.off[q]])) : Acc(0);
        const Acc val = pt.w[0] * v[0] + pt.w[1] * v[1] + pt.w[2] * v[2] + pt.w[3] * v[3];
        g_m += cg * val;
        const Acc cgm = cg * pt.mod;
        g_dy += cgm * (pt.hx * (v[2] - v[0]) + pt.lx * (v[3] - v[1]));
        g_dx += cgm * (pt.hy * (v[1] - v[0]) + pt.ly * (v[3] - v[2]));
        if (gin) {
          GinT* dst = gin + n * (C * H * W) + cbase;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (!((pt.valid >> q) & 1)) continue;
            const Acc contrib = cgm * pt.w[q];
#if GIN_MODE == 0
            atomicAdd(dst + pt.off[q], contrib);
#elif GIN_MODE == 1
            atomicAdd(dst + pt.off[q], contrib);
#else
            const double sc = (double)contrib * scale;
            if (!(fabs(sc) <= 1.1529215046068470e18)) nonfinite = true;
            else atomicAdd(dst + pt.off[q], (unsigned long long)__double2ll_rn(sc));
#endif
          }
        }
      }
    }
    Red[0][tid] = g_dy;
    Red[1][tid] = g_dx;
    Red[2][tid] = g_m;
    __syncthreads();
    if (lane == 0 && pix_ok) {
      Acc s[3] = {Acc(0), Acc(0), Acc(0)};
      for (int u = 0; u < CL; ++u) {
        const int th = X_NHWC ? p * CL + u : u * PIXB + p;
#pragma unroll
        for (int r = 0; r < 3; ++r) s[r] += Red[r][th];
      }
      deft_write_point_grads(goffset, gmask, m, n, ho, wo, t, og, s);
    }
    __syncthreads();
  }
#if GIN_MODE == 2
  if (nonfinite) atomicOr(&header[3], 1ull);
#endif
}
