#include "rewards/external.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <thread>

#include "core/error.h"

extern char** environ;

namespace ossrl {
namespace {

using Clock = std::chrono::steady_clock;

// After closing its stdin, how long a program may take to exit on its own before its process
// group is killed: enough to flush a cache, short enough not to stall the trainer's exit.
constexpr std::chrono::milliseconds kExitGrace{200};
// After its stdout ends, how long to wait for the exit status that explains why.
constexpr std::chrono::milliseconds kStatusWait{50};
// A stderr line longer than this is passed on in pieces.
constexpr size_t kMaxStderrLine = 16 << 10;
// When stopping, how much buffered stderr is still passed on.
constexpr size_t kMaxStderrDrain = 1 << 20;
// How much of a bad reply an error message quotes.
constexpr size_t kQuoted = 200;

std::string errno_text(int error) { return std::system_category().message(error); }

// A file descriptor, closed when it goes out of scope.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    reset(std::exchange(other.fd_, -1));
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  Fd read, write;
};

// Both ends close-on-exec, so no other child ever inherits them (posix_spawn's dup2 onto
// 0/1/2 clears the flag on the copies), and numbered 3 or above: dup2(fd, fd) would keep
// close-on-exec set if the trainer itself ran with a closed stdin.
Pipe make_pipe() {
  int fds[2];
  OSSRL_CHECK(::pipe2(fds, O_CLOEXEC) == 0, "cannot create a pipe: {}", errno_text(errno));
  Pipe pipe{Fd(fds[0]), Fd(fds[1])};
  for (Fd* end : {&pipe.read, &pipe.write}) {
    if (end->get() < 3) {
      int moved = ::fcntl(end->get(), F_DUPFD_CLOEXEC, 3);
      OSSRL_CHECK(moved >= 0, "cannot move a pipe descriptor: {}", errno_text(errno));
      end->reset(moved);
    }
  }
  return pipe;
}

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

// Writes all of `text` to a blocking fd; gives up silently on errors (a log line is not
// worth failing for).
void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    text.remove_prefix(size_t(n));
  }
}

// Blocks SIGPIPE in the calling thread while alive, so a write to a program that closed its
// stdin fails with EPIPE instead of killing the trainer. A SIGPIPE raised meanwhile is sent
// to this thread, so it is ours to consume: the destructor takes it (unless one was pending
// before) and restores the mask. No process-wide signal disposition is touched.
class SigpipeBlock {
 public:
  SigpipeBlock() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
  }
  ~SigpipeBlock() {
    if (!was_pending_) {
      timespec zero{};
      while (sigtimedwait(&pipe_, nullptr, &zero) == SIGPIPE) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t pipe_, old_;
  bool was_pending_ = false;
};

// Copies a program's stderr to `sink` line by line with `prefix`, until the pipe ends or
// `stop` becomes readable (its write end closed), then passes on what is still buffered.
// Runs on its own thread, so a chatty program never blocks on a full stderr pipe between
// batches.
void pump_stderr(int from, int stop, std::string prefix, int sink) {
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);  // a closed stderr of ours is no reason to die

  std::string line;
  auto emit = [&](std::string_view text) {
    write_all(sink, prefix + std::string(text) + "\n");
  };
  auto take = [&](const char* data, size_t n) {
    line.append(data, n);
    size_t start = 0;
    for (size_t end; (end = line.find('\n', start)) != std::string::npos; start = end + 1) {
      emit(std::string_view(line).substr(start, end - start));
    }
    line.erase(0, start);
    while (line.size() >= kMaxStderrLine) {
      emit(std::string_view(line).substr(0, kMaxStderrLine));
      line.erase(0, kMaxStderrLine);
    }
  };

  char buffer[4096];
  bool stopping = false;
  while (!stopping) {
    pollfd fds[2] = {{from, POLLIN, 0}, {stop, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents != 0) {
      stopping = true;
      set_nonblocking(from);  // drain what is there, wait for nothing more
    }
    if (fds[0].revents != 0 || stopping) {
      ssize_t n;
      size_t drained = 0;
      while ((n = ::read(from, buffer, sizeof buffer)) > 0) {
        take(buffer, size_t(n));
        drained += size_t(n);
        // Back to poll, so a stop is noticed between chunks; when stopping, a bounded drain,
        // as a process that escaped the group could keep writing.
        if (!stopping || drained >= kMaxStderrDrain) break;
      }
      if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) break;  // the pipe ended
    }
  }
  if (!line.empty()) emit(line);
}

// The start of a reply for an error message, control and non-ASCII bytes escaped.
std::string quote(std::string_view text) {
  std::string out = "'";
  for (unsigned char c : text.substr(0, kQuoted)) {
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += char(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  out += text.size() > kQuoted ? "'..." : "'";
  return out;
}

// "exited with status 3", "was killed by signal 11 (SEGV)", or "is still running", waiting
// up to `wait` for the program to finish exiting. Does not reap it (WNOWAIT): the pid, and
// with it the process group id, stays reserved until the group has been killed.
std::string exit_status(pid_t pid, std::chrono::milliseconds wait) {
  const auto deadline = Clock::now() + wait;
  for (;;) {
    siginfo_t info{};
    if (::waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid) {
      if (info.si_code == CLD_EXITED) return fmt::format("exited with status {}", info.si_status);
      const char* abbrev = sigabbrev_np(info.si_status);
      return fmt::format("was killed by signal {} (SIG{})", info.si_status, abbrev ? abbrev : "?");
    }
    if (Clock::now() >= deadline) return "is still running";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// A batch that went wrong in a way a restart may cure; score() retries it once.
struct ExchangeFailure {
  std::string what;
};

std::string encode_request(const std::vector<RewardInput>& batch) {
  nlohmann::json items = nlohmann::json::array();
  for (const RewardInput& input : batch) {
    items.push_back({
        {"prompt", input.prompt},
        {"completion", input.completion},
        {"final_answer", input.final_answer ? nlohmann::json(*input.final_answer) : nlohmann::json()},
        {"fields", input.fields.is_null() ? nlohmann::json::object() : input.fields},
        {"well_formed", input.well_formed},
        {"truncated", input.truncated},
        {"completion_tokens", input.completion_tokens},
    });
  }
  // Sampled text may end inside a UTF-8 sequence: send U+FFFD rather than fail the batch.
  return nlohmann::json{{"batch", std::move(items)}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
         "\n";
}

std::vector<double> decode_reply(std::string_view line, size_t count) {
  nlohmann::json reply = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (reply.is_discarded()) throw ExchangeFailure{"replied with a line that is not JSON: " + quote(line)};
  auto rewards = reply.is_object() ? reply.find("rewards") : reply.end();
  if (!reply.is_object() || rewards == reply.end() || !rewards->is_array()) {
    throw ExchangeFailure{"replied without a \"rewards\" array: " + quote(line)};
  }
  if (rewards->size() != count) {
    throw ExchangeFailure{fmt::format("replied with {} rewards for a batch of {}: {}", rewards->size(), count, quote(line))};
  }
  std::vector<double> out;
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const nlohmann::json& r = (*rewards)[i];
    if (r.is_null()) {
      out.push_back(std::numeric_limits<double>::quiet_NaN());
    } else if (r.is_number()) {
      out.push_back(r.get<double>());
    } else {
      throw ExchangeFailure{fmt::format("replied with reward {} = {}, not a number or null: {}", i,
                                        r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).substr(0, 40),
                                        quote(line))};
    }
  }
  return out;
}

}  // namespace

struct ExternalReward::Process {
  pid_t pid = -1;  // also its process group id
  Fd to_child;     // its stdin
  Fd from_child;   // its stdout
  Fd stop_pump;    // closing it tells the stderr pump to finish
  std::thread stderr_pump;

  ~Process() { stop(std::chrono::milliseconds(0)); }

  // Closes its stdin, optionally waits `grace` for it to exit, kills its process group (its
  // own children too) and reaps it. The leader is reaped last, so its pid, which names the
  // group, cannot be reused by an unrelated process before the kill. Idempotent.
  void stop(std::chrono::milliseconds grace) {
    if (pid < 0) return;
    to_child.reset();
    if (grace.count() > 0) exit_status(pid, grace);
    ::kill(-pid, SIGKILL);
    ::kill(pid, SIGKILL);  // in case it left its group
    while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    pid = -1;
    from_child.reset();
    stop_pump.reset();
    if (stderr_pump.joinable()) stderr_pump.join();
  }
};

ExternalReward::ExternalReward(Options options) : options_(std::move(options)) {
  OSSRL_CHECK(!options_.command.empty() && !options_.command[0].empty(), "external reward: empty command");
  OSSRL_CHECK(options_.timeout.count() > 0, "external reward '{}': the timeout must be positive", options_.command[0]);
  if (options_.name.empty()) options_.name = std::filesystem::path(options_.command[0]).filename().string();
  if (!options_.stderr_log.empty()) {
    log_fd_ = ::open(options_.stderr_log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    OSSRL_CHECK(log_fd_ >= 0, "external reward '{}': cannot open stderr_log {}: {}", options_.name,
                options_.stderr_log, errno_text(errno));
  }
  try {
    start();
  } catch (...) {
    if (log_fd_ >= 0) ::close(log_fd_);
    throw;
  }
}

ExternalReward::~ExternalReward() {
  if (process_) process_->stop(kExitGrace);
  if (log_fd_ >= 0) ::close(log_fd_);
}

pid_t ExternalReward::pid() const { return process_ ? process_->pid : -1; }

void ExternalReward::start() {
  Pipe in = make_pipe(), out = make_pipe(), err = make_pipe(), stop = make_pipe();

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in.read.get(), STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out.write.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err.write.get(), STDERR_FILENO);
  // Its own process group, so a timeout kills whatever it started too; and the default
  // signal set-up whatever the trainer's (SIG_IGN would be inherited through exec).
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);

  std::vector<char*> argv;
  for (std::string& arg : options_.command) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  int error = ::posix_spawnp(&pid, argv[0], &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  OSSRL_CHECK(error == 0, "external reward '{}': cannot run {}: {}", options_.name, options_.command[0],
              errno_text(error));

  process_ = std::make_unique<Process>();
  process_->pid = pid;
  process_->to_child = std::move(in.write);
  process_->from_child = std::move(out.read);
  process_->stop_pump = std::move(stop.write);
  set_nonblocking(process_->to_child.get());
  set_nonblocking(process_->from_child.get());
  // The pump owns the read ends of stderr and of the stop pipe; they close when it returns.
  process_->stderr_pump = std::thread([from = std::move(err.read), stop_read = std::move(stop.read),
                                       prefix = "[" + options_.name + "] ", sink = log_fd_ >= 0 ? log_fd_ : STDERR_FILENO] {
    pump_stderr(from.get(), stop_read.get(), prefix, sink);
  });
  ++starts_;
}

std::vector<double> ExternalReward::score(const std::vector<RewardInput>& batch) {
  if (batch.empty()) return {};
  const std::string request = encode_request(batch);
  std::string failures;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (!process_) start();
    try {
      return exchange(request, batch.size());
    } catch (const ExchangeFailure& failure) {
      failures += (attempt == 0 ? "" : "; after a restart it ") + failure.what;
      process_.reset();  // kills and reaps it
    }
  }
  std::string message = fmt::format("external reward '{}' ({}) {}", options_.name, fmt::join(options_.command, " "),
                                    failures);
  if (options_.on_failure == OnFailure::Error) throw Error(message);
  write_all(STDERR_FILENO, fmt::format("ossrl: {}; its {} rewards are NaN\n", message, batch.size()));
  return std::vector<double>(batch.size(), std::numeric_limits<double>::quiet_NaN());
}

// Writes one request and reads one reply line, both under one deadline, polling the two
// pipes together: a program may start answering before it has read the whole batch, and
// neither side may block the other on a full pipe.
std::vector<double> ExternalReward::exchange(const std::string& request, size_t count) {
  Process& process = *process_;
  const auto deadline = Clock::now() + options_.timeout;
  SigpipeBlock sigpipe_block;
  auto gone = [&](const char* what) {
    return ExchangeFailure{fmt::format("{} ({})", what, exit_status(process.pid, kStatusWait))};
  };

  char buffer[1 << 16];
  std::string reply;
  // Output from before this batch is no reply to it; reading it as one would shift every later
  // batch's rewards by one.
  if (ssize_t n = ::read(process.from_child.get(), buffer, sizeof buffer); n > 0) {
    throw ExchangeFailure{"wrote to stdout when no batch was pending (only reply lines may go there; log to "
                          "stderr): " + quote(std::string_view(buffer, size_t(n)))};
  } else if (n == 0) {
    throw gone("closed its stdout");
  }

  size_t written = 0;
  size_t newline = std::string::npos;
  while (written < request.size() || newline == std::string::npos) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      throw ExchangeFailure{fmt::format("did not reply within {} ms", options_.timeout.count())};
    }
    pollfd fds[2] = {{process.from_child.get(), POLLIN, 0}, {process.to_child.get(), POLLOUT, 0}};
    int polled = ::poll(fds, written < request.size() ? 2 : 1,
                        int(std::min<int64_t>(left.count(), std::numeric_limits<int>::max())));
    if (polled < 0 && errno != EINTR) throw ExchangeFailure{"poll failed: " + errno_text(errno)};
    if (polled <= 0) continue;

    if (written < request.size() && fds[1].revents != 0) {
      ssize_t n = ::write(process.to_child.get(), request.data() + written, request.size() - written);
      if (n > 0) {
        written += size_t(n);
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        throw gone(errno == EPIPE ? "stopped reading its stdin" : "could not be written to");
      }
    }
    if (fds[0].revents != 0) {
      ssize_t n = ::read(process.from_child.get(), buffer, sizeof buffer);
      if (n == 0) throw gone(reply.empty() ? "closed its stdout before replying" : "closed its stdout mid-reply");
      if (n < 0 && errno != EAGAIN && errno != EINTR) throw ExchangeFailure{"read failed: " + errno_text(errno)};
      if (n > 0) {
        size_t old_size = reply.size();
        reply.append(buffer, size_t(n));
        if (newline == std::string::npos) {
          size_t found = reply.find('\n', old_size);
          if (found != std::string::npos) newline = found;
        }
        if (std::min(newline, reply.size()) > options_.max_reply_bytes) {
          throw ExchangeFailure{fmt::format("replied with more than {} bytes in one line: {}", options_.max_reply_bytes,
                                            quote(reply))};
        }
      }
    }
  }
  if (reply.size() > newline + 1) throw ExchangeFailure{"replied with more than one line: " + quote(reply)};
  std::string_view line = std::string_view(reply).substr(0, newline);
  if (line.ends_with('\r')) line.remove_suffix(1);
  return decode_reply(line, count);
}

}  // namespace ossrl
