// Unit tests of csrc/vm/coordinator.h with fake vCPUs (fake_vcpu.h).
// Run by tests/test_cpp_units.py, plain and under ThreadSanitizer.
#include "check.h"
#include "fake_vcpu.h"

#include <future>
#include <set>

using namespace std::chrono_literals;
using cellvm::CoordinatorShutDown;
using cellvm::DeadlineExceeded;
using cellvm::VcpuFailed;
using check::eventually;
using fake::Clock;
using fake::Fleet;
using fake::State;
using Targets = std::vector<std::optional<State>>;

namespace {

constexpr auto generous = 5s;  // a deadline that only a bug hits

void wait_attached(Fleet& fleet, std::size_t running) {
    for (std::size_t i = 0; i < running; ++i) CHECK(eventually([&] { return fleet[i].in_guest(); }));
}

std::vector<std::uint64_t> work_of(Fleet& fleet) {
    std::vector<std::uint64_t> work;
    for (auto& v : fleet.vcpus) work.push_back(v->work());
    return work;
}

// Every listed vCPU makes guest progress (it is running).
bool all_progress(Fleet& fleet, const std::vector<std::size_t>& which) {
    const auto before = work_of(fleet);
    return eventually([&] {
        for (std::size_t i : which)
            if (fleet[i].work() <= before[i] + 1) return false;
        return true;
    });
}

// Every started vCPU reaches its safe point (one still in a guest slice
// gets there when the slice ends), then none makes progress for three
// guest slices. Stability is awaited, not sampled once: after a failed
// restore a vCPU may still be finishing its apply, which also sets `work`.
bool all_parked(Fleet& fleet) {
    return eventually([&] {
        for (auto& v : fleet.vcpus)
            if (v->in_guest()) return false;
        const auto before = work_of(fleet);
        std::this_thread::sleep_for(60ms);
        return work_of(fleet) == before;
    });
}

Targets targets_with_work(std::size_t n, std::uint64_t base) {
    Targets targets;
    for (std::size_t i = 0; i < n; ++i) targets.push_back(State{i, base + i, 0, {}});
    return targets;
}

}  // namespace

TEST(pause_returns_at_once_with_only_detached_secondaries) {
    Fleet fleet(4, 1);  // vCPU 0 runs; the guest never started 1..3
    wait_attached(fleet, 1);
    const auto start = Clock::now();
    const auto states = fleet.coordinator.pause(generous);
    CHECK(Clock::now() - start < 1s);
    CHECK(states.size() == 4);
    CHECK(states[0] && states[0]->vcpu == 0);
    CHECK(!states[1] && !states[2] && !states[3]);

    Fleet none(3, 0);
    const auto start_none = Clock::now();
    const auto nothing = none.coordinator.pause(generous);
    CHECK(Clock::now() - start_none < 100ms);
    CHECK(nothing.size() == 3 && !nothing[0] && !nothing[1] && !nothing[2]);
}

TEST(pause_returns_each_vcpus_own_state_captured_on_its_thread) {
    Fleet fleet(4);
    wait_attached(fleet, 4);
    const auto states = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 4; ++i) {
        CHECK(states[i].has_value());
        CHECK(states[i]->vcpu == i);
        CHECK(states[i]->thread == fleet[i].thread_id());
        CHECK(states[i]->work == fleet[i].work());  // parked: no progress since capture
    }
    CHECK(all_parked(fleet));
    fleet.coordinator.resume();
    CHECK(all_progress(fleet, {0, 1, 2, 3}));
}

TEST(pause_deadline_names_the_stalled_vcpu_and_leaves_the_others_running) {
    Fleet fleet(4);
    wait_attached(fleet, 4);
    fleet[2].stall_for(10s);  // ended below, or by ~Fleet
    CHECK(eventually([&] { return fleet[2].stalling(); }));

    const auto deadline = 100ms;
    const auto start = Clock::now();
    const auto error = CHECK_THROWS(DeadlineExceeded, fleet.coordinator.pause(deadline));
    const auto elapsed = Clock::now() - start;
    CHECK(error.vcpu == 2);
    CHECK(elapsed >= deadline);         // not early
    CHECK(elapsed < deadline + 1s);     // not hanging
    CHECK(std::string(error.what()).find("vCPU 2") != std::string::npos);
    CHECK(!fleet.coordinator.has_request());
    CHECK(all_progress(fleet, {0, 1, 3}));

    fleet[2].end_stall();  // it arrives late: nothing is waiting for it any more
    CHECK(all_progress(fleet, {0, 1, 2, 3}));
    const auto states = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 4; ++i) CHECK(states[i] && states[i]->vcpu == i);
    fleet.coordinator.resume();
}

TEST(kicks_are_resent_until_the_vcpu_arrives) {
    Fleet fleet(2);
    wait_attached(fleet, 2);
    fleet[1].slice_lasts(10s);  // only a kick ends its guest slice...
    fleet[1].drop_kicks(5);     // ...and the first five are lost
    CHECK(eventually([&] { return fleet[1].current_slice() == 10s; }));
    const auto start = Clock::now();
    const auto states = fleet.coordinator.pause(generous);
    CHECK(Clock::now() - start < 1s);
    CHECK(states[1].has_value());
    CHECK(fleet[1].kicks() >= 6);
    fleet.coordinator.resume();
}

TEST(shutdown_cuts_a_pending_pause_short) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    fleet[1].stall_for(10s);
    CHECK(eventually([&] { return fleet[1].stalling(); }));
    const auto start = Clock::now();
    auto pause = std::async(std::launch::async, [&] { return fleet.coordinator.pause(10s); });
    std::this_thread::sleep_for(50ms);
    fleet.coordinator.shutdown();
    CHECK_THROWS(CoordinatorShutDown, pause.get());
    CHECK(Clock::now() - start < 2s);
    CHECK(eventually([&] { return fleet[0].stopped() && fleet[2].stopped(); }));
    fleet.coordinator.shutdown();  // idempotent
    CHECK_THROWS(CoordinatorShutDown, fleet.coordinator.pause(generous));
    CHECK_THROWS(CoordinatorShutDown, fleet.coordinator.resume());
    CHECK_THROWS(CoordinatorShutDown, fleet.coordinator.restore(Targets(3), generous));
    fleet[1].end_stall();
    CHECK(eventually([&] { return fleet[1].stopped(); }));
}

TEST(shutdown_cuts_a_pending_restore_short) {
    Fleet fleet(3, 2);  // vCPU 2 has no thread, so a restore that gives it a state waits for it
    wait_attached(fleet, 2);
    const auto start = Clock::now();
    auto restore = std::async(std::launch::async, [&] { fleet.coordinator.restore(targets_with_work(3, 10), 10s); });
    std::this_thread::sleep_for(50ms);
    fleet.coordinator.shutdown();
    CHECK_THROWS(CoordinatorShutDown, restore.get());
    CHECK(Clock::now() - start < 2s);
    CHECK(eventually([&] { return fleet[0].stopped() && fleet[1].stopped(); }));
}

TEST(a_stale_state_from_an_earlier_pause_is_never_returned) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    const auto first = fleet.coordinator.pause(generous);
    fleet.coordinator.resume();
    CHECK(all_progress(fleet, {0, 1, 2}));
    const auto second = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 3; ++i) {
        CHECK(first[i]->capture_number == 1 && second[i]->capture_number == 2);
        CHECK(second[i]->work > first[i]->work);
    }
    // Pausing a paused VM captures again rather than handing back old states.
    const auto third = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 3; ++i) CHECK(third[i]->capture_number == 3);
    fleet.coordinator.resume();

    // A pause that timed out after some vCPUs captured: their captures are dropped.
    fleet[1].stall_for(10s);
    CHECK(eventually([&] { return fleet[1].stalling(); }));
    CHECK_THROWS(DeadlineExceeded, fleet.coordinator.pause(200ms));
    CHECK(fleet[0].captures() == 4 && fleet[1].captures() == 3);  // 0 captured, 1 never arrived
    fleet[1].end_stall();
    const auto after = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 3; ++i) CHECK(after[i]->capture_number == fleet[i].captures());
    CHECK(after[0]->capture_number == 5 && after[1]->capture_number == 4);
    fleet.coordinator.resume();
}

TEST(a_failing_capture_names_the_vcpu_and_leaves_all_running) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    fleet[2].fail_next_capture();
    const auto error = CHECK_THROWS(VcpuFailed, fleet.coordinator.pause(generous));
    CHECK(error.vcpu == 2);
    CHECK(std::string(error.what()).find("fake capture failed") != std::string::npos);
    CHECK(all_progress(fleet, {0, 1, 2}));
}

TEST(out_of_range_indices_throw_and_write_nothing) {
    CHECK_THROWS(std::invalid_argument, fake::Coordinator(0));
    fake::Coordinator coordinator(2);
    bool stray_kick_ran = false;
    CHECK_THROWS(std::out_of_range, coordinator.set_kick(2, [&] { stray_kick_ran = true; }));
    CHECK_THROWS(std::out_of_range, coordinator.attach(2));
    CHECK_THROWS(std::out_of_range, coordinator.attach(static_cast<std::size_t>(-1)));
    CHECK_THROWS(std::out_of_range, coordinator.detach(7));
    CHECK_THROWS(std::out_of_range,
                 coordinator.safe_point(2, [] { return State{}; }, [](const State&) {}));
    CHECK_THROWS(std::invalid_argument, coordinator.restore(Targets(1), generous));
    CHECK_THROWS(std::invalid_argument, coordinator.restore(Targets(3), generous));
    CHECK(!coordinator.has_request());  // the rejected restores published nothing
    // Nothing was attached by the bad calls: pause has nobody to wait for.
    const auto start = Clock::now();
    const auto states = coordinator.pause(generous);
    CHECK(Clock::now() - start < 100ms);
    CHECK(!states[0] && !states[1]);
    coordinator.shutdown();
    CHECK(!stray_kick_ran);
}

TEST(resume_wakes_each_parked_vcpu_exactly_once) {
    Fleet fleet(4);
    wait_attached(fleet, 4);
    fleet.coordinator.resume();  // not paused: nothing to wake
    for (std::uint64_t cycle = 1; cycle <= 3; ++cycle) {
        fleet.coordinator.pause(generous);
        fleet.coordinator.pause(generous);  // pausing again still needs one resume
        for (std::size_t i = 0; i < 4; ++i) CHECK(fleet[i].runs() == cycle - 1);
        fleet.coordinator.resume();
        CHECK(eventually([&] {
            for (std::size_t i = 0; i < 4; ++i)
                if (fleet[i].runs() != cycle) return false;
            return true;
        }));
        CHECK(all_progress(fleet, {0, 1, 2, 3}));
        for (std::size_t i = 0; i < 4; ++i) CHECK(fleet[i].runs() == cycle);  // and not twice
    }
}

TEST(restore_applies_on_each_vcpus_thread_and_meets_before_running) {
    Fleet fleet(4);
    wait_attached(fleet, 4);
    for (std::size_t i = 0; i < 4; ++i) fleet[i].apply_takes(std::chrono::milliseconds(5 * i));
    fleet.coordinator.pause(generous);
    const auto targets = targets_with_work(4, 1000);
    fleet.coordinator.restore(targets, generous);

    std::set<std::thread::id> threads;
    Clock::time_point last_apply_finished{};
    for (std::size_t i = 0; i < 4; ++i) {
        const auto applies = fleet[i].applies();
        CHECK(applies.size() == 1);
        CHECK(applies[0].thread == fleet[i].thread_id());
        CHECK(applies[0].applied_work == 1000 + i);
        threads.insert(applies[0].thread);
        last_apply_finished = std::max(last_apply_finished, applies[0].finished);
    }
    CHECK(threads.size() == 4);
    CHECK(eventually([&] {
        for (std::size_t i = 0; i < 4; ++i)
            if (fleet[i].runs() != 1) return false;
        return true;
    }));
    for (std::size_t i = 0; i < 4; ++i) CHECK(fleet[i].reentries().back() >= last_apply_finished);

    const auto states = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 4; ++i) CHECK(states[i]->work >= 1000 + i);
    fleet.coordinator.resume();
}

TEST(restore_of_a_running_vm_brings_it_to_the_safe_point_first) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    fleet[1].drop_kicks(3);
    fleet.coordinator.restore(targets_with_work(3, 500), generous);
    for (std::size_t i = 0; i < 3; ++i) CHECK(fleet[i].applies().size() == 1);
    CHECK(!fleet.coordinator.has_request());
    CHECK(all_progress(fleet, {0, 1, 2}));
}

TEST(restore_into_not_started_keeps_the_vcpu_parked_until_given_a_state) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    auto targets = targets_with_work(3, 100);
    targets[2].reset();
    fleet.coordinator.restore(targets, generous);
    CHECK(fleet[2].applies().empty());
    CHECK(all_progress(fleet, {0, 1}));
    const auto parked_work = fleet[2].work();
    const auto states = fleet.coordinator.pause(generous);
    CHECK(states[0] && states[1] && !states[2]);
    fleet.coordinator.resume();
    CHECK(all_progress(fleet, {0, 1}));
    CHECK(fleet[2].work() == parked_work);

    fleet.coordinator.restore(targets_with_work(3, 200), generous);  // now it gets one
    CHECK(fleet[2].applies().size() == 1);
    CHECK(all_progress(fleet, {0, 1, 2}));
}

TEST(restore_waits_for_a_detached_vcpu_it_gives_a_state_to) {
    Fleet fleet(3, 2);
    wait_attached(fleet, 2);
    auto restore = std::async(std::launch::async, [&] { fleet.coordinator.restore(targets_with_work(3, 50), generous); });
    std::this_thread::sleep_for(30ms);
    fleet[2].start();  // the VMM starts the thread; it attaches mid-restore
    restore.get();
    CHECK(fleet[2].applies().size() == 1 && fleet[2].applies()[0].applied_work == 52);
    CHECK(all_progress(fleet, {0, 1, 2}));
}

TEST(a_failing_apply_names_the_vcpu_and_leaves_the_vm_parked) {
    Fleet fleet(4);
    wait_attached(fleet, 4);
    fleet[1].fail_next_apply();
    const auto start = Clock::now();
    const auto error = CHECK_THROWS(VcpuFailed, fleet.coordinator.restore(targets_with_work(4, 10), generous));
    CHECK(Clock::now() - start < 1s);
    CHECK(error.vcpu == 1);
    CHECK(std::string(error.what()).find("fake apply failed") != std::string::npos);
    CHECK(all_parked(fleet));  // nobody runs half-restored
    for (std::size_t i = 0; i < 4; ++i) CHECK(fleet[i].runs() == 0);

    // Every operation still works from there.
    const auto states = fleet.coordinator.pause(generous);
    for (std::size_t i = 0; i < 4; ++i) CHECK(states[i].has_value());
    fleet.coordinator.restore(targets_with_work(4, 20), generous);
    CHECK(all_progress(fleet, {0, 1, 2, 3}));
    fleet.coordinator.pause(generous);
    fleet.coordinator.resume();
    CHECK(all_progress(fleet, {0, 1, 2, 3}));
}

TEST(a_restore_deadline_names_the_missing_vcpu_and_leaves_the_vm_parked) {
    Fleet fleet(4, 3);  // vCPU 3's thread never comes
    wait_attached(fleet, 3);
    const auto deadline = 80ms;
    const auto start = Clock::now();
    const auto error = CHECK_THROWS(DeadlineExceeded, fleet.coordinator.restore(targets_with_work(4, 10), deadline));
    const auto elapsed = Clock::now() - start;
    CHECK(error.vcpu == 3);
    CHECK(elapsed >= deadline && elapsed < deadline + 1s);
    CHECK(std::string(error.what()).find("not attached") != std::string::npos);
    CHECK(all_parked(fleet));
    fleet.coordinator.resume();  // the caller's choice: run them as they are
    CHECK(all_progress(fleet, {0, 1, 2}));
}

TEST(a_stalled_vcpu_fails_the_restore_and_parks_when_it_arrives) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    fleet[0].stall_for(10s);
    CHECK(eventually([&] { return fleet[0].stalling(); }));
    const auto error = CHECK_THROWS(DeadlineExceeded, fleet.coordinator.restore(targets_with_work(3, 7), 50ms));
    CHECK(error.vcpu == 0);
    const auto work_after_stall = fleet[0].work() + 1;  // the stalled slice itself completes
    fleet[0].end_stall();
    CHECK(eventually([&] { return fleet[0].work() == work_after_stall; }));
    CHECK(all_parked(fleet));
    CHECK(fleet[0].applies().empty());  // it arrived after the restore ended: nothing to apply
    fleet.coordinator.restore(targets_with_work(3, 70), generous);
    CHECK(all_progress(fleet, {0, 1, 2}));
}

TEST(a_vcpu_the_guest_stops_is_no_longer_waited_for) {
    Fleet fleet(3);
    wait_attached(fleet, 3);
    fleet[1].stop_guest();
    CHECK(eventually([&] { return !fleet[1].in_guest(); }));  // detached, or about to
    const auto states = fleet.coordinator.pause(generous);
    CHECK(states[0] && !states[1] && states[2]);
    fleet.coordinator.resume();
}

TEST(thousand_pause_resume_cycles_with_eight_vcpus) {
    Fleet fleet(8);
    wait_attached(fleet, 8);
    std::vector<std::uint64_t> last_capture(8, 0);
    for (int cycle = 0; cycle < 1000; ++cycle) {
        const auto states = fleet.coordinator.pause(generous);
        for (std::size_t i = 0; i < 8; ++i) {
            CHECK(states[i] && states[i]->vcpu == i);
            CHECK(states[i]->capture_number == last_capture[i] + 1);
            last_capture[i] = states[i]->capture_number;
        }
        fleet.coordinator.resume();
    }
    CHECK(all_progress(fleet, {0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(concurrent_requesters_are_serialized) {
    Fleet fleet(4);
    wait_attached(fleet, 4);
    auto requester = [&] {
        for (int cycle = 0; cycle < 100; ++cycle) {
            const auto states = fleet.coordinator.pause(generous);
            for (std::size_t i = 0; i < 4; ++i)
                if (!states[i] || states[i]->vcpu != i) throw std::runtime_error("wrong state from pause");
            fleet.coordinator.resume();
        }
    };
    auto a = std::async(std::launch::async, requester);
    auto b = std::async(std::launch::async, requester);
    a.get();
    b.get();
    CHECK(all_progress(fleet, {0, 1, 2, 3}));
}

TEST(shutdown_in_the_middle_of_pause_resume_cycles_stops_everyone) {
    Fleet fleet(8);
    wait_attached(fleet, 8);
    auto requester = std::async(std::launch::async, [&] {
        for (;;) {
            fleet.coordinator.pause(generous);
            fleet.coordinator.resume();
        }
    });
    std::this_thread::sleep_for(50ms);
    fleet.coordinator.shutdown();
    CHECK_THROWS(CoordinatorShutDown, requester.get());
    CHECK(eventually([&] {
        for (auto& v : fleet.vcpus)
            if (!v->stopped()) return false;
        return true;
    }));
}

int main(int argc, char** argv) { return check::test_main(argc, argv); }
