// Fake vCPUs for the coordinator tests: a thread per vCPU running the same
// loop a real vCPU thread runs (has_request -> safe_point -> "KVM_RUN"),
// where KVM_RUN is a wait that a kick ends early, like immediate_exit plus
// a signal. Knobs make one vCPU stall, drop kicks or throw; observations are
// atomics or mutex-guarded so the test thread can read them at any time.
#pragma once

#include "vm/coordinator.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fake {

using Clock = std::chrono::steady_clock;

struct State {
    std::size_t vcpu = 0;             // whose state this is
    std::uint64_t work = 0;           // guest progress (slices run) at capture time
    std::uint64_t capture_number = 0; // 1 for this vCPU's first capture, 2 for its second...
    std::thread::id thread;           // the thread that captured it
};

using Coordinator = cellvm::Coordinator<State>;

class Vcpu {
public:
    Vcpu(Coordinator& coordinator, std::size_t index) : coordinator_(coordinator), index_(index) {}
    Vcpu(const Vcpu&) = delete;
    Vcpu& operator=(const Vcpu&) = delete;
    ~Vcpu() { finish(); }

    // Starts the thread; it attaches and runs until Stop or stop_guest().
    void start() { thread_ = std::thread([this] { loop(); }); }

    // Ends any stall and joins. The coordinator must be shut down first (or
    // stop_guest() called), otherwise the thread never leaves its loop.
    void finish() {
        {
            std::lock_guard lock(mutex_);
            finishing_ = true;
        }
        wake_.notify_all();
        if (thread_.joinable()) thread_.join();
    }

    // The next guest slice ignores kicks for `duration` (a vCPU stuck in the guest).
    void stall_for(std::chrono::milliseconds duration) {
        std::lock_guard lock(mutex_);
        stall_ = duration;
    }
    void end_stall() {
        {
            std::lock_guard lock(mutex_);
            stall_ = {};
            stall_ended_ = true;
        }
        wake_.notify_all();
    }
    void drop_kicks(int count) {
        std::lock_guard lock(mutex_);
        kicks_to_drop_ = count;
    }
    // How long one guest slice lasts when no kick ends it.
    void slice_lasts(std::chrono::milliseconds duration) { slice_ = duration; }
    void fail_next_capture() { fail_capture_ = true; }
    void fail_next_apply() { fail_apply_ = true; }
    void apply_takes(std::chrono::milliseconds duration) { apply_duration_ = duration; }
    // The guest stops this vCPU: its thread detaches and ends.
    void stop_guest() {
        guest_stopped_ = true;
        kick();
    }

    std::uint64_t work() const { return work_.load(); }
    std::uint64_t captures() const { return captures_.load(); }
    std::uint64_t runs() const { return runs_.load(); }  // safe_point returned Run
    std::uint64_t kicks() const { return kicks_.load(); }
    bool stalling() const { return stalling_.load(); }
    bool stopped() const { return stopped_.load(); }     // safe_point returned Stop
    bool in_guest() const { return in_guest_.load(); }
    std::chrono::milliseconds current_slice() const { return current_slice_.load(); }

    struct ApplyRecord {
        std::thread::id thread;
        Clock::time_point finished;
        std::uint64_t applied_work;
    };
    std::vector<ApplyRecord> applies() const {
        std::lock_guard lock(mutex_);
        return applies_;
    }
    std::vector<Clock::time_point> reentries() const {  // when safe_point returned Run
        std::lock_guard lock(mutex_);
        return reentries_;
    }
    std::thread::id thread_id() const { return thread_id_.load(); }

private:
    void loop() {
        thread_id_ = std::this_thread::get_id();
        coordinator_.set_kick(index_, [this] { kick(); });
        coordinator_.attach(index_);
        in_guest_ = true;
        while (!guest_stopped_) {
            if (coordinator_.has_request()) {
                in_guest_ = false;
                const auto next = coordinator_.safe_point(
                    index_, [this] { return capture(); }, [this](const State& s) { apply(s); });
                if (next == Coordinator::Next::Stop) {
                    stopped_ = true;
                    break;
                }
                {
                    std::lock_guard lock(mutex_);
                    reentries_.push_back(Clock::now());
                }
                ++runs_;
                in_guest_ = true;
            }
            run_slice();
        }
        in_guest_ = false;
        coordinator_.detach(index_);
    }

    // The fake KVM_RUN: a short stretch of "guest time" that a kick ends
    // early. A kick that arrived before entering returns at once, like
    // immediate_exit. A stall ignores kicks.
    void run_slice() {
        std::unique_lock lock(mutex_);
        if (stall_.count() > 0) {
            const auto until = Clock::now() + stall_;
            stall_ = {};
            stalling_ = true;
            wake_.wait_until(lock, until, [this] { return finishing_ || stall_ended_; });
            stalling_ = false;
            stall_ended_ = false;
        } else {
            current_slice_ = slice_.load();
            wake_.wait_for(lock, current_slice_.load(), [this] { return kicked_ || finishing_; });
            current_slice_ = std::chrono::milliseconds(0);
        }
        kicked_ = false;  // like clearing immediate_exit after KVM_RUN returns
        ++work_;
    }

    void kick() {
        ++kicks_;
        {
            std::lock_guard lock(mutex_);
            if (kicks_to_drop_ > 0) {  // lost, like a signal that raced with entering KVM_RUN
                --kicks_to_drop_;
                return;
            }
            kicked_ = true;
        }
        wake_.notify_all();
    }

    State capture() {
        if (fail_capture_.exchange(false)) throw std::runtime_error("fake capture failed");
        return State{index_, work_.load(), ++captures_, std::this_thread::get_id()};
    }

    void apply(const State& target) {
        if (fail_apply_.exchange(false)) throw std::runtime_error("fake apply failed");
        std::this_thread::sleep_for(apply_duration_.load());
        work_ = target.work;
        std::lock_guard lock(mutex_);
        applies_.push_back({std::this_thread::get_id(), Clock::now(), target.work});
    }

    Coordinator& coordinator_;
    const std::size_t index_;
    std::thread thread_;
    std::atomic<std::thread::id> thread_id_{};

    mutable std::mutex mutex_;  // guards the plain fields below
    std::condition_variable wake_;
    bool kicked_ = false;
    bool finishing_ = false;
    bool stall_ended_ = false;
    int kicks_to_drop_ = 0;
    std::chrono::milliseconds stall_{};
    std::vector<ApplyRecord> applies_;
    std::vector<Clock::time_point> reentries_;

    std::atomic<bool> fail_capture_{false}, fail_apply_{false}, guest_stopped_{false};
    std::atomic<std::chrono::milliseconds> apply_duration_{std::chrono::milliseconds(0)};
    std::atomic<std::chrono::milliseconds> slice_{std::chrono::milliseconds(20)};
    std::atomic<std::chrono::milliseconds> current_slice_{};  // zero when not in a kickable slice
    std::atomic<bool> stalling_{false}, stopped_{false}, in_guest_{false};
    std::atomic<std::uint64_t> work_{0}, captures_{0}, runs_{0}, kicks_{0};
};

// A coordinator with n fake vCPUs, the first `running` of them started.
// Destruction shuts the coordinator down and joins every thread.
struct Fleet {
    explicit Fleet(std::size_t n, std::size_t running) : coordinator(n) {
        for (std::size_t i = 0; i < n; ++i) vcpus.push_back(std::make_unique<Vcpu>(coordinator, i));
        for (std::size_t i = 0; i < running; ++i) vcpus[i]->start();
    }
    explicit Fleet(std::size_t n) : Fleet(n, n) {}
    ~Fleet() {
        coordinator.shutdown();
        for (auto& v : vcpus) v->finish();
    }
    Vcpu& operator[](std::size_t i) { return *vcpus[i]; }
    std::size_t size() const { return vcpus.size(); }

    Coordinator coordinator;
    std::vector<std::unique_ptr<Vcpu>> vcpus;
};

}  // namespace fake
