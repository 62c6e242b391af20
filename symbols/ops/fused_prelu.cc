// Fused per-channel PReLU for MXNet 1.9 (library API, include/mxnet/lib_api.h of the pip wheel).
//
//   y[b,c,s]  = x > 0 ? x : gamma[c] * x                       (forward)
//   dx        = x > 0 ? dy : gamma[c] * dy                      (backward, data)
//   dgamma[c] = sum_{b,s} (x > 0 ? 0 : dy * x)                  (backward, slope; the TRUE gradient)
//
// insightface builds this activation as mx.sym.LeakyReLU(act_type='prelu') (symbol/fresnet.py `Act`,
// symbol/fmobilefacenet.py `Act`), whose CPU kernels are slow and whose gamma gradient is wrong when the input
// comes straight from a Convolution in MXNet 1.9.1; this operator computes the same function in one pass.
//
// Inputs: data (B, C, ...) float32 (2-D (B, C) and 4-D (B, C, H, W) are the cases the nets use; any rank >= 2
// works), gamma (C,) float32. Output: (B, C, ...). Optional attribute num_channels (checked against C).
// Parallel: OpenMP over the B*C planes (forward and backward); dgamma is reduced deterministically: each plane's
// partial sum (float blocks of 512 accumulated in double) is computed by one thread in a fixed order, then summed over b in order per channel, so
// the result does not depend on the number of threads.
// Gradient at x == 0 matches relu(x) + gamma*(x - relu(x)) (symbols/common.py fast_prelu): dx = gamma*dy.
// grad_req 'add' is not available through the library API: gradients are written, never accumulated.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"

using namespace mxnet::ext;

#define FUSED_PRELU_ABI 1

static std::atomic<long long> g_forward_calls{0};
static std::atomic<long long> g_backward_calls{0};
static std::atomic<int> g_last_threads{0};

extern "C" {
// which: 0 forward calls, 1 backward calls. Read by symbols/ops (ctypes) to prove the op actually ran.
long long fused_prelu_call_count(int which) {
  return which == 0 ? g_forward_calls.load() : g_backward_calls.load();
}
void fused_prelu_reset_counts() {
  g_forward_calls = 0;
  g_backward_calls = 0;
}
// OpenMP threads used by the last forward/backward call.
int fused_prelu_last_threads() { return g_last_threads.load(); }
int fused_prelu_abi() { return FUSED_PRELU_ABI; }
}

namespace {

// The kernels are cloned for AVX2 and baseline x86-64 (picked at load time), so one build runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PRELU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PRELU_CLONES
#endif

// The loops are written so that GCC vectorizes them (checked with -fopt-info-vec; symbols/ops/build.py compiles
// with -fno-trapping-math, without which the backward select stays a branch and ran ~30x slower on random signs):
// forward as max(x, 0) + a * min(x, 0) (exact: one term is 0; NaN propagates), backward with both branches
// computed and then selected.
PRELU_CLONES
void plane_forward(const float* x, float* y, float a, int64_t n) {
  for (int64_t s = 0; s < n; ++s) {
    const float v = x[s];
    y[s] = std::max(v, 0.f) + a * std::min(v, 0.f);
  }
}

// Returns sum over the plane of (x > 0 ? 0 : dy * x): float partial sums over blocks of 512 (vectorized, fixed
// order for a given build and CPU), accumulated in double.
PRELU_CLONES
double plane_backward(const float* x, const float* dy, float* dx, float a, int64_t n) {
  double acc = 0.0;
  for (int64_t s0 = 0; s0 < n; s0 += 512) {
    const int64_t e = n - s0 < 512 ? n : s0 + 512;
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t s = s0; s < e; ++s) {
      const float v = x[s];
      const float d = dy[s];
      const float ad = a * d;
      const float prod = d * v;
      const bool pos = v > 0.f;
      dx[s] = pos ? d : ad;
      part += pos ? 0.f : prod;
    }
    acc += part;
  }
  return acc;
}

bool dims(const MXTensor& data, int64_t* B, int64_t* C, int64_t* S) {
  if (data.shape.size() < 2) return false;
  *B = data.shape[0];
  *C = data.shape[1];
  int64_t s = 1;
  for (size_t i = 2; i < data.shape.size(); ++i) s *= data.shape[i];
  *S = s;
  return true;
}

MXReturnValue forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  MXTensor& data = inputs->at(0);
  MXTensor& gamma = inputs->at(1);
  MXTensor& out = outputs->at(0);
  if (data.dtype != kFloat32 || gamma.dtype != kFloat32) {
    MX_ERROR_MSG << "fused_prelu: float32 only";
    return MX_FAIL;
  }
  int64_t B, C, S;
  if (!dims(data, &B, &C, &S)) return MX_FAIL;
  const float* x = data.data<float>();
  const float* g = gamma.data<float>();
  float* y = out.data<float>();
  const int64_t P = B * C;
  int used = 1;
  if (S == 1) {  // (B, C): rows
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      if (b == 0) used = omp_get_num_threads();
      const float* xr = x + b * C;
      float* yr = y + b * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = xr[c];
        yr[c] = std::max(v, 0.f) + g[c] * std::min(v, 0.f);
      }
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      if (p == 0) used = omp_get_num_threads();
      plane_forward(x + p * S, y + p * S, g[p % C], S);
    }
  }
  g_last_threads = used;
  ++g_forward_calls;
  return MX_SUCCESS;
}

// inputs: [dy, data, gamma, y]; outputs: [ddata, dgamma]
MXReturnValue backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  MXTensor& ograd = inputs->at(0);
  MXTensor& data = inputs->at(1);
  MXTensor& gamma = inputs->at(2);
  int64_t B, C, S;
  if (!dims(data, &B, &C, &S)) return MX_FAIL;
  const float* dy = ograd.data<float>();
  const float* x = data.data<float>();
  const float* g = gamma.data<float>();
  float* dx = outputs->at(0).data<float>();
  float* dg = outputs->at(1).data<float>();
  const int64_t P = B * C;
  int used = 1;
  if (S == 1) {  // (B, C): dx by rows, dgamma by channels (each summed over b in order)
#pragma omp parallel
    {
#pragma omp single
      used = omp_get_num_threads();
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        const float* xr = x + b * C;
        const float* dr = dy + b * C;
        float* dxr = dx + b * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = dr[c];
          const float gd = g[c] * d;
          dxr[c] = xr[c] > 0.f ? d : gd;
        }
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          const float v = x[b * C + c];
          if (!(v > 0.f)) acc += static_cast<double>(dy[b * C + c]) * static_cast<double>(v);
        }
        dg[c] = static_cast<float>(acc);
      }
    }
  } else {
    std::vector<double> part(static_cast<size_t>(P));
    double* pp = part.data();
#pragma omp parallel
    {
#pragma omp single
      used = omp_get_num_threads();
#pragma omp for schedule(static)
      for (int64_t p = 0; p < P; ++p) {
        pp[p] = plane_backward(x + p * S, dy + p * S, dx + p * S, g[p % C], S);
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) acc += pp[b * C + c];
        dg[c] = static_cast<float>(acc);
      }
    }
  }
  g_last_threads = used;
  ++g_backward_calls;
  return MX_SUCCESS;
}

MXReturnValue parse_attrs(const std::unordered_map<std::string, std::string>& attrs,
                          int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue infer_type(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  for (size_t i = 0; i < in_types->size(); ++i) {
    int t = in_types->at(i);
    if (t != -1 && t != kFloat32) {
      MX_ERROR_MSG << "fused_prelu: input " << i << " has dtype " << t << "; only float32 is supported";
      return MX_FAIL;
    }
    (*in_types)[i] = kFloat32;
  }
  out_types->at(0) = kFloat32;
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<std::vector<unsigned int>>* in_shapes,
                          std::vector<std::vector<unsigned int>>* out_shapes) {
  const std::vector<unsigned int>& d = in_shapes->at(0);
  if (d.size() < 2) {
    MX_ERROR_MSG << "fused_prelu: data must have rank >= 2 (B, C, ...), got rank " << d.size();
    return MX_FAIL;
  }
  const unsigned int C = d[1];
  auto it = attrs.find("num_channels");
  if (it != attrs.end() && C != 0 && std::stoul(it->second) != C) {
    MX_ERROR_MSG << "fused_prelu: num_channels=" << it->second << " but data has " << C << " channels";
    return MX_FAIL;
  }
  std::vector<unsigned int>& g = (*in_shapes)[1];
  if (g.empty()) {
    g = {C};
  } else if (g.size() != 1 || (g[0] != 0 && C != 0 && g[0] != C)) {
    MX_ERROR_MSG << "fused_prelu: gamma must have shape (" << C << ",)";
    return MX_FAIL;
  }
  out_shapes->at(0) = d;
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(fused_prelu)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu")
    .setParseAttrs(parse_attrs)
    .setInferType(infer_type)
    .setInferShape(infer_shape);

MXReturnValue initialize(int version) {
  if (version >= 10700) return MX_SUCCESS;
  MX_ERROR_MSG << "fused_prelu: MXNet " << version << " is older than 1.7";
  return MX_FAIL;
}
