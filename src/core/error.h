// The one error type of ossrl. Every failure a user can cause (a bad file, a wrong
// option, a malformed dataset line) becomes an ossrl::Error whose message says what is
// wrong and where, so the CLI can print it and exit instead of crashing.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace ossrl {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// fail("lm_head.weight missing from {}", file): formats and throws.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace ossrl

// Checks a condition at a boundary (file contents, user options); throws ossrl::Error.
#define OSSRL_CHECK(cond, ...)                 \
  do {                                         \
    if (!(cond)) ::ossrl::fail(__VA_ARGS__);   \
  } while (0)
