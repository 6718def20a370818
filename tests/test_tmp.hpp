// A fresh temporary directory per test, unique across concurrently running test processes
// (pid + counter + test name), under DEFT_TEST_TMP when the build defines it.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

namespace deft::testing {

inline std::filesystem::path test_tmp_root() {
#ifdef DEFT_TEST_TMP
  return std::filesystem::path(DEFT_TEST_TMP);
#else
  return std::filesystem::temp_directory_path() / "deft-tests";
#endif
}

class TempDir {
 public:
  explicit TempDir(const std::string& prefix) {
    static int counter = 0;
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = test_tmp_root() / (prefix + "-" + std::to_string(getpid()) + "-" +
                               std::to_string(counter++) + "-" + (test ? test->name() : "x"));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Sets an environment variable and restores (or unsets) it when it goes out of scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* v = std::getenv(name)) old_ = v;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace deft::testing
