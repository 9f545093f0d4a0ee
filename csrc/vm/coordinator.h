// The multi-vCPU coordinator: pause every vCPU at once, hand back each one's
// state, resume them together, and restore a whole-VM state in two phases.
// It knows nothing of KVM (State, capture, apply and kick come from the
// caller), so tests/cpp drives it with fake vCPUs and another hypervisor
// backend reuses it unchanged.
//
// Usage on vCPU thread i (csrc/vm/vcpu*.cpp):
//
//   coordinator.set_kick(i, [run, tid] {
//       atomic_ref(run->immediate_exit).store(1);  // a KVM_RUN not yet entered returns at once
//       pthread_kill(tid, kick_signal);              // one already entered returns EINTR
//   });
//   coordinator.attach(i);
//   for (;;) {
//       // checked before *every* KVM_RUN, the first one too: a thread that
//       // attaches during a pause or restore must not run the guest first
//       if (coordinator.has_request() &&
//           coordinator.safe_point(i, capture_regs, apply_regs) == Next::Stop)
//           break;
//       ioctl(vcpu_fd, KVM_RUN, 0);
//       atomic_ref(run->immediate_exit).store(0);  // seq_cst, so it cannot pass the next has_request()
//       ...handle the exit; guest stopped this vCPU or a fatal error: break
//   }
//   coordinator.detach(i);
//
// Requester (the Python-facing machine object, GIL released): pause(),
// resume(), restore(), and shutdown() before joining the vCPU threads; the
// coordinator must outlive them. Never call pause/resume/restore from a vCPU
// thread: it would wait for itself until the deadline.
//
// Semantics chosen where the design left room:
// - A vCPU is "attached" while its thread may run the guest. pause() waits
//   only for attached vCPUs, and re-evaluates that set while it waits: a
//   thread that attaches mid-pause is captured too, one that detaches is no
//   longer waited for. Its state is nullopt ("not started").
// - restore() also waits for a *detached* vCPU that it gives a state to: the
//   VMM starts that vCPU's thread, which attaches and reaches safe_point()
//   before its first KVM_RUN. A nullopt target makes the vCPU "not started":
//   its thread stays parked in safe_point() (nullopt in later pauses, never
//   re-enters the guest) until a later restore gives it a state.
// - A failed pause (deadline, capture threw) is a no-op: every vCPU returns
//   to what it did before the call (running, or parked if it was paused).
// - A failed restore (deadline, apply threw) leaves the VM paused: every
//   vCPU that reaches its safe point stays parked there, including one that
//   arrives after the deadline, so no half-restored VM ever runs. From there
//   restore() again (the normal recovery), pause() (returns the states as
//   they are now), resume() (runs them as they are: the caller's decision) or
//   shutdown() all work.
// - Capture and apply run without the lock held. A result that arrives for
//   an operation that has already ended is dropped: a stale state is never
//   returned.
// - Kicks are called with the lock held, so the thread a kick signals cannot
//   detach (and exit) while it is being signalled. A kick must therefore be
//   quick and must not call into the coordinator. Kicks repeat every
//   kick_interval until the vCPU arrives, because a signal can race with
//   entering KVM_RUN.
// - Every requester call after shutdown() throws CoordinatorShutDown.
// - Requests are serialized; a second requester waits for the first, whose
//   own wait is bounded by its deadline (or cut short by shutdown()).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cellvm {

// A vCPU did not reach its safe point (or finish its part) before the deadline.
struct DeadlineExceeded : std::runtime_error {
    DeadlineExceeded(std::size_t vcpu, const std::string& what) : std::runtime_error(what), vcpu(vcpu) {}
    std::size_t vcpu;
};

// A vCPU's capture or apply threw; what() carries that exception's message.
struct VcpuFailed : std::runtime_error {
    VcpuFailed(std::size_t vcpu, const std::string& what) : std::runtime_error(what), vcpu(vcpu) {}
    std::size_t vcpu;
};

struct CoordinatorShutDown : std::runtime_error {
    explicit CoordinatorShutDown(const std::string& operation)
        : std::runtime_error(operation + ": the coordinator was shut down") {}
};

template <class State>
class Coordinator {
public:
    enum class Next { Run, Stop };
    using Clock = std::chrono::steady_clock;
    static constexpr std::chrono::milliseconds kick_interval{1};

    explicit Coordinator(std::size_t vcpus) : vcpus_(checked_count(vcpus)) {}
    Coordinator(const Coordinator&) = delete;
    Coordinator& operator=(const Coordinator&) = delete;

    std::size_t size() const noexcept { return vcpus_.size(); }

    // ---- called by vCPU thread i ----

    void set_kick(std::size_t i, std::function<void()> kick) {
        check_index(i);
        std::lock_guard lock(mutex_);
        vcpus_[i].kick = std::move(kick);
    }

    void attach(std::size_t i) {
        check_index(i);
        std::lock_guard lock(mutex_);
        Vcpu& v = vcpus_[i];
        v.attached = true;
        v.at_safe_point = false;
        v.started = true;
        v.done_epoch = 0;  // a fresh thread has done nothing for the current request yet
        v.captured.reset();
        v.failure.reset();
    }

    void detach(std::size_t i) {
        check_index(i);
        std::lock_guard lock(mutex_);
        vcpus_[i].attached = false;
        vcpus_[i].at_safe_point = false;
        requester_cv_.notify_all();  // the operation may be complete without this vCPU
    }

    bool has_request() const noexcept { return request_.load(); }

    Next safe_point(std::size_t i, const std::function<State()>& capture,
                    const std::function<void(const State&)>& apply) {
        check_index(i);
        std::unique_lock lock(mutex_);
        Vcpu& self = vcpus_[i];
        if (!self.attached) throw std::logic_error("safe_point: vCPU " + std::to_string(i) + " is not attached");
        self.at_safe_point = true;
        for (;;) {
            if (shutdown_) {
                self.at_safe_point = false;
                return Next::Stop;
            }
            if (command_ == Command::Run && self.started) {
                self.at_safe_point = false;
                return Next::Run;
            }
            if (self.done_epoch != epoch_ && command_ == Command::Capture) {
                capture_for(self, lock, capture);
                continue;  // the command may have changed while we captured
            }
            if (self.done_epoch != epoch_ && command_ == Command::Apply) {
                apply_for(self, i, lock, apply);
                continue;
            }
            vcpu_cv_.wait(lock);
        }
    }

    // ---- called by the requester ----

    std::vector<std::optional<State>> pause(std::chrono::nanoseconds deadline) {
        std::lock_guard serialized(request_mutex_);
        std::unique_lock lock(mutex_);
        if (shutdown_) throw CoordinatorShutDown("pause");
        const Command before = command_;  // Run, or Hold if already paused
        const auto epoch = publish(Command::Capture);
        await(lock, "pause", epoch, deadline, before, [](std::size_t, const Vcpu& v) { return v.attached; });
        std::vector<std::optional<State>> states(vcpus_.size());
        for (std::size_t i = 0; i < vcpus_.size(); ++i)
            if (vcpus_[i].done_epoch == epoch) states[i] = std::exchange(vcpus_[i].captured, std::nullopt);
        publish(Command::Hold);
        return states;
    }

    void resume() {
        std::lock_guard serialized(request_mutex_);
        std::lock_guard lock(mutex_);
        if (shutdown_) throw CoordinatorShutDown("resume");
        if (command_ != Command::Run) publish(Command::Run);
    }

    void restore(std::vector<std::optional<State>> targets, std::chrono::nanoseconds deadline) {
        if (targets.size() != vcpus_.size())
            throw std::invalid_argument("restore: " + std::to_string(targets.size()) + " targets for " +
                                        std::to_string(vcpus_.size()) + " vCPUs");
        std::lock_guard serialized(request_mutex_);
        std::unique_lock lock(mutex_);
        if (shutdown_) throw CoordinatorShutDown("restore");
        // Shared, not borrowed: a vCPU still applying after this call failed
        // must not read targets that a later restore has replaced.
        targets_ = std::make_shared<const Targets>(std::move(targets));
        const auto epoch = publish(Command::Apply);  // phase 1: each applies its own target
        await(lock, "restore", epoch, deadline, Command::Hold,
              [&](std::size_t i, const Vcpu& v) { return v.attached || (*targets_)[i].has_value(); });
        // Phase 2: all met, all re-enter together. Usually the last vCPU to
        // apply has released them already (apply_for).
        if (command_ != Command::Run) publish(Command::Run);
    }

    void shutdown() {
        std::lock_guard lock(mutex_);
        if (shutdown_) return;
        shutdown_ = true;
        request_.store(true);
        kick_unarrived();
        vcpu_cv_.notify_all();
        requester_cv_.notify_all();
    }

private:
    // What a vCPU at its safe point is asked to do. Hold parks it: the VM is
    // paused, or a restore failed.
    enum class Command { Run, Capture, Apply, Hold };
    using Targets = std::vector<std::optional<State>>;

    struct Vcpu {
        std::function<void()> kick;
        bool attached = false;       // its thread may run the guest: requests wait for it
        bool at_safe_point = false;  // inside safe_point(), so kicking it is pointless
        bool started = true;         // false after a restore into "not started"
        std::uint64_t done_epoch = 0;         // last epoch whose capture/apply it finished
        std::optional<State> captured;        // valid when done_epoch is the pause's epoch
        std::optional<std::string> failure;   // why capture/apply threw in done_epoch
    };

    static std::size_t checked_count(std::size_t vcpus) {
        if (vcpus == 0) throw std::invalid_argument("Coordinator: needs at least one vCPU");
        return vcpus;
    }

    void check_index(std::size_t i) const {
        if (i >= vcpus_.size())
            throw std::out_of_range("vCPU index " + std::to_string(i) + " out of range (" +
                                    std::to_string(vcpus_.size()) + " vCPUs)");
    }

    static std::string describe_current_exception() {
        try {
            throw;
        } catch (const std::exception& e) {
            return e.what();
        } catch (...) {
            return "unknown exception";
        }
    }

    // A new epoch tells every parked vCPU "look again": each acts on it once.
    std::uint64_t publish(Command command) {
        command_ = command;
        ++epoch_;
        request_.store(command != Command::Run || shutdown_);
        vcpu_cv_.notify_all();
        return epoch_;
    }

    void capture_for(Vcpu& self, std::unique_lock<std::mutex>& lock, const std::function<State()>& capture) {
        const auto epoch = epoch_;
        std::optional<State> state;
        std::optional<std::string> failure;
        if (self.started) {  // a not-started vCPU has no state: nullopt
            lock.unlock();
            try {
                state = capture();
            } catch (...) {
                failure = describe_current_exception();
            }
            lock.lock();
        }
        if (epoch != epoch_) return;  // the pause ended meanwhile: drop the stale state
        self.captured = std::move(state);
        self.failure = std::move(failure);
        self.done_epoch = epoch;
        requester_cv_.notify_all();
    }

    void apply_for(Vcpu& self, std::size_t i, std::unique_lock<std::mutex>& lock,
                   const std::function<void(const State&)>& apply) {
        const auto epoch = epoch_;
        const std::shared_ptr<const Targets> targets = targets_;
        const std::optional<State>& target = (*targets)[i];
        std::optional<std::string> failure;
        if (target) {
            lock.unlock();
            try {
                apply(*target);
            } catch (...) {
                failure = describe_current_exception();
            }
            lock.lock();
        }
        // Even if the restore already failed, this vCPU now holds its target;
        // after a throwing apply its state is unknown and it stays as it was.
        if (!failure) self.started = target.has_value();
        if (epoch != epoch_) return;
        self.failure = std::move(failure);
        self.done_epoch = epoch;
        // Phase 2 without a round trip through the requester: the last vCPU
        // to finish, if every one succeeded, releases them all itself (the
        // requester would only wake to do the same; on a busy host that
        // wake-up is hundreds of microseconds of a restore). The requester's
        // await() sees the same condition and returns.
        if (all_applied(epoch)) publish(Command::Run);
        requester_cv_.notify_all();
    }

    // Caller holds mutex_: every vCPU restore() waits for finished `epoch`, none failed.
    bool all_applied(std::uint64_t epoch) const {
        for (std::size_t i = 0; i < vcpus_.size(); ++i) {
            const Vcpu& v = vcpus_[i];
            const bool needed = v.attached || (*targets_)[i].has_value();
            if (needed && (v.done_epoch != epoch || v.failure)) return false;
        }
        return true;
    }

    // Caller holds mutex_. Kicks only threads still in (or entering) the guest.
    void kick_unarrived() {
        for (Vcpu& v : vcpus_)
            if (v.attached && !v.at_safe_point && v.kick) v.kick();
    }

    static Clock::time_point deadline_from(Clock::time_point now, std::chrono::nanoseconds deadline) {
        if (deadline <= deadline.zero()) return now;
        if (deadline >= Clock::time_point::max() - now) return Clock::time_point::max();
        return now + std::chrono::duration_cast<Clock::duration>(deadline);
    }

    std::string describe_deadline(const char* operation, std::size_t i, std::chrono::nanoseconds deadline) const {
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline).count();
        return std::string(operation) + ": vCPU " + std::to_string(i) + " did not reach its safe point within " +
               std::to_string(ms) + " ms" + (vcpus_[i].attached ? "" : " (its thread is not attached)");
    }

    // Waits until every vCPU that `needed` names has finished `epoch`, kicking
    // the ones not yet at their safe point. On failure it publishes
    // `on_failure` first, so no vCPU is left waiting for an ended operation.
    template <class Needed>
    void await(std::unique_lock<std::mutex>& lock, const char* operation, std::uint64_t epoch,
               std::chrono::nanoseconds deadline, Command on_failure, Needed needed) {
        const auto start = Clock::now();
        const auto give_up_at = deadline_from(start, deadline);
        auto next_kick = start;
        for (;;) {
            if (shutdown_) throw CoordinatorShutDown(operation);
            std::optional<std::size_t> failed, missing;
            for (std::size_t i = 0; i < vcpus_.size(); ++i) {
                const Vcpu& v = vcpus_[i];
                const bool done = v.done_epoch == epoch;
                if (done && v.failure && !failed) failed = i;
                if (!done && !missing && needed(i, v)) missing = i;
            }
            if (failed) {
                std::string what = std::string(operation) + ": vCPU " + std::to_string(*failed) + " failed: " +
                                   *vcpus_[*failed].failure;
                publish(on_failure);
                throw VcpuFailed(*failed, what);
            }
            if (!missing) return;
            const auto now = Clock::now();
            if (now >= give_up_at) {
                std::string what = describe_deadline(operation, *missing, deadline);
                publish(on_failure);
                throw DeadlineExceeded(*missing, what);
            }
            if (now >= next_kick) {
                kick_unarrived();
                next_kick = now + kick_interval;
            }
            requester_cv_.wait_until(lock, std::min(next_kick, give_up_at));
        }
    }

    std::mutex request_mutex_;  // serializes requesters; shutdown() does not take it
    std::mutex mutex_;          // guards everything below
    std::condition_variable vcpu_cv_;       // parked vCPUs wait here
    std::condition_variable requester_cv_;  // the requester waits here
    std::atomic<bool> request_{false};      // command_ != Run || shutdown_, read without the lock
    std::vector<Vcpu> vcpus_;
    Command command_ = Command::Run;
    std::uint64_t epoch_ = 0;
    std::shared_ptr<const Targets> targets_;
    bool shutdown_ = false;
};

}  // namespace cellvm
