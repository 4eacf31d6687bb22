#include "rewards/sandbox_python.h"

#include <elf.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "core/error.h"

extern char** environ;

namespace ossrl {
namespace {

// Prints "stdlib PATH" for the library directories and "lib PATH" for every shared object
// mapped once `modules` (argv[1:]) are imported; a module that fails to import is skipped.
constexpr const char* kDiscoverScript = R"(
import sys, sysconfig, importlib
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
paths = sysconfig.get_paths()
for key in ("stdlib", "platstdlib"):
    print("stdlib", paths[key])
with open("/proc/self/maps") as maps:
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
            print("lib", fields[5].strip())
)";

// The ELF interpreter (PT_INTERP) of an executable: the path the kernel opens at exec.
std::string elf_interpreter(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  Elf64_Ehdr header{};
  file.read(reinterpret_cast<char*>(&header), sizeof header);
  OSSRL_CHECK(file && std::memcmp(header.e_ident, ELFMAG, SELFMAG) == 0 && header.e_ident[EI_CLASS] == ELFCLASS64,
              "sandbox: {} is not a 64-bit ELF executable", path);
  for (int i = 0; i < header.e_phnum; ++i) {
    Elf64_Phdr ph{};
    file.seekg(static_cast<std::streamoff>(header.e_phoff + static_cast<uint64_t>(i) * header.e_phentsize));
    file.read(reinterpret_cast<char*>(&ph), sizeof ph);
    OSSRL_CHECK(file.good(), "sandbox: {}: truncated program headers", path);
    if (ph.p_type != PT_INTERP) continue;
    std::string interp(ph.p_filesz, '\0');
    file.seekg(static_cast<std::streamoff>(ph.p_offset));
    file.read(interp.data(), static_cast<std::streamsize>(interp.size()));
    OSSRL_CHECK(file.good(), "sandbox: {}: truncated PT_INTERP", path);
    return interp.c_str();  // drop the terminating NUL
  }
  return "";  // statically linked
}

// Runs argv directly (no shell) and returns its stdout; fails unless it exits with 0.
std::string run_and_capture(const std::vector<std::string>& argv) {
  int fds[2];
  OSSRL_CHECK(pipe(fds) == 0, "sandbox: pipe failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    fail("sandbox: cannot run {} ({})", argv[0], strerror(rc));
  }
  std::string out;
  char chunk[4096];
  for (ssize_t n; (n = read(fds[0], chunk, sizeof chunk)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    out.append(chunk, static_cast<size_t>(n));
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  OSSRL_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "sandbox: {} failed (status {})", argv[0], status);
  return out;
}

PythonRuntime discover(const std::string& python, const std::vector<std::string>& modules) {
  std::vector<std::string> argv = {python, "-I", "-S", "-B", "-c", kDiscoverScript};
  argv.insert(argv.end(), modules.begin(), modules.end());
  std::istringstream lines(run_and_capture(argv));
  PythonRuntime runtime;
  runtime.executable = python;
  std::set<std::string> seen;
  auto add = [&](const std::string& path) {
    if (!path.empty() && seen.insert(path).second) runtime.read_only.push_back(path);
  };
  add(python);
  add(elf_interpreter(python));
  for (std::string kind, path; lines >> kind >> path;) {
    add(path);
    // The dynamic loader looks libraries up by soname (libz.so.1), a symlink beside the
    // file that is mapped (libz.so.1.2.13): bring every such link along.
    if (kind != "lib") continue;
    std::error_code error;
    const std::filesystem::path file(path);
    for (const auto& entry : std::filesystem::directory_iterator(file.parent_path(), error))
      if (entry.is_symlink(error) && std::filesystem::equivalent(entry.path(), file, error))
        add(entry.path().string());
  }
  OSSRL_CHECK(runtime.read_only.size() > 3, "sandbox: {} reported no standard library or libraries", python);
  return runtime;
}

}  // namespace

const PythonRuntime& python_runtime(const std::string& python, const std::vector<std::string>& modules) {
  static std::mutex mutex;
  static std::map<std::pair<std::string, std::vector<std::string>>, PythonRuntime> cache;
  const std::lock_guard lock(mutex);
  const auto key = std::make_pair(python, modules);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, discover(python, modules)).first;
  return it->second;
}

SandboxSpec python_sandbox_spec(const PythonRuntime& runtime, const std::string& script,
                                const std::vector<std::string>& args, const SandboxLimits& limits) {
  SandboxSpec spec;
  spec.argv = {runtime.executable, "-I", "-S", "-B", "-c", script};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  spec.env = {"PATH=/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/tmp", "TMPDIR=/tmp"};
  spec.read_only = runtime.read_only;
  spec.limits = limits;
  return spec;
}

}  // namespace ossrl
