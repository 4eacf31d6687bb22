// An operating-system sandbox for model-written code: one process per evaluation that
// never shares an address space with the harness that judges it.
//
// Layers (each independent, so a hole in one is covered by the others):
//   process    a fresh process (clone), its own session; the harness only talks to it
//              through pipes and judges what comes back
//   rlimits    CPU seconds, address space, processes/threads, file size, open files, no
//              core dumps; the parent enforces wall time and output size and kills
//   seccomp    no sockets of any family, no fork/vfork (threads only), no ptrace, mount,
//              namespaces, bpf, perf, keyrings, io_uring, module or clock syscalls
//   landlock   the file system as an allow-list (Linux 5.13+, needs no privilege): read and
//              execute the listed paths, write only the private directory
//   user_ns    unprivileged ids: inside uid 1000 maps to nobody (65534) when the harness
//              is root, to the harness's own uid otherwise
//   mount_ns   a minimal root: only the listed host paths, bound read-only; a private
//              size-limited tmpfs at /tmp; /dev/{null,zero,urandom}; no /proc, no /sys
//   net_ns     no interfaces but a loopback that is down (and abstract unix sockets of
//              the harness are out of reach)
//   pid_ns     the process is pid 1 of its own namespace: it sees no other process, and
//              killing it kills everything it started
//   ipc_ns, uts_ns  no System V IPC or host name shared with the host
// process, rlimits and seccomp are always on: if seccomp cannot be installed the spawn
// fails. Namespaces need unprivileged user namespaces (absent in many containers); without
// them the sandbox runs (only if the harness is root, and only under Landlock) as a uid of
// its own in a private temporary directory, says so on stderr once, and lists what is
// missing in SandboxProcess::missing_layers(). With neither namespaces nor Landlock it
// refuses: the code could read every file and load every library of the machine.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ossrl {

using SandboxClock = std::chrono::steady_clock;

struct SandboxLimits {
  double cpu_seconds = 10;                    // RLIMIT_CPU (the kernel kills at it)
  double wall_seconds = 30;                   // from spawn; the parent kills past it
  std::size_t memory_bytes = size_t{1} << 30;  // RLIMIT_AS: address space, not resident
  int processes = 16;                          // RLIMIT_NPROC: threads count too
  std::size_t output_bytes = size_t{4} << 20;  // stdout + stderr over the whole life
  std::size_t file_bytes = size_t{16} << 20;   // RLIMIT_FSIZE and the size of /tmp
  int open_files = 64;                         // RLIMIT_NOFILE
  int nice = 10;                               // lower priority than the trainer
};

struct SandboxSpec {
  std::vector<std::string> argv;       // argv[0]: an absolute path visible inside
  std::vector<std::string> env;        // the whole environment, "KEY=value"
  std::vector<std::string> read_only;  // host files/directories visible at the same path
  SandboxLimits limits;
  bool use_namespaces = true;          // false: run as without user namespaces (tests)
};

// Whether this machine lets us create the namespaces (probed once per process by a dry
// run of the whole set-up); `reason` says why not.
struct SandboxSupport {
  bool namespaces = false;
  std::string reason;
  bool landlock = false;  // the kernel enforces Landlock file-system rules
};
const SandboxSupport& sandbox_support();

enum class SandboxEnd {
  running,       // not finished yet
  exited,        // exit status in `status`
  signaled,      // killed by signal `status` (not one of ours)
  cpu_limit,     // RLIMIT_CPU reached
  wall_limit,    // the wall-clock limit (or a caller's deadline) passed
  output_limit,  // wrote more than output_bytes
  killed,        // the caller killed it (kill())
};

struct SandboxExit {
  SandboxEnd end = SandboxEnd::running;
  int status = 0;            // exit code or signal number
  double cpu_seconds = 0;    // user + system, from wait4
  std::string describe() const;  // "exited with status 0", "killed: CPU limit (10 s)", ...
};

// One sandboxed process with pipes to its stdin, stdout and stderr. Not thread-safe; use
// one per thread. The destructor kills and reaps it.
class SandboxProcess {
 public:
  explicit SandboxProcess(const SandboxSpec& spec);
  ~SandboxProcess();
  SandboxProcess(const SandboxProcess&) = delete;
  SandboxProcess& operator=(const SandboxProcess&) = delete;

  // Writes all of `bytes` to stdin. False if the process stopped reading (closed its stdin,
  // died) or `deadline` / the wall limit passed first (then it has been killed).
  bool send(std::string_view bytes, SandboxClock::time_point deadline);
  void close_stdin();
  // Reads stdout up to a newline (returned without it). nullopt on end of file, on the
  // deadline or wall limit (killed), or when output passes output_bytes (killed).
  std::optional<std::string> read_line(SandboxClock::time_point deadline);
  // Waits for the process to end, killing it at `deadline`, and reaps it.
  const SandboxExit& wait(SandboxClock::time_point deadline);
  // SIGKILL to the whole sandbox; `why` is the end reported (killed, wall_limit, ...).
  const SandboxExit& kill(SandboxEnd why = SandboxEnd::killed);
  // Stops / resumes every thread (so it cannot take CPU from a measurement elsewhere).
  void pause();
  void resume();

  // CPU time (user + system, all threads) used so far; 0 once it has ended.
  double cpu_seconds() const;

  pid_t pid() const { return pid_; }
  const SandboxExit& exit() const { return exit_; }
  bool running() const { return exit_.end == SandboxEnd::running; }
  // The first 8 KiB of stderr (the rest is counted against output_bytes and dropped).
  const std::string& stderr_head() const { return stderr_; }
  // Layers that could not be set up on this machine, with the reason; empty when all are on.
  const std::vector<std::string>& missing_layers() const { return missing_; }
  SandboxClock::time_point wall_deadline() const { return wall_deadline_; }
  // Takes what stdout holds that read_line has not returned (a last line without newline).
  std::string take_output() { return std::exchange(stdout_buffer_, {}); }

 private:
  // Moves whatever stdout/stderr hold into the buffers; false once output is over budget.
  bool drain(int timeout_ms);
  void reap(int options);

  SandboxLimits limits_;
  pid_t pid_ = -1;
  int stdin_ = -1, stdout_ = -1, stderr_fd_ = -1;
  std::string stdout_buffer_;  // read but not yet returned by read_line
  std::string stderr_;
  std::size_t output_total_ = 0;
  SandboxClock::time_point wall_deadline_;
  SandboxEnd kill_reason_ = SandboxEnd::running;  // set when we send the SIGKILL
  SandboxExit exit_;
  std::vector<std::string> missing_;
  std::string workdir_;  // without namespaces: the private directory, removed at the end
};

// Runs to completion with `input` on stdin; stdout and stderr (up to output_bytes) returned.
struct SandboxRun {
  SandboxExit exit;
  std::string out;
  std::string err;  // first 8 KiB
  std::vector<std::string> missing_layers;
};
SandboxRun run_sandboxed(const SandboxSpec& spec, std::string_view input);

}  // namespace ossrl
