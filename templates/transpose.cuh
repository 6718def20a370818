// [batch][rows][cols] -> [batch][cols][rows] in 64 x 64 tiles (deft_transpose_tile in
// common.cuh): used to turn an nchw input into nhwc (rows = C, cols = H*W) and a kcrs weight
// into krsc (rows = C/groups, cols = R*S) before the gather kernel, so that its corner loads
// are 16-byte channel vectors. Grid: (cols / 64, rows / 64, batch) rounded up; 256 threads.
// Whole 16-byte vectors on both sides where the extents and pointers allow it (the image of
// an input whose channels and pixels are multiples of 8 f16 or 4 f32), else pairs or single
// elements.
extern "C" __global__ void __launch_bounds__(256)
    deft_transpose(const T* __restrict__ src, T* __restrict__ dst, long long rows,
                   long long cols) {
  deft_grid_begin();
  const long long b = blockIdx.z;
  const T* s = src + b * rows * cols;
  T* d = dst + b * rows * cols;
  const long long r0 = (long long)blockIdx.y * 64, c0 = (long long)blockIdx.x * 64;
  if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
    if (deft_transpose_vec16(src, dst, rows, cols)) {  // 16-byte vectors (perf notes round 14)
      deft_transpose_tile16(s, d, rows, cols, r0, c0);
      return;
    }
  }
  deft_transpose_tile(s, d, rows, cols, r0, c0, deft_transpose_pairs(src, dst, rows, cols),
                      [](T v) { return v; });
}
