// [batch][rows][cols] -> [batch][cols][rows] in 64 x 64 tiles (deft_transpose_tile in
// common.cuh): used to turn an nchw input into nhwc (rows = C, cols = H*W) and a kcrs weight
// into krsc (rows = C/groups, cols = R*S) before the gather kernel, so that its corner loads
// are 16-byte channel vectors. Grid: (cols / 64, rows / 64, batch) rounded up; 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    deft_transpose(const T* __restrict__ src, T* __restrict__ dst, long long rows,
                   long long cols) {
  const long long b = blockIdx.z;
  const T* s = src + b * rows * cols;
  T* d = dst + b * rows * cols;
  deft_transpose_tile(s, d, rows, cols, (long long)blockIdx.y * 64, (long long)blockIdx.x * 64,
                      deft_transpose_pairs(src, dst, rows, cols), [](T v) { return v; });
}
