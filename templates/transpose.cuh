// [batch][rows][cols] -> [batch][cols][rows] through a 32x32 shared-memory tile: used to turn
// an nchw input into nhwc (rows = C, cols = H*W) and a kcrs weight into krsc (rows = C/groups,
// cols = R*S) before the gather kernel, so that its corner loads are 16-byte channel vectors.
extern "C" __global__ void __launch_bounds__(256)
    deft_transpose(const T* __restrict__ src, T* __restrict__ dst, long long rows,
                   long long cols) {
  __shared__ T tile[32][33];
  const long long b = blockIdx.z;
  const long long r0 = (long long)blockIdx.y * 32, c0 = (long long)blockIdx.x * 32;
  const T* s = src + b * rows * cols;
  T* d = dst + b * rows * cols;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const long long r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = s[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const long long c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) d[c * rows + r] = tile[threadIdx.x][i];
  }
}
