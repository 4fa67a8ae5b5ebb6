// Catch's reporter interfaces, without its implementation (in Catch2WithMain).
#define CATCH_CONFIG_EXTERNAL_INTERFACES
#include <catch2/catch.hpp>

#include <weir/testing/manual_clock.hpp>

#include <string>

// Every run of a test case (Catch runs the body once per SECTION path) starts on a fresh virtual
// clock, so no test sees the time another one left behind.
struct fresh_virtual_clock : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;

  void testCaseStarting(const Catch::TestCaseInfo& test) override {
    TestEventListenerBase::testCaseStarting(test);
    running = test.name;
    weir::testing::manual_clock::reset();
  }
  void sectionStarting(const Catch::SectionInfo& section) override {
    TestEventListenerBase::sectionStarting(section);
    if (section.name == running) weir::testing::manual_clock::reset();  // the test's own body
  }

  std::string running;
};
CATCH_REGISTER_LISTENER(fresh_virtual_clock)
