// A few macros instead of a test framework dependency: TEST registers a
// function, CHECK / CHECK_THROWS fail it, and test_main runs them all (or
// the ones named on the command line) with a watchdog, so a hang becomes a
// failure that names the test instead of a silent stall.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace check {

struct Failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Test {
    const char* name;
    void (*body)();
};

inline std::vector<Test>& registry() {
    static std::vector<Test> tests;
    return tests;
}

inline bool add(const char* name, void (*body)()) {
    registry().push_back({name, body});
    return true;
}

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
    throw Failure(std::string(file) + ":" + std::to_string(line) + ": " + what);
}

template <class Expected, class Body>
Expected expect_throw(Body&& body, const char* expression, const char* file, int line) {
    try {
        body();
    } catch (const Expected& e) {
        return e;
    } catch (const std::exception& e) {
        fail(file, line, std::string(expression) + " threw the wrong exception: " + e.what());
    }
    fail(file, line, std::string(expression) + " did not throw");
}

// Polls `condition` (test code only; the coordinator itself never polls).
inline bool eventually(const std::function<bool()>& condition,
                       std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    const auto give_up_at = std::chrono::steady_clock::now() + timeout;
    while (!condition()) {
        if (std::chrono::steady_clock::now() >= give_up_at) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
}

// Runs every registered test; returns the process exit status.
inline int test_main(int argc, char** argv, std::chrono::seconds per_test_limit = std::chrono::seconds(60)) {
    std::mutex mutex;
    std::condition_variable finished_cv;
    const char* running = nullptr;
    bool all_done = false;
    // Aborts the process if one test runs too long: a hung test must not
    // hang pytest, and its name is the most useful thing to print.
    std::thread watchdog([&] {
        std::unique_lock lock(mutex);
        while (!all_done) {
            const char* watched = running;
            if (!finished_cv.wait_for(lock, per_test_limit, [&] { return all_done || running != watched; }) &&
                watched != nullptr) {
                std::fprintf(stderr, "HANG %s: still running after %lld s\n", watched,
                             static_cast<long long>(per_test_limit.count()));
                std::fflush(stderr);
                std::abort();
            }
        }
    });

    int failed = 0, ran = 0;
    for (const Test& test : registry()) {
        bool selected = argc <= 1;
        for (int a = 1; a < argc; ++a) selected = selected || std::string(argv[a]) == test.name;
        if (!selected) continue;
        {
            std::lock_guard lock(mutex);
            running = test.name;
        }
        finished_cv.notify_all();
        ++ran;
        const auto start = std::chrono::steady_clock::now();
        std::string error;
        try {
            test.body();
        } catch (const std::exception& e) {
            error = e.what();
        } catch (...) {
            error = "unknown exception";
        }
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
        if (error.empty()) {
            std::printf("ok   %s (%lld ms)\n", test.name, static_cast<long long>(ms.count()));
        } else {
            ++failed;
            std::printf("FAIL %s (%lld ms)\n     %s\n", test.name, static_cast<long long>(ms.count()), error.c_str());
        }
        std::fflush(stdout);
    }
    {
        std::lock_guard lock(mutex);
        all_done = true;
    }
    finished_cv.notify_all();
    watchdog.join();
    std::printf("%d of %d tests failed\n", failed, ran);
    return failed == 0 && ran > 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace check

#define CHECK_CONCAT_(a, b) a##b
#define TEST(name)                                                        \
    static void name();                                                   \
    [[maybe_unused]] static const bool CHECK_CONCAT_(registered_, name) = \
        ::check::add(#name, name);                                        \
    static void name()

#define CHECK(condition) \
    do { \
        if (!(condition)) ::check::fail(__FILE__, __LINE__, "CHECK(" #condition ") failed"); \
    } while (0)

// Evaluates to the caught exception, so the test can inspect it.
#define CHECK_THROWS(Expected, expression) \
    ::check::expect_throw<Expected>([&] { (void)(expression); }, #expression, __FILE__, __LINE__)
