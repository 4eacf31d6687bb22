// Finite-difference gradient checks for the fp32 CPU ops and the training policy.
//
// The loss is a fixed random linear functional of the outputs, summed in double. Each input
// is perturbed by ±eps in fp32 and the central difference divides by the change fp32 really
// made (x+eps and x-eps are rounded), in double. With fp32 forwards the difference carries
// ~1e-7/eps relative rounding noise and O(eps²) truncation, so the comparison is norm-wise
// per tensor: |analytic - numeric|₂ / |numeric|₂ <= tol (tolerances stated at each use).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace ossrl::testing {

inline std::vector<float> random_floats(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Σ w_i y_i in double.
inline double weighted_sum(const float* y, const std::vector<float>& w) {
  double s = 0;
  for (size_t i = 0; i < w.size(); ++i) s += double(w[i]) * double(y[i]);
  return s;
}

// Central differences of loss() with respect to x[i] for every i in `which` (all when
// empty); x is restored. Entries not in `which` are NaN.
inline std::vector<double> numeric_grad(float* x, size_t n, const std::function<double()>& loss, float eps,
                                        const std::vector<size_t>& which = {}) {
  std::vector<double> g(n, NAN);
  auto one = [&](size_t i) {
    const float x0 = x[i];
    const float xp = x0 + eps, xm = x0 - eps;
    x[i] = xp;
    const double lp = loss();
    x[i] = xm;
    const double lm = loss();
    x[i] = x0;
    g[i] = (lp - lm) / (double(xp) - double(xm));
  };
  if (which.empty()) {
    for (size_t i = 0; i < n; ++i) one(i);
  } else {
    for (size_t i : which) one(i);
  }
  return g;
}

// As numeric_grad over every entry, for losses with jumps (a top-k routing choice that
// flips inside ±eps): where the one-sided differences disagree by more than
// kink_threshold the entry is left NaN (not compared) and counted in *kinks.
inline std::vector<double> numeric_grad_skipping_kinks(float* x, size_t n, const std::function<double()>& loss,
                                                       float eps, double kink_threshold, size_t* kinks) {
  std::vector<double> g(n, NAN);
  const double l0 = loss();
  for (size_t i = 0; i < n; ++i) {
    const float x0 = x[i];
    const float xp = x0 + eps, xm = x0 - eps;
    x[i] = xp;
    const double lp = loss();
    x[i] = xm;
    const double lm = loss();
    x[i] = x0;
    const double forward = (lp - l0) / (double(xp) - double(x0));
    const double backward = (l0 - lm) / (double(x0) - double(xm));
    if (std::abs(forward - backward) > kink_threshold) {
      ++*kinks;
      continue;
    }
    g[i] = (lp - lm) / (double(xp) - double(xm));
  }
  return g;
}

struct GradError {
  double relative = 0;  // |a - n|₂ / |n|₂ over the checked entries
  double norm = 0;      // |n|₂
  double diff = 0;      // |a - n|₂
  size_t checked = 0;   // entries compared (not NaN)
};

inline GradError grad_error(const float* analytic, const std::vector<double>& numeric) {
  double diff = 0, ref = 0;
  size_t checked = 0;
  for (size_t i = 0; i < numeric.size(); ++i) {
    if (std::isnan(numeric[i])) continue;
    ++checked;
    diff += (double(analytic[i]) - numeric[i]) * (double(analytic[i]) - numeric[i]);
    ref += numeric[i] * numeric[i];
  }
  return {std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30), std::sqrt(ref), std::sqrt(diff), checked};
}

// Checks one tensor's analytic gradient against central differences; the numeric gradient
// must not vanish (a check of zeros against zeros proves nothing).
inline void expect_grad(const std::string& what, const float* analytic, const std::vector<double>& numeric,
                        double tol) {
  const GradError e = grad_error(analytic, numeric);
  EXPECT_GT(e.norm, 1e-6) << what << ": the gradient vanishes, nothing is checked";
  EXPECT_LE(e.relative, tol) << what << ": relative error " << e.relative << " (|grad| " << e.norm << ")";
  if (std::getenv("OSSRL_GRAD_VERBOSE")) {
    std::printf("[ grad     ] %-40s relative error %.2e  |grad| %.3e\n", what.c_str(), e.relative, e.norm);
  }
}

}  // namespace ossrl::testing
