// deform_conv2d backward_weight on tensor cores, vectorised and pipelined. Same contract, grid
// and split partials as deform_conv_bwd_weight.cuh (a block owns a BO x BC tile of (output
// channel, input channel) for one tap and conv group, over one range of pixels, and writes
// its partial sums; deft_bwd_weight_reduce adds them in a fixed order), with a different
// schedule for each slice of BPW pixels:
//  - the sampled input tile A[p][c] is gathered as 16-byte channel vectors (one load per
//    corner for VA channels) by all threads, each computing its own pixel's sampling point;
//  - the grad_out tile arrives by cp.async;
//  - both are double-buffered: the next slice's corner vectors and grad_out are in flight while
//    the tensor cores multiply the current one, one barrier per slice.
// Needs the channels-last input (nhwc layers, or the transpose pre-pass); the plan checks the
// vector alignment.
//
// Constants from codegen: BO, BC, BPW, WK, FPW, TC_PAD, THREADS, SPLITS, SPLIT_PIX, GV
// (grad_out copy vector, elements), SMEM_BYTES.

constexpr int VA = 16 / sizeof(T);                       // channels per gather vector
constexpr int A_LD = BC + TC_PAD;                        // As[p][c]
constexpr int G_LD = NHWC ? BO + TC_PAD : BPW + TC_PAD;  // Gs[p][o] (nhwc) or Gs[o][p] (nchw)
constexpr int G_ROWS = NHWC ? BPW : BO;
constexpr int R_LD = BC + 4;
constexpr int align128(int b) { return (b + 127) / 128 * 128; }
constexpr int A_BYTES = align128(BPW * A_LD * (int)sizeof(Stage));
constexpr int G_BYTES = align128(G_ROWS * G_LD * (int)sizeof(Stage));
constexpr int ITEMS = BPW * (BC / VA) / THREADS;  // (pixel, channel vector) pairs per thread
static_assert(ITEMS * THREADS == BPW * (BC / VA), "gather items");
static_assert(2 * (A_BYTES + G_BYTES) <= SMEM_BYTES && BO * R_LD * 4 <= SMEM_BYTES, "smem plan");

template <bool PIXEL_MAJOR>
struct DeftGoutLayout {
  typedef nvcuda::wmma::row_major type;  // Gs[o][p]
};
template <>
struct DeftGoutLayout<true> {
  typedef nvcuda::wmma::col_major type;  // Gs[p][o]
};

// One slice's corner vectors and weights, loaded before the tile product and combined into
// the A tile after it.
struct WSlice {
  uint4 raw[ITEMS][4];
  Acc w[ITEMS][4];
};

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  deft_grid_begin();
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  Stage* As[2] = {reinterpret_cast<Stage*>(smem), reinterpret_cast<Stage*>(smem + A_BYTES)};
  Stage* Gs[2] = {reinterpret_cast<Stage*>(smem + 2 * A_BYTES),
                  reinterpret_cast<Stage*>(smem + 2 * A_BYTES + G_BYTES)};
  float* Red = reinterpret_cast<float*>(smem);  // reuses the tiles after the main loop

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const WeightTile wt = deft_weight_tile<BO, BC>();
  const int o0 = wt.o0, cl0 = wt.cl0, t = wt.t, g = wt.g, og = wt.og;
  const long long c0 = wt.c0, p_begin = wt.p_begin, p_end = wt.p_end;

  auto load_gout = [&](long long p0, Stage* dst) {
    if (NHWC) {
      constexpr int PER = BO / GV;
      for (int e = tid; e < BPW * PER; e += THREADS) {
        const int pp = e / PER, oo = (e % PER) * GV;
        const long long mm = p0 + pp;
        const bool ok = mm < p_end && o0 + oo < KG;
        deft_cp_async<GV * (int)sizeof(T)>(dst + pp * G_LD + oo,
                                           ok ? gout + mm * K + g * KG + o0 + oo : gout, ok);
      }
    } else {
      constexpr int PER = BPW / GV;
      for (int e = tid; e < BO * PER; e += THREADS) {
        const int oo = e / PER, pp = (e % PER) * GV;
        const long long mm = p0 + pp;
        const bool ok = mm < p_end && o0 + oo < KG;
        const long long n = ok ? mm / (HO * WO) : 0;
        const T* src = ok ? gout + (n * K + g * KG + o0 + oo) * (HO * WO) + (mm - n * (HO * WO)) : gout;
        deft_cp_async<GV * (int)sizeof(T)>(dst + oo * G_LD + pp, src, ok);
      }
    }
    deft_cp_commit<>();
  };
  auto gather = [&](long long p0, WSlice& a) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int e = tid + i * THREADS;
      const int pp = e / (BC / VA), cv = (e % (BC / VA)) * VA;
      const long long mm = p0 + pp;
#pragma unroll
      for (int q = 0; q < 4; ++q) a.w[i][q] = Acc(0);
      if (mm < p_end) {
        const long long n = mm / (HO * WO);
        const int rem = int(mm - n * (HO * WO));
        const SamplePoint sp = deft_sample_point(offset, mask, n, rem / WO, rem % WO, t, og);
        const T* src = input + n * (C * H * W) + c0 + cv;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          a.raw[i][q] = __ldg(reinterpret_cast<const uint4*>(src + sp.off[q]));
          a.w[i][q] = sp.w[q];
        }
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) a.raw[i][q] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto combine = [&](const WSlice& a, Stage* dst) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int e = tid + i * THREADS;
      const int pp = e / (BC / VA), cv = (e % (BC / VA)) * VA;
      union Vec {
        uint4 u;
        T t[VA];
      };
      Acc acc[VA];
#pragma unroll
      for (int v = 0; v < VA; ++v) acc[v] = Acc(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Vec x;
        x.u = a.raw[i][q];
#pragma unroll
        for (int v = 0; v < VA; ++v) acc[v] += a.w[i][q] * Acc(deft_widen(x.t[v]));
      }
      union StageVec {
        uint4 u;
        Stage s[16 / sizeof(Stage)];
      } out;
      static_assert(sizeof(Stage) == sizeof(T), "tile holds the storage type");
#pragma unroll
      for (int v = 0; v < VA; ++v) out.s[v] = deft_cast<Stage>(acc[v]);
      *reinterpret_cast<uint4*>(dst + pp * A_LD + cv) = out.u;
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, WK, float> cf[FPW];
#pragma unroll
  for (int f = 0; f < FPW; ++f) wmma::fill_fragment(cf[f], 0.0f);
  typedef typename DeftGoutLayout<NHWC>::type GLayout;

  WSlice a;
  if (p_begin < p_end) {
    load_gout(p_begin, Gs[0]);
    gather(p_begin, a);
    combine(a, As[0]);
    deft_cp_wait<0>();
  }
  __syncthreads();
  int cur = 0;
#pragma unroll 1
  for (long long p0 = p_begin; p0 < p_end; p0 += BPW, cur ^= 1) {
    const bool next = p0 + BPW < p_end;
    if (next) {  // the next slice loads while this one multiplies
      load_gout(p0 + BPW, Gs[cur ^ 1]);
      gather(p0 + BPW, a);
    }
    const Stage* as = As[cur];
    const Stage* gs = Gs[cur];
#pragma unroll
    for (int kk = 0; kk < BPW; kk += WK) {
      wmma::fragment<wmma::matrix_a, 16, 16, WK, TcIn, GLayout> fa;
      int a_row = -1;
#pragma unroll
      for (int f = 0; f < FPW; ++f) {
        const int fi = warp * FPW + f, fm = fi / (BC / 16), fn = fi % (BC / 16);
        if (fm != a_row) {  // warp-uniform
          wmma::load_matrix_sync(fa, NHWC ? gs + kk * G_LD + fm * 16 : gs + (fm * 16) * G_LD + kk,
                                 G_LD);
          TC_CONVERT(fa);
          a_row = fm;
        }
        wmma::fragment<wmma::matrix_b, 16, 16, WK, TcIn, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, as + kk * A_LD + fn * 16, A_LD);
        TC_CONVERT(fb);
        wmma::mma_sync(cf[f], fa, fb, cf[f]);
      }
    }
    if (next) {
      combine(a, As[cur ^ 1]);
      deft_cp_wait<0>();
    }
    __syncthreads();
  }

#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int fi = warp * FPW + f, fm = fi / (BC / 16), fn = fi % (BC / 16);
    wmma::store_matrix_sync(Red + (fm * 16) * R_LD + fn * 16, cf[f], R_LD, wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = tid; e < BO * BC; e += THREADS) {
    const int oo = e / BC, cc = e % BC;
    const int o = o0 + oo, cl = cl0 + cc;
    if (o < KG)
      partial[(long long)blockIdx.z * W_ELEMS + (((long long)g * KG + o) * CG + cl) * TAPS + t] =
          Acc(Red[oo * R_LD + cc]);
  }
}
