#include "rewards/matmul_env.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "core/error.h"
#include "rewards/matmul_runner.h"
#include "rewards/sandbox_python.h"

namespace ossrl {
namespace {

using Clock = SandboxClock;

// The baseline of the speed part: the textbook i-j-k triple loop.
constexpr const char* kReference = R"(def matmul(A, B):
    m, k, n = len(A), len(B), len(B[0])
    C = [[0] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            s = 0
            for t in range(k):
                s += A[i][t] * B[t][j]
            C[i][j] = s
    return C
)";

Clock::time_point after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string one_line(std::string_view text, size_t limit = 200) {
  std::string out;
  for (char c : text) {
    if (out.size() >= limit) break;
    const bool space = c == '\n' || c == '\r' || c == '\t' || c == ' ';
    if (!space || (!out.empty() && out.back() != ' ')) out += space ? ' ' : c;
  }
  return out;
}

// One product to check: A (m x k) @ B (k x n), row-major, with its expected value. Integer
// problems hold integers in [-1000, 1000]: every partial sum (|.| <= 64 * 10^6) is exact in
// a double, so they are checked exactly. Float problems hold uniform [-1, 1) values.
struct Problem {
  bool integers = true;
  int m = 0, k = 0, n = 0;
  std::vector<double> a, b, expected, magnitude;  // magnitude: sum_t |a_it b_tj|

  std::string shape() const { return fmt::format("{} {}x{} @ {}x{}", integers ? "int" : "float", m, k, k, n); }

  // The request line and rows, as the runner reads them.
  std::string request() const {
    std::string text = fmt::format("{} {} {} {}\n", integers ? "int" : "float", m, k, n);
    auto rows = [&](const std::vector<double>& x, int count, int width) {
      for (int r = 0; r < count; ++r) {
        for (int c = 0; c < width; ++c) {
          const double v = x[static_cast<size_t>(r) * width + c];
          // Floats in shortest round-trip form, so Python's float() reads the same value.
          if (integers) fmt::format_to(std::back_inserter(text), "{}{}", c ? " " : "", static_cast<long long>(v));
          else fmt::format_to(std::back_inserter(text), "{}{}", c ? " " : "", v);
        }
        text += '\n';
      }
    };
    rows(a, m, k);
    rows(b, k, n);
    return text;
  }
};

Problem make_problem(std::mt19937_64& rng, bool integers, int m, int k, int n) {
  Problem p{integers, m, k, n, {}, {}, {}, {}};
  std::uniform_int_distribution<int> small(-1000, 1000);
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  auto draw = [&] { return integers ? static_cast<double>(small(rng)) : unit(rng); };
  p.a.resize(static_cast<size_t>(m) * k);
  p.b.resize(static_cast<size_t>(k) * n);
  for (double& x : p.a) x = draw();
  for (double& x : p.b) x = draw();
  p.expected.assign(static_cast<size_t>(m) * n, 0.0);
  p.magnitude.assign(static_cast<size_t>(m) * n, 0.0);
  for (int i = 0; i < m; ++i)
    for (int t = 0; t < k; ++t)
      for (int j = 0; j < n; ++j) {
        const double prod = p.a[static_cast<size_t>(i) * k + t] * p.b[static_cast<size_t>(t) * n + j];
        p.expected[static_cast<size_t>(i) * n + j] += prod;
        p.magnitude[static_cast<size_t>(i) * n + j] += std::fabs(prod);
      }
  return p;
}

// One number of a reply: an integer or a finite float, the whole token and nothing else.
std::optional<double> parse_number(std::string_view token) {
  long long i = 0;
  auto [end, ec] = std::from_chars(token.data(), token.data() + token.size(), i);
  if (ec == std::errc() && end == token.data() + token.size()) return static_cast<double>(i);
  double d = 0;
  auto [fend, fec] = std::from_chars(token.data(), token.data() + token.size(), d);
  if (fec == std::errc() && fend == token.data() + token.size() && std::isfinite(d)) return d;
  return std::nullopt;
}

struct Reply {
  std::string failure;    // empty: a correct product
  int blocked = 0;        // imports the runner's guard refused so far
  double seconds = 0;     // wall clock, first byte of the request to the end of the reply
  double cpu_seconds = 0; // the process's CPU time (all threads) over the same span
};

// Checks "ok <blocked> <m*n numbers>" against the problem. Floats may differ from the
// exact product by 1e-12 * sum_t |a_it b_tj|: any summation order of k <= 64 terms stays
// within k * 2^-53 (~7e-15) of that, and a wrong element misses by far more.
Reply check_reply(std::string_view line, const Problem& p) {
  Reply reply;
  auto next_word = [&line]() -> std::string_view {
    const size_t space = line.find(' ');
    const std::string_view word = line.substr(0, space);
    line = space == std::string_view::npos ? std::string_view() : line.substr(space + 1);
    return word;
  };
  const std::string_view status = next_word();
  const std::optional<double> blocked = parse_number(next_word());
  if ((status != "ok" && status != "error") || !blocked) {
    reply.failure = fmt::format("{}: malformed reply \"{}\"", p.shape(), one_line(status, 40));
    return reply;
  }
  reply.blocked = static_cast<int>(*blocked);
  if (status == "error") {
    reply.failure = fmt::format("{}: {}", p.shape(), one_line(line));
    return reply;
  }
  const size_t count = p.expected.size();
  for (size_t e = 0; e < count; ++e) {
    const std::optional<double> got = parse_number(next_word());
    const size_t i = e / static_cast<size_t>(p.n), j = e % static_cast<size_t>(p.n);
    if (!got) {
      reply.failure = fmt::format("{}: element ({}, {}) is not a number", p.shape(), i, j);
      return reply;
    }
    const double tolerance = p.integers ? 0.0 : 1e-12 * p.magnitude[e];
    if (!(std::fabs(*got - p.expected[e]) <= tolerance)) {
      reply.failure = fmt::format("{}: wrong value at ({}, {}): {} instead of {}", p.shape(), i, j, *got,
                                  p.expected[e]);
      return reply;
    }
  }
  if (!line.empty()) reply.failure = fmt::format("{}: more than {} numbers", p.shape(), count);
  return reply;
}

std::string ended(const SandboxProcess& process) {
  std::string text = process.running() ? "no reply in time" : process.exit().describe();
  if (!process.stderr_head().empty()) text += "; stderr: " + one_line(process.stderr_head());
  return text;
}

// One runner process holding one solution.
class Solution {
 public:
  Solution(const MatmulOptions& options, const std::string& code) {
    SandboxSpec spec = python_sandbox_spec(python_runtime(options.python, options.allowed_modules),
                                           matmul_runner_script(),
                                           {allowed_csv(options), options.import_guard ? "guard" : "bare"},
                                           options.limits);
    spec.use_namespaces = options.use_namespaces;
    process_ = std::make_unique<SandboxProcess>(spec);
    load_seconds_ = options.load_seconds;
    if (!process_->send(fmt::format("{}\n", code.size()) + code, after(load_seconds_))) {
      static_line_ = "";
      return;
    }
    static_line_ = process_->read_line(after(load_seconds_)).value_or("");
  }

  // The runner's verdict on the source, written before any of it ran.
  const std::string& static_line() const { return static_line_; }

  // Runs the module; "" when matmul is defined, else why not.
  std::string load() {
    if (!process_->send("run\n", after(load_seconds_))) return "the runner stopped reading: " + ended(*process_);
    const std::optional<std::string> line = process_->read_line(after(load_seconds_));
    if (!line) return "loading: " + ended(*process_);
    std::string_view rest(*line);
    if (rest.starts_with("loaded ok ")) {
      blocked_ = parse_number(rest.substr(10)).value_or(1);
      return "";
    }
    if (rest.starts_with("loaded error ")) {
      rest.remove_prefix(13);
      const size_t space = rest.find(' ');
      blocked_ = parse_number(rest.substr(0, space)).value_or(1);
      return "loading: " + one_line(space == std::string_view::npos ? "" : rest.substr(space + 1));
    }
    return "loading: malformed reply \"" + one_line(*line, 40) + "\"";
  }

  // Sends one product and checks the reply; times are taken here, from the first byte of
  // the request to the end of the reply: wall clock, and the CPU time the kernel charged
  // to the process (which the load of other processes does not inflate).
  Reply multiply(const Problem& problem, Clock::time_point deadline) {
    const std::string request = problem.request();
    const double cpu_start = process_->cpu_seconds();
    const Clock::time_point start = Clock::now();
    Reply reply;
    if (!process_->send(request, deadline)) {
      reply.failure = problem.shape() + ": stopped reading: " + ended(*process_);
      return reply;
    }
    const std::optional<std::string> line = process_->read_line(deadline);
    const double seconds = seconds_since(start);
    const double cpu_seconds = process_->cpu_seconds() - cpu_start;
    if (!line) {
      reply.failure = problem.shape() + ": " + ended(*process_);
      return reply;
    }
    reply = check_reply(*line, problem);
    reply.seconds = seconds;
    reply.cpu_seconds = cpu_seconds;
    blocked_ = std::max(blocked_, reply.blocked);
    return reply;
  }

  int blocked() const { return blocked_; }
  SandboxProcess& process() { return *process_; }

 private:
  static std::string allowed_csv(const MatmulOptions& options) {
    std::string csv;
    for (const std::string& m : options.allowed_modules) csv += (csv.empty() ? "" : ",") + m;
    return csv;
  }

  std::unique_ptr<SandboxProcess> process_;
  std::string static_line_;
  double load_seconds_ = 0;
  int blocked_ = 0;
};

// The correctness cases: edge shapes, random ones drawn after the code loaded, and the last
// random shape again with new values (a cache keyed on the shape returns a stale product).
std::vector<Problem> correctness_cases(std::mt19937_64& rng) {
  std::vector<Problem> cases;
  for (auto [integers, m, k, n] : {std::tuple{true, 1, 1, 1}, {false, 1, 7, 1}, {true, 5, 1, 3}, {false, 2, 3, 4}})
    cases.push_back(make_problem(rng, integers, m, k, n));
  std::uniform_int_distribution<int> dim(1, 48);
  for (int c = 0; c < 4; ++c) cases.push_back(make_problem(rng, c % 2 == 0, dim(rng), dim(rng), dim(rng)));
  const Problem& last = cases.back();
  cases.push_back(make_problem(rng, last.integers, last.m, last.k, last.n));
  return cases;
}

std::mt19937_64 unpredictable_rng() {
  std::random_device device;
  std::seed_seq seed{device(), device(), device(), device()};
  return std::mt19937_64(seed);
}

}  // namespace

double matmul_total(const MatmulScore& s) {
  if (!s.format) return 0;
  if (!s.clean) return -3;
  return 0.5 * s.format + 0.5 * s.compiles + (s.correct ? 3 + s.speed : 0);
}

const std::string& matmul_prompt() {
  static const std::string prompt =
      "Write a fast matrix multiplication in pure Python.\n\n"
      "Define `matmul(A, B)`: A is an m x k matrix and B a k x n matrix, each a list of rows "
      "(lists of ints or floats). Return their product as a list of m rows of n numbers. You may "
      "import only these standard modules: math, itertools, functools, operator, array, collections, "
      "typing, copy, bisect, heapq, fractions, numbers. Your function is checked on hidden random "
      "matrices and timed against a plain triple loop. Reply with the code in one ```python block.";
  return prompt;
}

std::optional<std::string> extract_python_block(const std::string& text) {
  std::optional<std::string> last, last_defining;
  size_t at = 0;
  while ((at = text.find("```", at)) != std::string::npos) {
    const size_t tag_end = text.find('\n', at + 3);
    if (tag_end == std::string::npos) break;
    std::string tag = text.substr(at + 3, tag_end - at - 3);
    tag.erase(std::remove(tag.begin(), tag.end(), ' '), tag.end());
    const size_t close = text.find("```", tag_end + 1);
    if (close == std::string::npos) break;
    if (tag == "python" || tag == "py" || tag == "python3") {
      std::string body = text.substr(tag_end + 1, close - tag_end - 1);
      if (body.find("def matmul") != std::string::npos) last_defining = body;
      last = std::move(body);
    }
    at = close + 3;
  }
  return last_defining ? last_defining : last;
}

MatmulEnv::MatmulEnv(MatmulOptions options) : options_(std::move(options)) {
  OSSRL_CHECK(options_.timed_repetitions >= 1 && options_.bench_min >= 1 && options_.bench_min <= options_.bench_max,
              "matmul: need at least one timed repetition and 1 <= bench_min <= bench_max");
}

int MatmulEnv::workers() const {
  if (options_.workers > 0) return options_.workers;
  return std::max(1u, std::thread::hardware_concurrency());
}

MatmulScore MatmulEnv::evaluate_one(const std::string& code) const {
  MatmulScore s;
  auto finish = [&s](std::string detail) {
    s.detail = std::move(detail);
    s.total = matmul_total(s);
    return s;
  };
  Solution candidate(options_, code);

  // 1. The static verdict, from before any candidate code ran.
  std::string_view verdict(candidate.static_line());
  if (!verdict.starts_with("static ")) return finish("the runner gave no verdict: " + ended(candidate.process()));
  verdict.remove_prefix(7);
  if (verdict.starts_with("syntax ")) return finish("syntax: " + one_line(verdict.substr(7)));
  s.format = verdict.starts_with("1");
  const std::string forbidden = verdict.size() > 2 ? std::string(verdict.substr(2)) : "";
  s.clean = forbidden.empty();
  if (!s.format) return finish("no top-level def matmul");
  if (!s.clean && options_.static_check) return finish("forbidden: " + forbidden);

  // 2. Run the module in the sandbox.
  const std::string load_failure = candidate.load();
  s.clean = s.clean && candidate.blocked() == 0;
  if (!load_failure.empty()) return finish(load_failure);
  s.compiles = true;

  // 3. Correctness on inputs drawn now, after the code has loaded.
  std::mt19937_64 rng = unpredictable_rng();
  for (const Problem& problem : correctness_cases(rng)) {
    const Reply reply = candidate.multiply(problem, after(options_.case_seconds));
    s.clean = s.clean && candidate.blocked() == 0;
    if (!reply.failure.empty()) return finish(reply.failure);
  }

  // 4. Speed against the reference, fresh inputs each repetition, alternating who goes
  // first; whichever is not being timed is stopped so it cannot take the CPU.
  Solution reference(options_, kReference);
  const std::string reference_failure = reference.load();
  OSSRL_CHECK(reference_failure.empty(), "matmul: the reference solution failed to load: {}", reference_failure);
  std::uniform_int_distribution<int> dim(options_.bench_min, options_.bench_max);
  double reference_seconds = 0, candidate_seconds = 0, last_reference = 0;
  for (int rep = 0; rep < options_.timed_repetitions; ++rep) {
    const Problem problem = make_problem(rng, true, dim(rng), dim(rng), dim(rng));
    for (int turn = 0; turn < 2; ++turn) {
      const bool reference_turn = (turn == 0) == (rep % 2 == 0);
      Solution& timed = reference_turn ? reference : candidate;
      Solution& idle = reference_turn ? candidate : reference;
      // The reference gets what remains of its wall-clock limit; the candidate a multiple
      // of the reference's last time.
      const Clock::time_point deadline = reference_turn ? timed.process().wall_deadline()
                                                        : after(options_.timed_factor * last_reference + 1.0);
      idle.process().pause();
      const Reply reply = timed.multiply(problem, deadline);
      idle.process().resume();
      if (reference_turn) {
        OSSRL_CHECK(reply.failure.empty(), "matmul: the reference solution failed: {}", reply.failure);
        last_reference = reply.seconds;
        reference_seconds += reply.cpu_seconds;
      } else {
        s.clean = s.clean && candidate.blocked() == 0;
        if (!reply.failure.empty()) return finish("timed " + reply.failure);
        candidate_seconds += reply.cpu_seconds;
      }
    }
  }
  s.correct = true;
  s.speedup = reference_seconds / std::max(candidate_seconds, 1e-9);
  s.speed = std::clamp(std::log2(s.speedup), -1.0, 2.0);
  return finish(fmt::format("{:.1f} ms vs reference {:.1f} ms of CPU over {} products", 1e3 * candidate_seconds,
                            1e3 * reference_seconds, options_.timed_repetitions));
}

std::vector<MatmulScore> MatmulEnv::evaluate(const std::vector<std::string>& codes) const {
  std::vector<MatmulScore> scores(codes.size());
  // Probe once here rather than in the first worker (the probe clones; better before threads).
  sandbox_support();
  python_runtime(options_.python, options_.allowed_modules);
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (size_t i; (i = next++) < codes.size();) {
      try {
        scores[i] = evaluate_one(codes[i]);
      } catch (...) {
        const std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  const size_t threads = std::min(codes.size(), static_cast<size_t>(workers()));
  for (size_t t = 0; t < threads; ++t) pool.emplace_back(work);
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  return scores;
}

std::vector<double> MatmulEnv::score(const std::vector<RewardInput>& batch) {
  std::vector<std::string> codes;
  std::vector<size_t> has_code;
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string& text = batch[i].final_answer ? *batch[i].final_answer : batch[i].completion;
    if (std::optional<std::string> code = extract_python_block(text)) {
      codes.push_back(std::move(*code));
      has_code.push_back(i);
    }
  }
  const std::vector<MatmulScore> scores = evaluate(codes);
  std::vector<double> totals(batch.size(), 0.0);  // no code block: nothing to judge
  for (size_t c = 0; c < scores.size(); ++c) totals[has_code[c]] = scores[c].total;
  return totals;
}

}  // namespace ossrl
