// The sandbox: clone into new namespaces, build a read-only minimal root, drop ids and
// capabilities, set rlimits, install a seccomp filter, exec. See sandbox.h for the layers.
//
// The harness is multi-threaded (a worker pool), so between clone() and execve() the child
// may only make raw system calls: another thread may have held the malloc lock at the
// moment of the clone. Everything the child needs (paths, argv, the BPF program) is built
// by the parent into a ChildPlan first; the child only reads it.
#include "rewards/sandbox.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <ctime>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>

#include "core/error.h"

namespace ossrl {
namespace {

constexpr uid_t kInsideId = 1000;  // the sandbox's uid and gid inside its user namespace
constexpr uid_t kNobody = 65534;   // what they map to when the harness is root
// Without namespaces each sandbox runs as its own uid from this range (nobody's would be
// shared: one sandbox could then open /proc/<pid>/mem of another).
constexpr uid_t kLoneUidBase = 1'900'000'000;
constexpr uid_t kLoneUidCount = 1'000'000;
constexpr size_t kStderrKept = 8192;
// The minimal root is assembled on a tmpfs mounted over /tmp in the child's private mount
// namespace (so read-only paths may not lie under /tmp: they would be hidden by it).
constexpr const char* kStage = "/tmp";
constexpr const char* kDevices[] = {"/dev/null", "/dev/zero", "/dev/urandom"};

// What the child was doing when it failed; it reports {step, errno} on a CLOEXEC pipe.
enum class Step : int { sync, setsid, mount_private, mount_stage, mkdir, symlink, bind, remount,
                        mount_tmp, pivot_root, chdir, remount_root, ids, caps, fds, nice, rlimit,
                        no_new_privs, landlock, seccomp, exec };
constexpr const char* kStepNames[] = {"waiting for the id maps", "setsid", "making mounts private",
    "mounting the staging tmpfs", "mkdir", "symlink", "bind mount", "read-only remount",
    "mounting /tmp", "pivot_root", "chdir", "read-only remount of /", "dropping uid/gid",
    "dropping capabilities", "setting up stdin/stdout/stderr", "setpriority", "setrlimit",
    "PR_SET_NO_NEW_PRIVS", "Landlock", "installing the seccomp filter", "execve"};

struct ChildFailure {
  Step step;
  int error;
};

struct MountOp {
  enum Kind { dir, symlink, bind } kind;
  std::string target;  // path under kStage
  std::string source;  // host path (bind) or link text (symlink)
  unsigned long remount_flags = 0;
};

// Landlock (Linux 5.13+, no privilege needed): the file system as an allow-list of paths,
// enforced by the kernel even where mount namespaces are unavailable.
constexpr uint64_t kLandlockTruncate = 1ULL << 14;  // ABI 3
constexpr uint64_t kLandlockIoctlDev = 1ULL << 15;  // ABI 5
constexpr uint64_t kLandlockFileRights = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE |
                                         LANDLOCK_ACCESS_FS_READ_FILE | kLandlockTruncate | kLandlockIoctlDev;
constexpr uint64_t kLandlockReadRights =
    LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR;

struct LandlockRule {
  std::string path;
  uint64_t access;
};

// The rights this kernel's Landlock can enforce; 0 without Landlock.
uint64_t landlock_handled_rights() {
  static const uint64_t rights = [] {
    const long abi = syscall(SYS_landlock_create_ruleset, nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 1) return uint64_t{0};
    uint64_t r = (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1;  // ABI 1: execute .. make_sym
    if (abi >= 2) r |= LANDLOCK_ACCESS_FS_REFER;
    if (abi >= 3) r |= kLandlockTruncate;
    if (abi >= 5) r |= kLandlockIoctlDev;
    return r;
  }();
  return rights;
}

struct ChildPlan {
  bool namespaces = false;
  bool dry_run = false;            // do everything but exec (the support probe)
  bool drop_groups = false;        // setgroups(0) is allowed: the parent is root
  uid_t lone_uid = 0;              // without namespaces: the uid (and gid) to run as
  std::vector<MountOp> mounts;
  std::string tmp_options;         // tmpfs options of the private /tmp
  std::string workdir;             // without namespaces: the private directory
  std::vector<const char*> argv, envp;
  std::vector<std::pair<int, rlim_t>> rlimits;
  uint64_t landlock_handled = 0;   // 0: no Landlock
  std::vector<LandlockRule> landlock;
  int nice = 0;
  const sock_fprog* filter = nullptr;
  int stdin_fd = -1, stdout_fd = -1, stderr_fd = -1, failure_fd = -1, sync_fd = -1;
};

// ---- the child (raw system calls only) ----

[[noreturn]] void child_fail(const ChildPlan& plan, Step step) {
  const ChildFailure failure{step, errno};
  [[maybe_unused]] ssize_t n = write(plan.failure_fd, &failure, sizeof failure);
  _exit(127);
}

void child_build_root(const ChildPlan& plan) {
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) child_fail(plan, Step::mount_private);
  if (mount("tmpfs", kStage, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755") != 0)
    child_fail(plan, Step::mount_stage);
  for (const MountOp& op : plan.mounts) {
    const char* target = op.target.c_str();
    switch (op.kind) {
      case MountOp::dir:
        if (mkdir(target, 0755) != 0 && errno != EEXIST) child_fail(plan, Step::mkdir);
        break;
      case MountOp::symlink:
        if (::symlink(op.source.c_str(), target) != 0) child_fail(plan, Step::symlink);
        break;
      case MountOp::bind: {
        struct stat st;
        if (stat(op.source.c_str(), &st) != 0) child_fail(plan, Step::bind);
        if (S_ISDIR(st.st_mode)) {
          if (mkdir(target, 0755) != 0 && errno != EEXIST) child_fail(plan, Step::mkdir);
        } else {
          const int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
          if (fd < 0) child_fail(plan, Step::bind);
          close(fd);
        }
        if (mount(op.source.c_str(), target, nullptr, MS_BIND, nullptr) != 0) child_fail(plan, Step::bind);
        if (mount(nullptr, target, nullptr, MS_BIND | MS_REMOUNT | op.remount_flags, nullptr) != 0)
          child_fail(plan, Step::remount);
        break;
      }
    }
  }
  const std::string& tmp = plan.mounts.front().target;  // the first op is always <stage>/tmp
  if (mount("tmpfs", tmp.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, plan.tmp_options.c_str()) != 0)
    child_fail(plan, Step::mount_tmp);
  // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only ours.
  if (chdir(kStage) != 0) child_fail(plan, Step::chdir);
  if (syscall(SYS_pivot_root, ".", ".") != 0) child_fail(plan, Step::pivot_root);
  if (umount2(".", MNT_DETACH) != 0) child_fail(plan, Step::pivot_root);
  if (chdir("/") != 0) child_fail(plan, Step::chdir);
  if (mount(nullptr, "/", nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr) != 0)
    child_fail(plan, Step::remount_root);
  if (chdir("/tmp") != 0) child_fail(plan, Step::chdir);
}

// Raw system calls: glibc's wrappers broadcast the change to every thread of the process,
// and the child's copy of the parent's thread list names threads that do not exist in it.
void child_drop_ids(const ChildPlan& plan, uid_t id) {
  if (plan.drop_groups && syscall(SYS_setgroups, 0, nullptr) != 0) child_fail(plan, Step::ids);
  if (syscall(SYS_setresgid, id, id, id) != 0) child_fail(plan, Step::ids);
  if (syscall(SYS_setresuid, id, id, id) != 0) child_fail(plan, Step::ids);
}

void child_landlock(const ChildPlan& plan) {
  const landlock_ruleset_attr attr{plan.landlock_handled};
  const int ruleset = static_cast<int>(syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0));
  if (ruleset < 0) child_fail(plan, Step::landlock);
  for (const LandlockRule& rule : plan.landlock) {
    const int fd = open(rule.path.c_str(), O_PATH | O_CLOEXEC);
    if (fd < 0) child_fail(plan, Step::landlock);
    const landlock_path_beneath_attr beneath{rule.access, fd};
    if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &beneath, 0) != 0)
      child_fail(plan, Step::landlock);
    close(fd);
  }
  if (syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) child_fail(plan, Step::landlock);
  close(ruleset);
}

int child_main(void* arg) {
  const ChildPlan& plan = *static_cast<const ChildPlan*>(arg);
  if (plan.namespaces) {
    char go = 0;
    if (read(plan.sync_fd, &go, 1) != 1) child_fail(plan, Step::sync);  // parent wrote the id maps
  }
  // Signals: the parent may have blocked or ignored some; the candidate starts clean.
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int sig = 1; sig < NSIG; ++sig) signal(sig, SIG_DFL);
  if (setsid() < 0) child_fail(plan, Step::setsid);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (plan.namespaces) {
    // Become the mapped id first: files the set-up creates need an owner that exists in
    // the namespace. Keep the namespace's capabilities for the mounts, dropped below.
    if (prctl(PR_SET_KEEPCAPS, 1) != 0) child_fail(plan, Step::caps);
    child_drop_ids(plan, kInsideId);
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct caps[2];
    if (syscall(SYS_capget, &header, caps) != 0) child_fail(plan, Step::caps);
    for (__user_cap_data_struct& c : caps) c.effective = c.permitted;
    if (syscall(SYS_capset, &header, caps) != 0) child_fail(plan, Step::caps);
    child_build_root(plan);
  } else {
    if (chdir(plan.workdir.c_str()) != 0) child_fail(plan, Step::chdir);
    child_drop_ids(plan, plan.lone_uid);
  }
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct caps[2] = {};
  if (syscall(SYS_capset, &header, caps) != 0) child_fail(plan, Step::caps);

  // fds 0/1/2 are the pipes, 3 the failure pipe (close-on-exec); nothing else survives.
  if (dup2(plan.stdin_fd, 0) < 0 || dup2(plan.stdout_fd, 1) < 0 || dup2(plan.stderr_fd, 2) < 0 ||
      dup2(plan.failure_fd, 3) < 0 || fcntl(3, F_SETFD, FD_CLOEXEC) != 0)
    child_fail(plan, Step::fds);
  const_cast<ChildPlan&>(plan).failure_fd = 3;  // the child's private copy of the plan
  if (close_range(4, ~0U, 0) != 0) child_fail(plan, Step::fds);

  if (setpriority(PRIO_PROCESS, 0, plan.nice) != 0) child_fail(plan, Step::nice);
  for (const auto& [resource, value] : plan.rlimits) {
    // RLIMIT_CPU: soft = the limit (SIGXCPU), hard one second later (SIGKILL; pid 1 of a
    // namespace ignores SIGXCPU).
    const rlimit limit{value, resource == RLIMIT_CPU ? value + 1 : value};
    if (setrlimit(resource, &limit) != 0) child_fail(plan, Step::rlimit);
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) child_fail(plan, Step::no_new_privs);
  if (plan.landlock_handled != 0) child_landlock(plan);
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, plan.filter, 0, 0) != 0) child_fail(plan, Step::seccomp);
  if (plan.dry_run) _exit(0);
  execve(plan.argv[0], const_cast<char* const*>(plan.argv.data()), const_cast<char* const*>(plan.envp.data()));
  child_fail(plan, Step::exec);
}

// ---- the parent ----

// The seccomp program, built once: allow by default, refuse the listed calls with EPERM
// (the candidate sees a PermissionError rather than dying, so the report says what it
// tried). libseccomp adds the architecture check (other ABIs, x32 included, are killed).
const sock_fprog& seccomp_program() {
  static const std::vector<sock_filter> program = [] {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    OSSRL_CHECK(ctx != nullptr, "sandbox: seccomp_init failed");
    const uint32_t deny = SCMP_ACT_ERRNO(EPERM);
    auto rule = [&](const char* name, uint32_t action, std::vector<scmp_arg_cmp> args = {}) {
      const int nr = seccomp_syscall_resolve_name(name);
      if (nr == __NR_SCMP_ERROR) return;  // not a system call on this architecture
      const int rc = seccomp_rule_add_array(ctx, action, nr, static_cast<unsigned>(args.size()), args.data());
      OSSRL_CHECK(rc == 0, "sandbox: seccomp rule for {} failed ({})", name, strerror(-rc));
    };
    // No network: no socket of any family (unix sockets included).
    for (const char* name : {"socket", "socketpair"}) rule(name, deny);
    // No new processes: fork/vfork, and clone without CLONE_THREAD. clone3's flags live in
    // memory seccomp cannot read, so it reports ENOSYS and glibc falls back to clone.
    for (const char* name : {"fork", "vfork"}) rule(name, deny);
    rule("clone", deny, {SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0)});
    rule("clone3", SCMP_ACT_ERRNO(ENOSYS));
    // No looking at or reaching into other processes, no escaping the namespaces or root,
    // nothing that changes the machine.
    for (const char* name :
         {"ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
          "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig",
          "fspick", "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
          "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
          "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module", "kexec_load",
          "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime",
          "clock_adjtime", "adjtimex", "syslog", "quotactl", "mknod", "mknodat", "fanotify_init", "iopl",
          "ioperm", "vhangup", "sethostname", "setdomainname", "uselib", "personality", "mbind",
          "migrate_pages", "move_pages", "set_mempolicy", "lookup_dcookie"})
      rule(name, deny);
    // No signals to anyone: without a pid namespace another sandbox (the reference
    // solution being timed) would be in reach. The candidate has no use for them.
    for (const char* name : {"kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_send_signal"})
      rule(name, deny);
    // Typing into the terminal of the harness (if stdin were a terminal).
    rule("ioctl", deny, {SCMP_A1(SCMP_CMP_EQ, TIOCSTI)});

    const int fd = memfd_create("ossrl-seccomp", MFD_CLOEXEC);
    OSSRL_CHECK(fd >= 0, "sandbox: memfd_create failed ({})", strerror(errno));
    const int rc = seccomp_export_bpf(ctx, fd);
    seccomp_release(ctx);
    OSSRL_CHECK(rc == 0, "sandbox: exporting the seccomp filter failed ({})", strerror(-rc));
    const off_t size = lseek(fd, 0, SEEK_END);
    std::vector<sock_filter> code(static_cast<size_t>(size) / sizeof(sock_filter));
    const ssize_t n = pread(fd, code.data(), static_cast<size_t>(size), 0);
    close(fd);
    OSSRL_CHECK(n == size && !code.empty(), "sandbox: reading the seccomp filter back failed");
    return code;
  }();
  static const sock_fprog fprog{static_cast<unsigned short>(program.size()), const_cast<sock_filter*>(program.data())};
  return fprog;
}

// Flags a read-only bind remount must keep: in a user namespace the kernel refuses to
// clear nosuid/nodev/noexec/atime flags that the source mount has.
unsigned long locked_flags(const std::string& path) {
  struct statvfs vfs;
  if (statvfs(path.c_str(), &vfs) != 0) return 0;
  unsigned long flags = 0;
  if (vfs.f_flag & ST_NOSUID) flags |= MS_NOSUID;
  if (vfs.f_flag & ST_NODEV) flags |= MS_NODEV;
  if (vfs.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
  if (vfs.f_flag & ST_NOATIME) flags |= MS_NOATIME;
  if (vfs.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
  if (vfs.f_flag & ST_RELATIME) flags |= MS_RELATIME;
  return flags;
}

// The mount plan that makes `path` visible: directories on the way, every symlink on the
// way reproduced (so /lib64/ld-linux-x86-64.so.2 works on merged-/usr systems), then a
// read-only bind of the real file or directory.
class RootPlan {
 public:
  void add(const std::string& path, int depth = 0) {
    OSSRL_CHECK(depth < 32, "sandbox: too many symlinks resolving {}", path);
    OSSRL_CHECK(!path.empty() && path[0] == '/', "sandbox: read-only path {} is not absolute", path);
    std::vector<std::string> parts;
    for (const auto& part : std::filesystem::path(path).lexically_normal().relative_path())
      if (!part.empty()) parts.push_back(part.string());
    std::string prefix;
    for (size_t i = 0; i < parts.size(); ++i) {
      prefix += "/" + parts[i];
      if (is_bound(prefix)) return;
      struct stat st;
      OSSRL_CHECK(lstat(prefix.c_str(), &st) == 0, "sandbox: read-only path {}: {} does not exist", path, prefix);
      OSSRL_CHECK(prefix != kStage, "sandbox: read-only path {} lies under {}, which the sandbox replaces", path,
                  kStage);
      if (S_ISLNK(st.st_mode)) {
        const std::string link = std::filesystem::read_symlink(prefix).string();
        if (made_.insert(prefix).second) ops_.push_back({MountOp::symlink, kStage + prefix, link});
        std::string resolved = link.starts_with('/') ? link : prefix.substr(0, prefix.rfind('/') + 1) + link;
        for (size_t r = i + 1; r < parts.size(); ++r) resolved += "/" + parts[r];
        add(resolved, depth + 1);
        return;
      }
      if (i + 1 < parts.size()) {
        OSSRL_CHECK(S_ISDIR(st.st_mode), "sandbox: {} is not a directory", prefix);
        if (made_.insert(prefix).second) ops_.push_back({MountOp::dir, kStage + prefix, ""});
        continue;
      }
      const bool device = S_ISCHR(st.st_mode);
      OSSRL_CHECK(S_ISDIR(st.st_mode) || S_ISREG(st.st_mode) || device,
                  "sandbox: read-only path {} is not a file, directory or character device", path);
      const unsigned long flags = MS_RDONLY | MS_NOSUID | (device ? 0 : MS_NODEV) | locked_flags(prefix);
      ops_.push_back({MountOp::bind, kStage + prefix, prefix, flags});
      bound_.push_back(prefix);
      made_.insert(prefix);
    }
  }
  std::vector<MountOp> take() { return std::move(ops_); }

 private:
  bool is_bound(const std::string& p) const {
    return std::any_of(bound_.begin(), bound_.end(), [&](const std::string& b) {
      return p == b || (p.size() > b.size() && p.compare(0, b.size(), b) == 0 && p[b.size()] == '/');
    });
  }
  std::vector<MountOp> ops_;
  std::set<std::string> made_;
  std::vector<std::string> bound_;
};

struct Pipe {
  int read = -1, write = -1;
  Pipe() {
    int fds[2];
    OSSRL_CHECK(pipe2(fds, O_CLOEXEC) == 0, "sandbox: pipe2 failed ({})", strerror(errno));
    read = fds[0];
    write = fds[1];
  }
  ~Pipe() {
    close_fd(read);
    close_fd(write);
  }
  static void close_fd(int& fd) {
    if (fd >= 0) close(fd);
    fd = -1;
  }
};

void write_file(const std::string& path, const std::string& text) {
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  OSSRL_CHECK(fd >= 0, "sandbox: open {} failed ({})", path, strerror(errno));
  const ssize_t n = write(fd, text.data(), text.size());
  const int error = errno;
  close(fd);
  OSSRL_CHECK(n == static_cast<ssize_t>(text.size()), "sandbox: writing {} failed ({})", path, strerror(error));
}

// Writes the child's uid/gid maps: inside 1000 -> nobody when we are root (so nothing the
// child does is done as root), -> our own ids otherwise (all an unprivileged parent may map).
void write_id_maps(pid_t child) {
  const std::string proc = fmt::format("/proc/{}/", child);
  const bool root = geteuid() == 0;
  if (!root) write_file(proc + "setgroups", "deny");
  write_file(proc + "uid_map", fmt::format("{} {} 1\n", kInsideId, root ? kNobody : geteuid()));
  write_file(proc + "gid_map", fmt::format("{} {} 1\n", kInsideId, root ? kNobody : getegid()));
}

// Starts the child described by `plan` (its pipe fds are filled in here). Returns the pid
// and our ends of its pipes, or fails with the step the child reported.
struct Spawned {
  pid_t pid = -1;
  int stdin_fd = -1, stdout_fd = -1, stderr_fd = -1;
};

Spawned spawn(ChildPlan& plan) {
  Pipe in, out, err, failure, sync;
  plan.stdin_fd = in.read;
  plan.stdout_fd = out.write;
  plan.stderr_fd = err.write;
  plan.failure_fd = failure.write;
  plan.sync_fd = sync.read;
  plan.filter = &seccomp_program();
  int flags = SIGCHLD;
  if (plan.namespaces)
    flags |= CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS |
             CLONE_NEWCGROUP;
  // The child runs on its own stack in its own (copy-on-write) address space.
  constexpr size_t kStack = 256 * 1024;
  void* stack = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  OSSRL_CHECK(stack != MAP_FAILED, "sandbox: mmap of the child stack failed");
  const pid_t pid = clone(child_main, static_cast<char*>(stack) + kStack, flags, &plan);
  const int clone_error = errno;
  munmap(stack, kStack);
  if (pid < 0) fail("sandbox: clone failed ({})", strerror(clone_error));
  Pipe::close_fd(in.read);
  Pipe::close_fd(out.write);
  Pipe::close_fd(err.write);
  Pipe::close_fd(failure.write);
  Pipe::close_fd(sync.read);

  auto kill_and_fail = [&](const std::string& why) {
    ::kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    fail("sandbox: {}", why);
  };
  if (plan.namespaces) {
    try {
      write_id_maps(pid);
    } catch (const Error& e) {
      kill_and_fail(e.what());
    }
    const char go = 1;
    if (write(sync.write, &go, 1) != 1) kill_and_fail("the child died before its id maps were written");
  }
  ChildFailure failed;
  ssize_t n;
  do n = read(failure.read, &failed, sizeof failed); while (n < 0 && errno == EINTR);
  if (n == sizeof failed)
    kill_and_fail(fmt::format("child set-up failed at {} ({})", kStepNames[static_cast<int>(failed.step)],
                              strerror(failed.error)));
  Spawned spawned{pid, in.write, out.read, err.read};
  in.write = out.read = err.read = -1;  // now owned by the caller
  return spawned;
}

ChildPlan make_plan(const SandboxSpec& spec, bool namespaces, std::string& workdir) {
  ChildPlan plan;
  plan.namespaces = namespaces;
  if (namespaces) {
    RootPlan root;
    plan.mounts.push_back({MountOp::dir, std::string(kStage) + "/tmp", ""});  // child_build_root needs it first
    for (const char* device : kDevices) root.add(device);
    for (const std::string& path : spec.read_only) root.add(path);
    for (MountOp& op : root.take()) plan.mounts.push_back(std::move(op));
    plan.drop_groups = geteuid() == 0;
    plan.tmp_options = fmt::format("size={},nr_inodes=1024,mode=1777", std::max<size_t>(spec.limits.file_bytes, 4096));
  } else {
    // Without a user namespace only root can give the child ids of its own; as anyone else
    // it would run as the trainer's user, able to write the trainer's memory through /proc.
    OSSRL_CHECK(geteuid() == 0,
                "sandbox: user namespaces are unavailable ({}) and this is not root, so sandboxed code "
                "would run as this user; refusing. Enable unprivileged user namespaces or run as root.",
                sandbox_support().reason);
    OSSRL_CHECK(landlock_handled_rights() != 0,
                "sandbox: neither user namespaces ({}) nor Landlock are available, so sandboxed code could "
                "read every file and load every library here (BLAS through ctypes, say); refusing. Enable "
                "unprivileged user namespaces, or boot with Landlock among the LSMs (lsm=landlock,...).",
                sandbox_support().reason);
    static std::atomic<uid_t> next_uid{0};
    plan.lone_uid = kLoneUidBase + next_uid++ % kLoneUidCount;
    plan.drop_groups = true;
    char name[] = "/tmp/ossrl-sandbox-XXXXXX";
    OSSRL_CHECK(mkdtemp(name) != nullptr, "sandbox: mkdtemp failed ({})", strerror(errno));
    workdir = plan.workdir = name;
    OSSRL_CHECK(chown(name, plan.lone_uid, plan.lone_uid) == 0, "sandbox: chown of {} failed", name);
  }
  const SandboxLimits& limits = spec.limits;
  plan.rlimits = {
      {RLIMIT_CPU, static_cast<rlim_t>(std::max(1.0, std::ceil(limits.cpu_seconds)))},
      {RLIMIT_AS, limits.memory_bytes},
      {RLIMIT_NPROC, static_cast<rlim_t>(limits.processes)},
      {RLIMIT_FSIZE, limits.file_bytes},
      {RLIMIT_NOFILE, static_cast<rlim_t>(limits.open_files)},
      {RLIMIT_CORE, 0},
      {RLIMIT_MEMLOCK, 0},
      {RLIMIT_MSGQUEUE, 0},
  };
  plan.nice = limits.nice;
  // Landlock: read and execute the listed paths, write only the private directory.
  if ((plan.landlock_handled = landlock_handled_rights()) != 0) {
    auto allow = [&](const std::string& path, uint64_t access) {
      struct stat st;
      OSSRL_CHECK(stat(path.c_str(), &st) == 0, "sandbox: read-only path {} does not exist", path);
      if (!S_ISDIR(st.st_mode)) access &= kLandlockFileRights;
      plan.landlock.push_back({path, access & plan.landlock_handled});
    };
    for (const std::string& path : spec.read_only) allow(path, kLandlockReadRights);
    allow("/dev/null", LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_WRITE_FILE | kLandlockTruncate |
                           kLandlockIoctlDev);
    for (const char* device : {"/dev/zero", "/dev/urandom"}) allow(device, LANDLOCK_ACCESS_FS_READ_FILE);
    // With namespaces the rules are made after pivot_root, where the paths are the same
    // and the private /tmp is the writable one.
    plan.landlock.push_back({namespaces ? "/tmp" : workdir, plan.landlock_handled});
  }
  return plan;
}

}  // namespace

const SandboxSupport& sandbox_support() {
  static const SandboxSupport support = [] {
    SandboxSupport s;
    s.landlock = landlock_handled_rights() != 0;
    SandboxSpec spec;
    std::string workdir;
    try {
      ChildPlan plan = make_plan(spec, true, workdir);
      plan.dry_run = true;
      static const char* argv[] = {"/", nullptr};
      plan.argv.assign(argv, argv + 2);
      plan.envp = {nullptr};
      const Spawned child = spawn(plan);
      int status = 0;
      waitpid(child.pid, &status, 0);
      for (int fd : {child.stdin_fd, child.stdout_fd, child.stderr_fd}) close(fd);
      s.namespaces = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!s.namespaces) s.reason = fmt::format("the set-up probe ended with status {}", status);
    } catch (const Error& e) {
      s.reason = e.what();
    }
    if (!s.namespaces)
      fmt::print(stderr,
                 "ossrl sandbox: WARNING: no user namespaces here ({}). Sandboxed code runs with "
                 "rlimits, seccomp (no sockets, no fork, no signals), {} and {} only: no minimal "
                 "root, no private network or pid namespace.\n",
                 s.reason, landlock_handled_rights() ? "Landlock (read-only file system)" : "NO Landlock",
                 geteuid() == 0 ? "a uid of its own" : "(refused: not root)");
    return s;
  }();
  return support;
}

std::string SandboxExit::describe() const {
  switch (end) {
    case SandboxEnd::running: return "still running";
    case SandboxEnd::exited: return fmt::format("exited with status {}", status);
    case SandboxEnd::signaled: return fmt::format("killed by signal {} ({})", status, strsignal(status));
    case SandboxEnd::cpu_limit: return fmt::format("killed: CPU time limit ({:.2f} s used)", cpu_seconds);
    case SandboxEnd::wall_limit: return "killed: wall-clock limit";
    case SandboxEnd::output_limit: return "killed: output size limit";
    case SandboxEnd::killed: return "killed by the harness";
  }
  return "?";
}

SandboxProcess::SandboxProcess(const SandboxSpec& spec) : limits_(spec.limits) {
  OSSRL_CHECK(!spec.argv.empty() && spec.argv[0].starts_with('/'), "sandbox: argv[0] must be an absolute path");
  bool namespaces = spec.use_namespaces && sandbox_support().namespaces;
  if (!namespaces) {
    const std::string why = spec.use_namespaces ? sandbox_support().reason : "namespaces turned off";
    for (const char* layer : {"user_ns", "mount_ns (read-only root)", "net_ns", "pid_ns", "ipc_ns"})
      missing_.push_back(fmt::format("{}: {}", layer, why));
  }
  if (landlock_handled_rights() == 0) missing_.push_back("landlock: not supported by this kernel");
  std::string workdir;
  ChildPlan plan = make_plan(spec, namespaces, workdir);
  workdir_ = workdir;
  for (const std::string& a : spec.argv) plan.argv.push_back(a.c_str());
  plan.argv.push_back(nullptr);
  for (const std::string& e : spec.env) plan.envp.push_back(e.c_str());
  plan.envp.push_back(nullptr);
  wall_deadline_ = SandboxClock::now() + std::chrono::duration_cast<SandboxClock::duration>(
                                             std::chrono::duration<double>(limits_.wall_seconds));
  const Spawned child = spawn(plan);
  pid_ = child.pid;
  stdin_ = child.stdin_fd;
  stdout_ = child.stdout_fd;
  stderr_fd_ = child.stderr_fd;
  for (int fd : {stdin_, stdout_, stderr_fd_}) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

SandboxProcess::~SandboxProcess() {
  if (running()) kill();
  for (int* fd : {&stdin_, &stdout_, &stderr_fd_}) Pipe::close_fd(*fd);
  if (!workdir_.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(workdir_, ignored);
  }
}

namespace {
int millis_until(SandboxClock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SandboxClock::now()).count();
  return static_cast<int>(std::clamp<long long>(left + 1, 0, 1000));
}
}  // namespace

bool SandboxProcess::drain(int timeout_ms) {
  pollfd fds[2];
  int count = 0;
  for (int fd : {stdout_, stderr_fd_})
    if (fd >= 0) fds[count++] = {fd, POLLIN, 0};
  if (count == 0) return true;
  if (poll(fds, count, timeout_ms) <= 0) return true;
  char chunk[65536];
  for (int i = 0; i < count; ++i) {
    if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    const ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) {  // end of file
      Pipe::close_fd(fds[i].fd == stdout_ ? stdout_ : stderr_fd_);
      continue;
    }
    output_total_ += static_cast<size_t>(n);
    if (fds[i].fd == stdout_) {
      stdout_buffer_.append(chunk, static_cast<size_t>(n));
    } else if (stderr_.size() < kStderrKept) {
      stderr_.append(chunk, std::min(static_cast<size_t>(n), kStderrKept - stderr_.size()));
    }
  }
  return output_total_ <= limits_.output_bytes;
}

bool SandboxProcess::send(std::string_view bytes, SandboxClock::time_point deadline) {
  deadline = std::min(deadline, wall_deadline_);
  // A write to a pipe whose reader is gone raises SIGPIPE; keep it from this thread and
  // take the EPIPE instead (the mask is per thread, so the rest of the program is untouched).
  sigset_t pipe_set, old;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  bool ok = true;
  while (!bytes.empty() && ok) {
    if (stdin_ < 0 || !running()) { ok = false; break; }
    if (SandboxClock::now() >= deadline) { kill(SandboxEnd::wall_limit); ok = false; break; }
    // Keep draining its output meanwhile: a child blocked writing would never read.
    pollfd fds[3] = {{stdin_, POLLOUT, 0}, {stdout_, POLLIN, 0}, {stderr_fd_, POLLIN, 0}};
    if (poll(fds, 3, millis_until(deadline)) < 0 && errno != EINTR) { ok = false; break; }
    if ((fds[1].revents | fds[2].revents) && !drain(0)) { kill(SandboxEnd::output_limit); ok = false; break; }
    if (fds[0].revents & (POLLERR | POLLHUP)) { ok = false; break; }
    if (!(fds[0].revents & POLLOUT)) continue;
    const ssize_t n = write(stdin_, bytes.data(), bytes.size());
    if (n > 0) bytes.remove_prefix(static_cast<size_t>(n));
    else if (errno != EAGAIN && errno != EINTR) ok = false;
  }
  // Discard a SIGPIPE raised here before unblocking it.
  timespec zero{0, 0};
  while (sigtimedwait(&pipe_set, nullptr, &zero) > 0) {}
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return ok;
}

void SandboxProcess::close_stdin() { Pipe::close_fd(stdin_); }

std::optional<std::string> SandboxProcess::read_line(SandboxClock::time_point deadline) {
  deadline = std::min(deadline, wall_deadline_);
  size_t scanned = 0;
  while (true) {
    const size_t newline = stdout_buffer_.find('\n', scanned);
    if (newline != std::string::npos) {
      std::string line = stdout_buffer_.substr(0, newline);
      stdout_buffer_.erase(0, newline + 1);
      return line;
    }
    scanned = stdout_buffer_.size();
    if (stdout_ < 0) return std::nullopt;
    if (SandboxClock::now() >= deadline) {
      kill(SandboxEnd::wall_limit);
      return std::nullopt;
    }
    if (!drain(millis_until(deadline))) {
      kill(SandboxEnd::output_limit);
      return std::nullopt;
    }
  }
}

void SandboxProcess::reap(int options) {
  if (!running()) return;
  int status = 0;
  rusage usage{};
  const pid_t r = wait4(pid_, &status, options, &usage);
  if (r != pid_) return;
  exit_.cpu_seconds = static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                      1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
  if (kill_reason_ != SandboxEnd::running) {
    exit_.end = kill_reason_;
    exit_.status = SIGKILL;
  } else if (WIFEXITED(status)) {
    exit_.end = SandboxEnd::exited;
    exit_.status = WEXITSTATUS(status);
  } else {
    exit_.status = WTERMSIG(status);
    // RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one.
    const bool at_cpu_limit = exit_.cpu_seconds >= std::ceil(limits_.cpu_seconds) - 0.05;
    exit_.end = exit_.status == SIGXCPU || (exit_.status == SIGKILL && at_cpu_limit) ? SandboxEnd::cpu_limit
                                                                                      : SandboxEnd::signaled;
  }
}

const SandboxExit& SandboxProcess::wait(SandboxClock::time_point deadline) {
  close_stdin();
  deadline = std::min(deadline, wall_deadline_);
  while (running()) {
    reap(WNOHANG);
    if (!running()) break;
    if (SandboxClock::now() >= deadline) return kill(SandboxEnd::wall_limit);
    if (stdout_ < 0 && stderr_fd_ < 0) {
      usleep(1000);  // both pipes closed but not yet reaped: rare and short
    } else if (!drain(std::min(millis_until(deadline), 20))) {
      return kill(SandboxEnd::output_limit);
    }
  }
  // It can exit between two drains with its last output still in the pipes: read up to the
  // end of file. Nothing it started can hold the pipes open (no fork under seccomp, and the
  // namespace dies with its pid 1), so this ends at once; the bound is only a guard.
  const SandboxClock::time_point guard = SandboxClock::now() + std::chrono::milliseconds(200);
  while ((stdout_ >= 0 || stderr_fd_ >= 0) && SandboxClock::now() < guard) {
    if (!drain(10)) break;  // over the output limit: what was read is kept, the rest dropped
  }
  return exit_;
}

const SandboxExit& SandboxProcess::kill(SandboxEnd why) {
  if (!running()) return exit_;
  if (kill_reason_ == SandboxEnd::running) kill_reason_ = why;
  // pid 1 of its namespace: killing it kills all it started. Without namespaces, its
  // session's process group.
  ::kill(-pid_, SIGKILL);
  ::kill(pid_, SIGKILL);
  reap(0);
  return exit_;
}

double SandboxProcess::cpu_seconds() const {
  clockid_t clock;
  timespec t{};
  if (!running() || clock_getcpuclockid(pid_, &clock) != 0 || clock_gettime(clock, &t) != 0) return 0;
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

void SandboxProcess::pause() {
  if (running()) ::kill(pid_, SIGSTOP);
}

void SandboxProcess::resume() {
  if (running()) ::kill(pid_, SIGCONT);
}

SandboxRun run_sandboxed(const SandboxSpec& spec, std::string_view input) {
  SandboxProcess process(spec);
  const SandboxClock::time_point forever = SandboxClock::time_point::max();
  process.send(input, forever);
  SandboxRun run;
  run.exit = process.wait(forever);
  run.out = process.take_output();
  run.err = process.stderr_head();
  run.missing_layers = process.missing_layers();
  return run;
}

}  // namespace ossrl
