#include "model/cpu/linear.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "io/mxfp4.h"

namespace ossrl {

namespace {

// Below this many multiply-adds a parallel region costs more than it saves (the tiny test
// models run thousands of small products).
bool worth_threads(int64_t flops) { return flops >= (int64_t(1) << 18); }

// x · w over n values in eight interleaved partial sums: independent lanes the compiler
// turns into SIMD without -ffast-math, in a fixed order, so results stay reproducible.
float dot(const float* x, const float* w, int64_t n) {
  float lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += x[i + l] * w[i + l];
  }
  for (; i < n; ++i) lane[0] += x[i] * w[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Row-major [out, in]: one decoded row, n dot products. Parallel over output rows.
void linear_rows(float* y, const float* x, const WeightMatrix& w, const float* bias, int64_t n) {
#pragma omp parallel if (worth_threads(n * w.out * w.in))
  {
    std::vector<float> row(size_t(w.in));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < w.out; ++o) {
      w.decode_row(o, row.data());
      const float b = bias ? bias[o] : 0.0f;
      for (int64_t t = 0; t < n; ++t) y[t * w.out + o] = dot(x + t * w.in, row.data(), w.in) + b;
    }
  }
}

// Transposed [in, out]: the stored rows are input features, so each thread owns a strip of
// output columns and accumulates x[t, i] * W[i, strip] over i, decoding each strip once.
void linear_transposed(float* y, const float* x, const WeightMatrix& w, const float* bias, int64_t n) {
  constexpr int64_t kStrip = 256;
  const int64_t strips = (w.out + kStrip - 1) / kStrip;
#pragma omp parallel if (worth_threads(n * w.out * w.in))
  {
    std::vector<float> seg(static_cast<size_t>(kStrip));
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t o0 = s * kStrip;
      const int64_t o1 = std::min(w.out, o0 + kStrip);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t o = o0; o < o1; ++o) y[t * w.out + o] = 0.0f;
      }
      for (int64_t i = 0; i < w.in; ++i) {
        w.decode_stored(i, o0, o1, seg.data());
        for (int64_t t = 0; t < n; ++t) {
          const float xi = x[t * w.in + i];
          float* yt = y + t * w.out;
          for (int64_t o = o0; o < o1; ++o) yt[o] += xi * seg[size_t(o - o0)];
        }
      }
      if (bias) {
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t o = o0; o < o1; ++o) y[t * w.out + o] += bias[o];
        }
      }
    }
  }
}

}  // namespace

void linear_forward(float* y, const float* x, const WeightMatrix& w, const float* bias, int64_t n) {
  if (w.transposed) {
    linear_transposed(y, x, w, bias, n);
  } else {
    linear_rows(y, x, w, bias, n);
  }
}

void linear_backward_input(float* dx, const float* dy, const WeightMatrix& w, int64_t n) {
  if (w.transposed) {
    // Stored [in, out]: dx[t, i] += dy[t, :] · stored row i, one decode per row.
#pragma omp parallel if (worth_threads(n * w.out * w.in))
    {
      std::vector<float> row(size_t(w.out));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < w.in; ++i) {
        w.decode_stored(i, 0, w.out, row.data());
        for (int64_t t = 0; t < n; ++t) dx[t * w.in + i] += dot(dy + t * w.out, row.data(), w.out);
      }
    }
    return;
  }
  // Stored [out, in]: each thread owns a strip of input columns (a multiple of 32, whole
  // MXFP4 blocks) and sums dy[t, o] * W[o, strip] over o, decoding each strip once.
  constexpr int64_t kStrip = 256;
  const int64_t strips = (w.in + kStrip - 1) / kStrip;
#pragma omp parallel if (worth_threads(n * w.out * w.in))
  {
    std::vector<float> seg(static_cast<size_t>(kStrip));
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t i0 = s * kStrip;
      const int64_t i1 = std::min(w.in, i0 + kStrip);
      for (int64_t o = 0; o < w.out; ++o) {
        w.decode_stored(o, i0, i1, seg.data());
        for (int64_t t = 0; t < n; ++t) {
          const float g = dy[t * w.out + o];
          if (g == 0.0f) continue;
          float* dxt = dx + t * w.in;
          for (int64_t i = i0; i < i1; ++i) dxt[i] += g * seg[size_t(i - i0)];
        }
      }
    }
  }
}

void linear_backward_weight(float* dw, float* db, const float* dy, const float* x, int64_t n,
                            int64_t out, int64_t in) {
#pragma omp parallel for schedule(static) if (worth_threads(n * out * in))
  for (int64_t o = 0; o < out; ++o) {
    float* dwo = dw + o * in;
    for (int64_t t = 0; t < n; ++t) {
      const float g = dy[t * out + o];
      if (g == 0.0f) continue;
      const float* xt = x + t * in;
      for (int64_t i = 0; i < in; ++i) dwo[i] += g * xt[i];
    }
    if (db) {
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) sum += dy[t * out + o];
      db[o] += sum;
    }
  }
}

WeightMatrix fp32_matrix(const float* data, int64_t out, int64_t in) {
  return WeightMatrix{WeightFormat::F32, out, in, false, reinterpret_cast<const uint8_t*>(data), nullptr};
}

WeightMatrix weight_rows(const WeightMatrix& w, int64_t begin, int64_t end) {
  OSSRL_CHECK(!w.transposed && begin >= 0 && begin <= end && end <= w.out,
              "weight_rows: rows [{}, {}) of a {}x{}{} matrix", begin, end, w.out, w.in,
              w.transposed ? " transposed" : "");
  WeightMatrix v = w;
  v.out = end - begin;
  switch (w.format) {
    case WeightFormat::F32: v.data = w.data + begin * w.in * 4; break;
    case WeightFormat::BF16: v.data = w.data + begin * w.in * 2; break;
    case WeightFormat::MXFP4:
      v.data = w.data + begin * (w.in / 2);
      v.scales = w.scales + begin * (w.in / kMxfp4BlockValues);
      break;
  }
  return v;
}

void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t n, int64_t hidden) {
  for (int64_t t = 0; t < n; ++t) {
    float* row = dtable + int64_t(tokens[t]) * hidden;
    for (int64_t i = 0; i < hidden; ++i) row[i] += dout[t * hidden + i];
  }
}

void embedding_forward(float* out, const int32_t* tokens, int64_t n, const WeightMatrix& w) {
  for (int64_t t = 0; t < n; ++t) {
    OSSRL_CHECK(tokens[t] >= 0 && tokens[t] < w.out, "token id {} is outside the vocabulary [0, {})",
                tokens[t], w.out);
    w.decode_row(tokens[t], out + t * w.in);
  }
}

}  // namespace ossrl
