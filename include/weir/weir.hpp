// weir: keeps programs calling rate-limited HTTP APIs running at full speed without failing.
// The umbrella header; each concept also has a header of its own.
#pragma once

#include <weir/adaptive_concurrency.hpp>
#include <weir/alerts.hpp>
#include <weir/backoff.hpp>
#include <weir/call_context.hpp>
#include <weir/circuit_breaker.hpp>
#include <weir/error.hpp>
#include <weir/events.hpp>
#include <weir/fallback.hpp>
#include <weir/hedging.hpp>
#include <weir/keyed_limiter.hpp>
#include <weir/metrics.hpp>
#include <weir/outcome.hpp>
#include <weir/pipeline.hpp>
#include <weir/rate.hpp>
#include <weir/rate_limits.hpp>
#include <weir/request_queue.hpp>
#include <weir/retry.hpp>
#include <weir/retry_budget.hpp>
#include <weir/spend_budget.hpp>
#include <weir/stage.hpp>
#include <weir/stream.hpp>
#include <weir/timeout.hpp>
#include <weir/token_bucket.hpp>
#include <weir/trace.hpp>
#include <weir/usage_monitor.hpp>
