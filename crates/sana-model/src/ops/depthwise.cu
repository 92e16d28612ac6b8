// Depthwise 3×3/5×5 convolutions on CUDA for Sana: the plain depthwise conv (DC-AE attention
// aggregation), the fused GLUMBConv middle in NCHW (DC-AE) and channels-last (DiT Mix-FFN).
// One thread per output element (grid-stride loops), f32 accumulation for every dtype.
// Compiled to PTX by crates/sana-model/build.rs with nvcc when the `cuda` feature is on and
// embedded in the binary; launched from ops/depthwise.rs (`mod cuda`).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// Plain depthwise conv: y[n, c] = b[c] + sum w[c] * x[n, c].
template <typename T>
__device__ void dw(const T* x, const T* w, const T* b, T* y, int nc, int c, int h, int wd,
                   int k, int pad, int oh, int ow) {
  long total = (long)nc * oh * ow;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int ox = i % ow; long t = i / ow; int oy = t % oh; long plane = t / oh; int ch = plane % c;
    const T* xp = x + plane * (long)h * wd; const T* wp = w + (long)ch * k * k;
    float acc = (float)b[ch];
    for (int ky = 0; ky < k; ++ky) {
      int iy = oy + ky - pad; if (iy < 0 || iy >= h) continue;
      for (int kx = 0; kx < k; ++kx) {
        int ix = ox + kx - pad; if (ix < 0 || ix >= wd) continue;
        acc += (float)wp[ky * k + kx] * (float)xp[(long)iy * wd + ix];
      }
    }
    y[i] = (T)acc;
  }
}

// Fused GLUMBConv middle: a = silu(x + b[0]); z = dw(a) + b[1]; y[:, j] = z[:, j] * silu(z[:, j + C/2]).
template <typename T>
__device__ void glu_dw(const T* x, const T* w, const T* b, T* y, int nhalf, int c, int h, int wd,
                       int k, int pad, int oh, int ow) {
  int half = c / 2;
  long total = (long)nhalf * oh * ow;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int ox = i % ow; long t = i / ow; int oy = t % oh; long plane = t / oh;
    int j = plane % half; long n = plane / half;
    float z[2];
    for (int s = 0; s < 2; ++s) {
      int ch = j + s * half;
      const T* xp = x + (n * c + ch) * (long)h * wd; const T* wp = w + (long)ch * k * k;
      float pb = (float)b[ch]; float acc = (float)b[c + ch];
      for (int ky = 0; ky < k; ++ky) {
        int iy = oy + ky - pad; if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
          int ix = ox + kx - pad; if (ix < 0 || ix >= wd) continue;
          acc += (float)wp[ky * k + kx] * silu((float)xp[(long)iy * wd + ix] + pb);
        }
      }
      z[s] = acc;
    }
    y[i] = (T)(z[0] * silu(z[1]));
  }
}

// Channels-last fused GLUMBConv middle: x [N, H, W, C] → y [N, H', W', C/2].
template <typename T>
__device__ void glu_dw_nhwc(const T* x, const T* w, const T* b, T* y, int nb, int c, int h, int wd,
                            int k, int pad, int oh, int ow) {
  int half = c / 2;
  long total = (long)nb * oh * ow * half;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int j = i % half; long t = i / half; int ox = t % ow; t /= ow; int oy = t % oh; long n = t / oh;
    float z[2];
    for (int s = 0; s < 2; ++s) {
      int ch = j + s * half;
      const T* wp = w + (long)ch * k * k;
      float pb = (float)b[ch]; float acc = (float)b[c + ch];
      for (int ky = 0; ky < k; ++ky) {
        int iy = oy + ky - pad; if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
          int ix = ox + kx - pad; if (ix < 0 || ix >= wd) continue;
          acc += (float)wp[ky * k + kx] * silu((float)x[((n * h + iy) * (long)wd + ix) * c + ch] + pb);
        }
      }
      z[s] = acc;
    }
    y[i] = (T)(z[0] * silu(z[1]));
  }
}

#define KERNELS(SUFFIX, T) \
extern "C" __global__ void dw_##SUFFIX(const T* x, const T* w, const T* b, T* y, int n, int c, int h, int wd, \
  int k, int pad, int oh, int ow) { dw<T>(x, w, b, y, n, c, h, wd, k, pad, oh, ow); } \
extern "C" __global__ void glu_dw_##SUFFIX(const T* x, const T* w, const T* b, T* y, int n, int c, int h, int wd, \
  int k, int pad, int oh, int ow) { glu_dw<T>(x, w, b, y, n, c, h, wd, k, pad, oh, ow); } \
extern "C" __global__ void glu_dw_nhwc_##SUFFIX(const T* x, const T* w, const T* b, T* y, int n, int c, int h, \
  int wd, int k, int pad, int oh, int ow) { glu_dw_nhwc<T>(x, w, b, y, n, c, h, wd, k, pad, oh, ow); }
KERNELS(f32, float)
KERNELS(f16, __half)
KERNELS(bf16, __nv_bfloat16)
